"""A tiny end-to-end run of the training script: train, export, and load the result the way a worker does.

It checks the contract the workers rely on (names, dtypes, a dynamic batch axis, probabilities that sum
to one, a single-file model), not accuracy: that is `test_bundled_models.py`'s job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from engines.onnxruntime import OnnxRuntimeEngine
from engines.repository import ModelRepository
from streams.training import train


@pytest.mark.parametrize(
    ("kind", "name", "shape", "dtype", "classes"),
    [
        ("frame", "frame_classifier", (224, 224, 3), np.uint8, 4),
        ("audio", "audio_classifier", (4000,), np.int16, 3),
    ],
)
def test_tiny_training_exports_a_loadable_model(
    tmp_path: Path, kind: str, name: str, shape: tuple[int, ...], dtype: type, classes: int
) -> None:
    torch.set_num_threads(2)
    train.build(kind, tmp_path, train_samples=256, epochs=1, seed=7, eval_samples=32, scenes=1, scene_steps=16)

    spec = ModelRepository(tmp_path).resolve(name)
    assert spec.version == 1 and spec.input.shape == list(shape) and spec.output.shape == [classes]
    assert {"accuracy_fresh", "accuracy_scenes", "eval_samples"} <= spec.metrics.keys()
    assert spec.training["seed"] == 7 and spec.training["train_samples"] == 256
    assert sorted(p.name for p in spec.path.parent.iterdir()) == ["config.json", "model.onnx"]

    engine = OnnxRuntimeEngine(spec)
    rng = np.random.default_rng(0)
    for batch_size in (1, 3, 16):
        batch = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(batch_size, *shape)).astype(dtype)
        probabilities = engine.infer(batch)
        assert probabilities.shape == (batch_size, classes) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    engine.close()


def test_training_is_deterministic() -> None:
    torch.set_num_threads(2)
    first = train.train_model("audio", train_samples=128, epochs=1, seed=3)
    second = train.train_model("audio", train_samples=128, epochs=1, seed=3)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
