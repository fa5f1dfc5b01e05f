"""The engine interface on the CPU engines, and how `load_engine` and `load_engines` choose an engine."""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest

from engines import (
    Engine,
    EngineError,
    EngineSettings,
    EngineUnavailable,
    ModelNotFound,
    ModelRepository,
    load_engine,
    load_engines,
)
from engines.onnxruntime import OnnxRuntimeEngine
from engines.repository import ModelSpec
from engines.settings import BUNDLED_MODELS
from schemas.errors import ConfigError

RandomBatch = Callable[[ModelSpec, int], np.ndarray]


def _bundled(name: str = "frame_classifier") -> ModelSpec:
    return ModelRepository(BUNDLED_MODELS).resolve(name)


class _Recording(OnnxRuntimeEngine):
    """The real engine, remembering the batch sizes it was given."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.sizes: list[int] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        return super().infer(batch)


def test_warmup_runs_each_requested_size_once_largest_first() -> None:
    with _Recording(_bundled("audio_classifier")) as engine:
        engine.warmup([2, 8, 2, 5])
        assert engine.sizes == [8, 5, 2]
        engine.sizes.clear()
        engine.warmup(4)  # a max batch size, as the worker passes it: every size up to it
        assert engine.sizes == [4, 3, 2, 1]


def test_an_engine_declares_its_tensors_and_checks_batches_against_them() -> None:
    with load_engine("auto", _bundled()) as engine:
        assert (engine.input.name, engine.input.dtype, engine.input.shape) == ("frames", "uint8", [224, 224, 3])
        assert (engine.output.name, engine.output.dtype, engine.output.shape) == ("probabilities", "float32", [4])
        assert engine.infer(engine.blank(3)).shape == (3, 4)
        for wrong in (np.zeros((2, 224, 224, 3), np.float32), np.zeros((2, 224, 224), np.uint8), engine.blank(0)):
            with pytest.raises(EngineError, match=r"takes \[N>=1, 224, 224, 3\] uint8"):
                engine.infer(wrong)


def _cpu_engines(repository: ModelRepository, name: str) -> list[Engine]:
    spec = repository.resolve(name)
    return [load_engine("onnxruntime", spec), load_engine("torch", spec, 2)]


@pytest.mark.parametrize("name", ["audio_cnn", "resnet18"])
def test_close_is_idempotent_and_infer_after_close_raises(
    zoo_repository: ModelRepository, random_batch: RandomBatch, name: str
) -> None:
    for engine in _cpu_engines(zoo_repository, name):
        batch = random_batch(engine.spec, 2)
        assert engine.infer(batch).shape == (2, len(engine.spec.labels))
        engine.close()
        engine.close()
        with pytest.raises(EngineError, match="closed"):
            engine.infer(batch)


def test_load_engine_auto_follows_the_model_config(zoo_repository: ModelRepository) -> None:
    spec = zoo_repository.resolve("audio_cnn")
    with load_engine("auto", spec) as engine:
        assert engine.kind == "onnxruntime"
    spec.engine.kind = "torch"
    with load_engine("auto", spec) as engine:
        assert engine.kind == "torch"


def test_load_engine_refuses_what_it_cannot_honour() -> None:
    spec = _bundled()
    with pytest.raises(ConfigError, match="unknown engine kind 'openvino'"):
        load_engine("openvino", spec)
    with pytest.raises(ConfigError, match="fp32 only"):
        load_engine("onnxruntime", spec, precision="fp16")
    with pytest.raises(ConfigError, match="CUDA only"):
        load_engine("tensorrt", spec, device="cpu")
    # The bundled models ship ONNX alone: the torch engine says which files it looked for.
    with pytest.raises(ModelNotFound, match=r"model\.pt2, model\.pt"):
        load_engine("torch", spec)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu is installed")
def test_onnxruntime_on_cuda_without_onnxruntime_gpu_says_what_to_install() -> None:
    with pytest.raises(EngineUnavailable, match=r"onnxruntime-gpu"):
        load_engine("onnxruntime", _bundled(), device="cuda")


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu and a CUDA GPU (pip install 'sluice[onnxruntime-gpu]' on a GPU host)",
)
@pytest.mark.parametrize("name", ["frame_classifier", "audio_classifier"])
def test_onnxruntime_on_cuda_agrees_with_the_cpu(random_batch: RandomBatch, name: str) -> None:
    spec = _bundled(name)
    try:
        gpu = load_engine("onnxruntime", spec, device="cuda")
    except EngineUnavailable as exc:  # the wheel is there, a usable GPU is not
        pytest.skip(str(exc))
    with gpu, load_engine("onnxruntime", spec) as cpu:
        gpu.warmup(4)
        batch = random_batch(spec, 9)
        # The CUDA provider convolves fp32 in TF32 by default: close, not to the last bits.
        np.testing.assert_allclose(gpu.infer(batch), cpu.infer(batch), rtol=1e-2, atol=1e-3)


def test_the_default_settings_run_the_bundled_models_on_cpu_onnxruntime_without_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = EngineSettings()
    assert (settings.kind, settings.device, settings.precision) == ("auto", "cpu", "auto")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as on a worker without it
    engines = load_engines(settings, ["frame", "audio"])
    try:
        assert {modality: engine.kind for modality, engine in engines.items()} == {
            "frame": "onnxruntime", "audio": "onnxruntime"
        }  # fmt: skip
    finally:
        for engine in engines.values():
            engine.close()
    with pytest.raises(EngineUnavailable, match=r"needs the torch package"):
        load_engine("torch", _bundled())


def test_load_engines_closes_what_it_loaded_when_a_later_modality_fails() -> None:
    settings = EngineSettings(audio_model="no_such_model")
    loaded: list[Engine] = []
    original = OnnxRuntimeEngine.close

    def spy(engine: OnnxRuntimeEngine) -> None:
        loaded.append(engine)
        original(engine)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OnnxRuntimeEngine, "close", spy)
        with pytest.raises(ModelNotFound, match="no_such_model"):
            load_engines(settings, ["frame", "audio"])
    assert [engine.spec.modality for engine in loaded] == ["frame"]
