"""Inference engines behind one interface, and the model repository they load from."""

from __future__ import annotations

from engines.base import Engine, EngineError
from engines.repository import ModelRepository, ModelSpec


def load_engine(kind: str, spec: ModelSpec, intra_op_threads: int = 1) -> Engine:
    """The engine of `kind` for `spec`. Backends are imported here, lazily, so a CPU
    host never imports a GPU library."""
    if kind == "onnxruntime":
        from engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec, intra_op_threads=intra_op_threads)
    raise ValueError(f"unknown engine kind {kind!r}; this build has: onnxruntime")


__all__ = ["Engine", "EngineError", "ModelRepository", "ModelSpec", "load_engine"]
