"""The notifier and Redis sections of the settings (`SLUICE_NOTIFIER__<KNOB>`, `SLUICE_REDIS__<KNOB>`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    # A Redis that stops answering (a partition, a hung host) counts as unreachable after this long,
    # for connecting and for each command, rather than holding the notifier until TCP gives up.
    timeout_s: float = 2.0
    # While Redis cannot answer, a cooldown command is retried after 0.1 s, then after twice as long
    # each time, up to this: a long outage costs one attempt (and one logged failure) per this long.
    retry_max_s: float = 5.0


class NotifierSettings(BaseModel):
    app_id: str = "sluice-notifier"
    rules_path: Path = Path(__file__).resolve().parent / "rules.toml"
    # Labels are a model's class names: a result with a longer one was not made by a Sluice worker
    # (a producer that bypasses the worker wrote it), and goes to the dead-letter topic unevaluated.
    max_label_chars: int = 256
    metrics_port: int | None = None
