"""The engine section of the settings (`SLUICE_ENGINE__<KNOB>`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, PositiveInt

# The bundled models ship inside this package, so the default works from a wheel as from a checkout.
BUNDLED_MODELS = Path(__file__).resolve().parent / "models"


class EngineSettings(BaseModel):
    # "auto": the engine each model's config.json names (onnxruntime for the bundled models).
    kind: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    # Where the engines run; "cuda" needs a GPU and the engine's GPU package (see pyproject's extras).
    device: Literal["cpu", "cuda"] = "cpu"
    # "auto": the precision each model's config.json names (fp32 for the bundled models).
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # CPU threads per engine: ONNX Runtime's per session; torch's are per process, so the last engine loaded sets them.
    intra_op_threads: PositiveInt = 1
    model_repository: Path = BUNDLED_MODELS
    # One model per modality: `<modality>_model` and `<modality>_model_version` (None: the highest version).
    frame_model: str = "frame_classifier"
    frame_model_version: int | None = None
    audio_model: str = "audio_classifier"
    audio_model_version: int | None = None

    def model_for(self, modality: str) -> tuple[str, int | None]:
        """The configured (model name, version) of a modality."""
        return getattr(self, f"{modality}_model"), getattr(self, f"{modality}_model_version")
