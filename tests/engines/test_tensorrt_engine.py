"""The TensorRT engine: a plan built from model.onnx, saved and reused, agreeing with ONNX Runtime; where
tensorrt or a GPU is missing, a clear error. The input rewrite TensorRT needs is checked everywhere, on ONNX Runtime."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines import EngineError, EngineUnavailable, ModelRepository, load_engine
from engines.repository import ModelSpec
from engines.settings import BUNDLED_MODELS
from engines.tensorrt_engine import PLAN, PLAN_KEY, TIMING_CACHE, adapt_input_for_tensorrt

RandomBatch = Callable[[ModelSpec, int], np.ndarray]
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


needs_tensorrt = pytest.mark.skipif(
    not (HAVE_TENSORRT and _cuda_available()),
    reason="needs the tensorrt package and a CUDA GPU (pip install 'sluice[tensorrt]' on a GPU host)",
)


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed")
def test_without_tensorrt_the_error_names_the_package() -> None:
    spec = ModelRepository(BUNDLED_MODELS).resolve("frame_classifier")
    with pytest.raises(EngineUnavailable, match=r"needs the tensorrt package .*sluice\[tensorrt\]"):
        load_engine("tensorrt", spec, device="cuda")


@pytest.mark.parametrize(("name", "host_dtype", "first_op"), [
    ("audio_classifier", np.int32, "Cast"),  # int16, which TensorRT lacks: declared int32
    ("frame_classifier", np.uint8, "Cast"),  # uint8 transposed before its Cast: cast first
])  # fmt: skip
def test_input_adapted_for_tensorrt_gives_the_same_probabilities(
    random_batch: RandomBatch, name: str, host_dtype: type, first_op: str
) -> None:
    spec = ModelRepository(BUNDLED_MODELS).resolve(name)
    assert spec.path is not None
    original = spec.path.read_bytes()
    adapted = adapt_input_for_tensorrt(original, spec.input.name)
    proto = onnx.load_from_string(adapted)
    onnx.checker.check_model(proto, full_check=True)
    (graph_input,) = proto.graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.helper.np_dtype_to_tensor_dtype(np.dtype(host_dtype))
    assert proto.graph.node[0].op_type == first_op and proto.graph.node[0].input == [spec.input.name]
    batch = random_batch(spec, 4)
    options = {"providers": ["CPUExecutionProvider"]}
    (expected,) = ort.InferenceSession(original, **options).run(None, {spec.input.name: batch})
    (got,) = ort.InferenceSession(adapted, **options).run(None, {spec.input.name: batch.astype(host_dtype)})
    np.testing.assert_array_equal(got, expected)


def _graph(op: str, dtype: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node(op, ["raw"], ["x"]), helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], op,
        [helper.make_tensor_value_info("raw", dtype, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    return helper.make_model(graph).SerializeToString()


def test_inputs_are_adapted_only_where_that_is_exact() -> None:
    with pytest.raises(EngineError, match="reaches a Abs first"):
        adapt_input_for_tensorrt(_graph("Abs", TensorProto.INT16), "raw")  # int16 arithmetic must stay int16
    for unchanged in (_graph("Abs", TensorProto.FLOAT), _graph("Identity", TensorProto.INT32)):
        assert adapt_input_for_tensorrt(unchanged, "raw") == unchanged


@needs_tensorrt
@pytest.mark.parametrize(
    ("repository", "name"), [("shaped_repository", "frame_shaped"), ("zoo_repository", "audio_cnn")]
)
def test_tensorrt_fp32_builds_saves_reuses_and_agrees_with_onnxruntime(
    request: pytest.FixtureRequest, random_batch: RandomBatch, repository: str, name: str
) -> None:
    spec = request.getfixturevalue(repository).resolve(name)
    assert spec.directory is not None
    batch = random_batch(spec, spec.batching.max_batch_size + 3)  # past the profile's max: run in slices
    with load_engine("onnxruntime", spec, 2) as reference, load_engine("tensorrt", spec, device="cuda") as engine:
        engine.warmup(4)
        expected, got = reference.infer(batch), engine.infer(batch)
    # TensorRT runs fp32 layers in TF32 by default: close, not to the last bits.
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-3)
    key = json.loads((spec.directory / PLAN_KEY).read_text())
    largest = spec.batching.max_batch_size  # also the largest bucket, where there are buckets
    assert (key["precision"], key["batch"]) == ("fp32", f"1/{largest}/{largest}")
    assert (spec.directory / TIMING_CACHE).stat().st_size > 0
    built = (spec.directory / PLAN).stat().st_mtime_ns
    with load_engine("tensorrt", spec, device="cuda") as engine:  # same key: the saved plan, not a rebuild
        np.testing.assert_allclose(engine.infer(batch[:2]), expected[:2], rtol=1e-2, atol=1e-3)
    assert (spec.directory / PLAN).stat().st_mtime_ns == built
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.infer(batch[:1])


@needs_tensorrt
def test_tensorrt_fp16_plan_is_rebuilt_for_the_new_precision(
    zoo_repository: ModelRepository, random_batch: RandomBatch
) -> None:
    spec = zoo_repository.resolve("resnet18")
    assert spec.directory is not None
    batch = random_batch(spec, 5)
    with load_engine("onnxruntime", spec, 2) as reference, load_engine("tensorrt", spec, device="cuda",
                                                                       precision="fp16") as engine:  # fmt: skip
        expected, got = reference.infer(batch), engine.infer(batch)
    np.testing.assert_allclose(got, expected, rtol=0.1, atol=1e-6)  # 1000 classes: probabilities near 1e-3
    assert json.loads((spec.directory / PLAN_KEY).read_text())["precision"] == "fp16"
