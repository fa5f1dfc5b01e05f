"""The torch engine agrees with ONNX Runtime on the same model, on the CPU here and on CUDA (fp32, fp16 with
CUDA graphs per bucket) where torch sees a GPU."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engines import EngineError, EngineUnavailable, ModelRepository, load_engine
from engines.repository import ModelSpec, Precision, model_checksum

torch = pytest.importorskip("torch")
from engines.torch_engine import TorchEngine  # after the skip: it needs torch to run

RandomBatch = Callable[[ModelSpec, int], np.ndarray]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no CUDA GPU (CPU-only build or no driver)"
)


def _agree(spec: ModelSpec, batch: np.ndarray, **torch_options: object) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's and the torch engine's probabilities for `batch`."""
    with load_engine("onnxruntime", spec, 2) as reference, load_engine("torch", spec, 2, **torch_options) as engine:
        assert engine.kind == "torch"
        return reference.infer(batch), engine.infer(batch)


@pytest.mark.parametrize(("repository", "name"), [
    ("zoo_repository", "audio_cnn"), ("zoo_repository", "resnet18"),
    ("shaped_repository", "frame_shaped"), ("shaped_repository", "audio_shaped"),
])  # fmt: skip
def test_torch_on_cpu_agrees_with_onnxruntime(
    request: pytest.FixtureRequest, random_batch: RandomBatch, repository: str, name: str
) -> None:
    spec = request.getfixturevalue(repository).resolve(name)
    expected, got = _agree(spec, random_batch(spec, 3))
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)


def test_torch_bf16_autocast_on_cpu_stays_close(shaped_repository: ModelRepository, random_batch: RandomBatch) -> None:
    spec = shaped_repository.resolve("audio_shaped")
    expected, got = _agree(spec, random_batch(spec, 4), precision="bf16")
    np.testing.assert_allclose(got, expected, atol=0.05)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-2)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
# Tracing turns the exported module's shape guards into constants, and says so.
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_model_pt_is_loaded_where_there_is_no_pt2(
    zoo_repository: ModelRepository, random_batch: RandomBatch, tmp_path: Path
) -> None:
    spec = zoo_repository.resolve("audio_cnn")
    assert spec.directory is not None
    target = tmp_path / spec.name / "1"
    shutil.copytree(spec.directory, target)
    program = torch.export.load(target / "model.pt2")
    torch.jit.save(torch.jit.trace(program.module(), (torch.from_numpy(random_batch(spec, 2)),)), target / "model.pt")
    (target / "model.pt2").unlink()
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "checksum": model_checksum(target)}))
    expected, got = _agree(ModelRepository(tmp_path).resolve(spec.name), random_batch(spec, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)


def test_slices_and_buckets_on_cpu_need_no_padding(zoo_repository: ModelRepository, random_batch: RandomBatch) -> None:
    spec = zoo_repository.resolve("audio_cnn")  # buckets 1/4/8: CUDA-only, the CPU runs each size as it is
    batch = random_batch(spec, 11)
    with TorchEngine(spec) as engine:
        whole = engine.infer(batch)  # 11 > max_batch_size 8: one call all the same on the CPU
        engine.warmup([3])
        assert engine.graph_buckets == []
        parts = np.concatenate([engine.infer(batch[:3]), engine.infer(batch[3:])])
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-7)


def test_a_batch_already_on_the_device_gives_what_the_host_batch_gives(
    shaped_repository: ModelRepository, random_batch: RandomBatch
) -> None:
    spec = shaped_repository.resolve("frame_shaped")
    batch = random_batch(spec, 3)
    with TorchEngine(spec) as engine:  # on the CPU, the engine's device is the host
        np.testing.assert_array_equal(engine.infer_device(torch.from_numpy(batch)), engine.infer(batch))


@pytest.mark.parametrize(
    "wrong",
    [lambda t: t.float(), lambda t: t[:, :100], lambda t: t[:0], lambda t: t.numpy()],
    ids=["dtype", "shape", "empty", "not a tensor"],
)
def test_a_device_batch_that_is_not_the_declared_input_is_refused(
    shaped_repository: ModelRepository, random_batch: RandomBatch, wrong: Callable[[torch.Tensor], object]
) -> None:
    spec = shaped_repository.resolve("frame_shaped")
    with TorchEngine(spec) as engine, pytest.raises(EngineError, match=r"takes \[N>=1, 224, 224, 3\] uint8 on cpu"):
        engine.infer_device(wrong(torch.from_numpy(random_batch(spec, 2))))


def test_engines_of_host_arrays_say_they_take_no_device_batch(
    shaped_repository: ModelRepository, random_batch: RandomBatch
) -> None:
    spec = shaped_repository.resolve("frame_shaped")
    with load_engine("onnxruntime", spec) as engine, pytest.raises(EngineUnavailable, match="takes host arrays"):
        engine.infer_device(torch.from_numpy(random_batch(spec, 1)))


@needs_cuda
def test_torch_cuda_takes_a_device_batch_through_its_graphs_and_slices(
    zoo_repository: ModelRepository, random_batch: RandomBatch
) -> None:
    spec = zoo_repository.resolve("resnet18")  # buckets 1, 4, 8 of max 8
    with TorchEngine(spec, "cuda", "fp16") as engine:
        for n in (1, 3, 19):  # 3 pads to bucket 4 (a graph); 19 is sliced 8 + 8 + 3
            batch = random_batch(spec, n)
            on_device = torch.from_numpy(batch).cuda()
            np.testing.assert_allclose(engine.infer_device(on_device), engine.infer(batch), rtol=1e-3, atol=1e-6)
        assert engine.graph_buckets == [1, 4, 8]
        with pytest.raises(EngineError, match="on cuda, not"):
            engine.infer_device(torch.from_numpy(random_batch(spec, 2)))  # a host tensor


@needs_cuda
def test_torch_cuda_fp32_agrees_with_onnxruntime(shaped_repository: ModelRepository, random_batch: RandomBatch) -> None:
    spec = shaped_repository.resolve("frame_shaped")  # no buckets: every size runs eagerly
    for n in (1, 5, 40):  # 40 > max_batch_size: goes through the staging buffers in slices
        expected, got = _agree(spec, random_batch(spec, n), device="cuda")
        # cuDNN convolves fp32 in TF32 by default: close, not to the last bits.
        np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_cuda_reduced_precision_captures_a_graph_per_bucket(
    zoo_repository: ModelRepository, random_batch: RandomBatch, precision: Precision
) -> None:
    spec = zoo_repository.resolve("resnet18")  # buckets 1, 4, 8 of max 8
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    with load_engine("onnxruntime", spec, 2) as reference, TorchEngine(spec, "cuda", precision) as engine:
        engine.warmup([1, 2, 3])  # sizes 2 and 3 pad to bucket 4
        assert engine.graph_buckets == [1, 4]
        for n in (1, 3, 6, 8, 19):  # 6 pads to 8; 19 is sliced 8 + 8 + 3
            batch = random_batch(spec, n)
            expected, got = reference.infer(batch), engine.infer(batch)
            assert got.shape == expected.shape and np.isfinite(got).all()
            # 1000 classes: probabilities near 1e-3, so the tolerance is relative.
            np.testing.assert_allclose(got, expected, rtol=0.1, atol=1e-6)
            # A padded or replayed batch gives each item what it gives alone (up to another bucket's kernels).
            np.testing.assert_allclose(engine.infer(batch[:1]), got[:1], rtol=0.05, atol=1e-6)
        assert engine.graph_buckets == [1, 4, 8]
    assert engine.graph_buckets == []


# cuBLAS keeps a workspace for each stream it ran on, which torch hands back only with the process.
_CUBLAS_WORKSPACES = 64 << 20


@needs_cuda
def test_torch_cuda_close_returns_device_memory(zoo_repository: ModelRepository) -> None:
    spec = zoo_repository.resolve("resnet18")
    weights = 4 * int(spec.build["parameters"])  # type: ignore[call-overload]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine = TorchEngine(spec, "cuda", "fp16")
    engine.warmup(8)
    assert torch.cuda.memory_allocated() - before > weights
    engine.close()
    engine.close()
    assert torch.cuda.memory_allocated() - before < _CUBLAS_WORKSPACES
