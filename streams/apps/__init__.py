"""Stream apps (Faust): the notifier and its rules."""
