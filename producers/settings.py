"""The simulator section of the settings (`SLUICE_SIMULATOR__<KNOB>`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, NonNegativeInt, PositiveFloat


class SimulatorSettings(BaseModel):
    cameras: NonNegativeInt = 8
    camera_fps: PositiveFloat = 10.0
    microphones: NonNegativeInt = 4
    chunks_per_s: PositiveFloat = 4.0
    frame_encoding: Literal["raw", "jpeg"] = "raw"
    seed: int = 7
    # Inject drift from this many seconds after start (None: never).
    drift_at_s: float | None = Field(None, ge=0)
    # Frames are scaled by this (0..1: darker), audio gets this much extra noise (of full scale).
    drift_brightness: float = Field(0.45, ge=0, le=1)
    drift_extra_noise: float = Field(0.08, ge=0, le=1)
