"""The notifier and Redis sections of the settings (`SLUICE_NOTIFIER__<KNOB>`, `SLUICE_REDIS__URL`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"


class NotifierSettings(BaseModel):
    app_id: str = "sluice-notifier"
    rules_path: Path = Path(__file__).resolve().parent / "rules.toml"
    metrics_port: int | None = None
