"""Inference engines behind one interface, and the model repository they load from."""

from __future__ import annotations

from collections.abc import Iterable

from engines.base import Engine, EngineError
from engines.repository import ModelNotFound, ModelRepository, ModelSpec
from engines.settings import EngineSettings
from schemas.errors import ConfigError


def load_engine(kind: str, spec: ModelSpec, intra_op_threads: int = 1) -> Engine:
    """The engine of `kind` for `spec`. Backends are imported here, lazily, so a CPU
    host never imports a GPU library."""
    if kind == "onnxruntime":
        from engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec, intra_op_threads=intra_op_threads)
    raise ConfigError(f"unknown engine kind {kind!r}; this build has: onnxruntime")


def load_engines(settings: EngineSettings, modalities: Iterable[str]) -> dict[str, Engine]:
    """One engine per modality, each on the model configured for it."""
    repository = ModelRepository(settings.model_repository)
    engines: dict[str, Engine] = {}
    for modality in modalities:
        name, version = settings.model_for(modality)
        spec = repository.resolve(name, version)
        if spec.modality != modality:
            raise ConfigError(f"model {name} v{spec.version} is for {spec.modality}, configured for {modality}")
        engines[modality] = load_engine(settings.kind, spec, intra_op_threads=settings.intra_op_threads)
    return engines


__all__ = [
    "Engine", "EngineError", "EngineSettings", "ModelNotFound", "ModelRepository", "ModelSpec",
    "load_engine", "load_engines",
]  # fmt: skip
