"""The model repository: `<root>/<model name>/<version>/{config.json, model files}`.

Laid out like Triton's, so a model is versioned by directory and the newest
version is the default. `config.json` declares what a model consumes and emits
(labels, input contract, preprocessing), how it is batched and which engine runs
it, and how it was built and measured; it is read into `ModelSpec`, which the
decoders and engines share. A version directory may hold the same model in
several formats (`MODEL_FILES`); each engine picks its own with `ModelSpec.model_file`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from schemas.errors import SluiceError

Modality = Literal["frame", "audio"]  # the names in schemas.topics.MODALITIES
EngineKind = Literal["onnxruntime", "torch", "tensorrt"]
Precision = Literal["fp32", "fp16", "bf16"]

# The formats a version directory may hold: ONNX (ONNX Runtime, and TensorRT's source), a torch.export
# program or TorchScript (torch), a serialized TensorRT plan (built from model.onnx on the GPU that runs it).
MODEL_FILES = ("model.onnx", "model.pt2", "model.pt", "model.plan")
# What `checksum` covers: the files a model is published as. A plan is derived on each GPU, so it is not.
SOURCE_FILES = ("model.onnx", "model.pt2", "model.pt")


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


class Batching(BaseModel):
    """How a worker batches this model's inputs. The defaults are the worker's own (`WorkerSettings`)."""

    max_batch_size: int = Field(16, ge=1)
    max_delay_ms: float = Field(10.0, ge=0)
    # The sizes an engine with fixed shapes (CUDA graphs) prepares; a batch is padded up to the next one.
    # Empty: no buckets, every size runs as it is.
    preferred_batch_sizes: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sizes_fit(self) -> Batching:
        sizes = self.preferred_batch_sizes
        if any(size < 1 or size > self.max_batch_size for size in sizes):
            raise ValueError(f"preferred_batch_sizes {sizes} must lie in 1..max_batch_size ({self.max_batch_size})")
        self.preferred_batch_sizes = sorted(set(sizes))
        return self


class EngineChoice(BaseModel):
    """The engine a model is meant to run on, used where the settings say `kind = "auto"`."""

    kind: EngineKind = "onnxruntime"
    precision: Precision = "fp32"


class ModelSpec(BaseModel):
    name: str
    version: int
    modality: Modality
    labels: list[str]
    input: TensorSpec
    output: TensorSpec
    preprocessing: FramePreprocessing | AudioPreprocessing
    batching: Batching = Field(default_factory=Batching)
    engine: EngineChoice = Field(default_factory=EngineChoice)
    training: dict[str, object] = Field(default_factory=dict)
    # How the model files were made (exporter, versions, seed), for models that were not trained here.
    build: dict[str, object] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    # `model_checksum` of the version directory; checked on load when present.
    checksum: str | None = None
    # Set by the repository when loading, never written to config.json: the version directory,
    # and its model.onnx where there is one.
    directory: Path | None = Field(default=None, exclude=True)
    path: Path | None = Field(default=None, exclude=True)

    def bucket_for(self, n: int) -> int:
        """The smallest preferred batch size that holds `n` items, or `n` itself when none does."""
        if n < 1:
            raise ValueError(f"a batch holds at least one item, not {n}")
        return next((size for size in self.batching.preferred_batch_sizes if size >= n), n)

    def model_file(self, *names: str) -> Path:
        """The first of `names` present in the version directory: each engine looks for its own format."""
        if self.directory is None:
            raise ModelNotFound(f"model {self.name} v{self.version} was not loaded from a repository")
        for name in names:
            if (self.directory / name).is_file():
                return self.directory / name
        raise ModelNotFound(f"{self.directory} has none of {', '.join(names)}")


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
        if not any((version_dir / file).is_file() for file in MODEL_FILES):
            raise ModelNotFound(f"{version_dir} has no model file ({', '.join(MODEL_FILES)})")
        if spec.checksum is not None and spec.checksum != model_checksum(version_dir):
            raise ModelNotFound(
                f"{version_dir}: the model files do not match config.json's checksum (a partial copy or a "
                "changed file); copy the version directory again"
            )
        spec.directory = version_dir
        onnx_file = version_dir / "model.onnx"
        spec.path = onnx_file if onnx_file.is_file() else None
        return spec


def model_checksum(directory: Path) -> str:
    """sha256 over the source model files in `directory` (`SOURCE_FILES`), each as its name, size and bytes."""
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        file = Path(directory) / name
        if not file.is_file():
            continue
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
