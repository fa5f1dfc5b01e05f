"""The model repository: `<root>/<model name>/<version>/{model.onnx, config.json}`.

Laid out like Triton's, so a model is versioned by directory and the newest
version is the default. `config.json` declares what a model consumes and emits
(labels, input contract, preprocessing) and how it was trained and measured; it
is read into `ModelSpec`, which the decoders and engines share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from schemas.errors import SluiceError

Modality = Literal["frame", "audio"]  # the names in schemas.topics.MODALITIES


class TensorSpec(BaseModel):
    name: str
    dtype: Literal["uint8", "int16", "float32"]
    # Per-item shape, without the batch dimension. Frames: [height, width, channels]; audio: [samples].
    shape: list[int]
    layout: str


class FramePreprocessing(BaseModel):
    """What the worker does before the graph: decode RAW or JPEG to RGB uint8, and
    resize (bilinear) to the input's height and width when a camera sends another size.
    Scaling and normalisation happen inside the graph, so a GPU engine receives uint8."""

    color: Literal["RGB"] = "RGB"
    resize: Literal["bilinear"] = "bilinear"
    in_graph: str = ""


class AudioPreprocessing(BaseModel):
    """What the worker does before the graph: decode PCM int16, check the sample
    rate, downmix channels by mean, and pad with zeros or crop to the input length."""

    sample_rate: int
    downmix: Literal["mean"] = "mean"
    length: Literal["pad_or_crop"] = "pad_or_crop"
    in_graph: str = ""


class ModelSpec(BaseModel):
    name: str
    version: int
    modality: Modality
    labels: list[str]
    input: TensorSpec
    output: TensorSpec
    preprocessing: FramePreprocessing | AudioPreprocessing
    training: dict[str, object] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    # Set by the repository when loading: the model file beside config.json.
    path: Path | None = None


class ModelNotFound(SluiceError, LookupError):
    """No such model or version in the repository (check SLUICE_ENGINE__MODEL_REPOSITORY and the model names)."""


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self, name: str) -> list[int]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def resolve(self, name: str, version: int | None = None) -> ModelSpec:
        versions = self.versions(name)
        if not versions:
            raise ModelNotFound(f"no model {name!r} in repository {self.root}")
        chosen = versions[-1] if version is None else version
        if chosen not in versions:
            raise ModelNotFound(f"model {name!r} has versions {versions}, not {chosen}")
        version_dir = self.root / name / str(chosen)
        spec = ModelSpec.model_validate_json((version_dir / "config.json").read_text())
        if spec.name != name or spec.version != chosen:
            raise ModelNotFound(
                f"{version_dir}/config.json names {spec.name!r} v{spec.version}, expected {name!r} v{chosen}"
            )
        spec.path = version_dir / "model.onnx"
        if not spec.path.is_file():
            raise ModelNotFound(f"{spec.path} is missing")
        return spec
