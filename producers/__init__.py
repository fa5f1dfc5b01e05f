"""What publishes to Sluice: the device SDK, the fleet simulator and its synthetic scenes."""
