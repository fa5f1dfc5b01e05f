"""Inference engines behind one interface, and the model repository they load from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast, get_args

from engines.base import Device, Engine, EngineError, EngineUnavailable
from engines.repository import EngineKind, ModelNotFound, ModelRepository, ModelSpec, Precision
from engines.settings import EngineSettings
from schemas.errors import ConfigError


def load_engine(
    kind: str, spec: ModelSpec, intra_op_threads: int = 1, *, device: Device = "cpu", precision: str = "auto"
) -> Engine:
    """The engine of `kind` for `spec` on `device`. `kind` and `precision` may be "auto": what the model's
    config.json names. Backends are imported here, lazily, so a CPU host never imports a GPU library and a
    worker without torch still runs ONNX Runtime."""
    chosen = spec.engine.kind if kind == "auto" else kind
    resolved = spec.engine.precision if precision == "auto" else precision
    if chosen not in get_args(EngineKind):
        raise ConfigError(f"unknown engine kind {kind!r}; Sluice has: auto, {', '.join(get_args(EngineKind))}")
    if resolved not in get_args(Precision):
        raise ConfigError(f"unknown precision {precision!r}; Sluice has: auto, {', '.join(get_args(Precision))}")
    if device not in get_args(Device):
        raise ConfigError(f"unknown device {device!r}; Sluice has: {', '.join(get_args(Device))}")
    typed_precision = cast(Precision, resolved)
    if chosen == "onnxruntime":
        from engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec, intra_op_threads=intra_op_threads, device=device, precision=typed_precision)
    if chosen == "torch":
        from engines.torch_engine import TorchEngine

        return TorchEngine(spec, device=device, precision=typed_precision, intra_op_threads=intra_op_threads)
    from engines.tensorrt_engine import TensorRTEngine

    return TensorRTEngine(spec, device=device, precision=typed_precision)


def load_version(settings: EngineSettings, modality: str, version: int | None = None) -> Engine:
    """The engine of the model configured for `modality`, at `version` (None: the configured version,
    else the newest), as the settings ask it to run (kind, device, precision, threads)."""
    name, configured = settings.model_for(modality)
    spec = ModelRepository(settings.model_repository).resolve(name, configured if version is None else version)
    if spec.modality != modality:
        raise ConfigError(f"model {name} v{spec.version} is for {spec.modality}, configured for {modality}")
    return load_engine(settings.kind, spec, settings.intra_op_threads, device=settings.device, precision=settings.precision)


def load_engines(settings: EngineSettings, modalities: Iterable[str]) -> dict[str, Engine]:
    """One engine per modality, each on the model configured for it."""
    engines: dict[str, Engine] = {}
    try:
        for modality in modalities:
            engines[modality] = load_version(settings, modality)
    except BaseException:
        # A GPU engine holds device memory until closed; a failed second modality must not leak the first.
        for engine in engines.values():
            engine.close()
        raise
    return engines


__all__ = [
    "Engine", "EngineError", "EngineSettings", "EngineUnavailable", "ModelNotFound", "ModelRepository", "ModelSpec",
    "load_engine", "load_engines", "load_version",
]  # fmt: skip
