"""The notifier section of the settings (`SLUICE_NOTIFIER__<KNOB>`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, PositiveInt


class NotifierSettings(BaseModel):
    app_id: str = "sluice-notifier"
    rules_path: Path = Path(__file__).resolve().parent / "rules.toml"
    # Labels are a model's class names: a result with a longer one was not made by a Sluice worker
    # (a producer that bypasses the worker wrote it), and goes to the dead-letter topic unevaluated.
    max_label_chars: PositiveInt = 256
    metrics_port: int | None = Field(None, ge=0, le=65535)
