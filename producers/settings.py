"""The simulator section of the settings (`SLUICE_SIMULATOR__<KNOB>`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class SimulatorSettings(BaseModel):
    cameras: int = 8
    camera_fps: float = 10.0
    microphones: int = 4
    chunks_per_s: float = 4.0
    frame_encoding: Literal["raw", "jpeg"] = "raw"
    seed: int = 7
    # Inject drift from this many seconds after start (None: never).
    drift_at_s: float | None = None
    drift_brightness: float = 0.45
    drift_extra_noise: float = 0.08
