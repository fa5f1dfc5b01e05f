"""The committed models still meet the acceptance bar (accuracy >= 0.95) on fresh simulator data,
loaded exactly as a worker loads them: `ModelRepository` + `OnnxRuntimeEngine`, raw uint8/int16 in."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from engines.onnxruntime import OnnxRuntimeEngine
from engines.repository import ModelRepository
from engines.settings import BUNDLED_MODELS as MODELS
from producers import synth
# Not a seed the training script uses (it derives its streams from SeedSequence((seed, stream, ...))).
FRESH_SEED = 20_240_917
SAMPLES = 400


@pytest.mark.parametrize(
    ("name", "draw", "labels"),
    [
        ("frame_classifier", synth.frame_dataset, synth.FRAME_LABELS),
        ("audio_classifier", synth.audio_dataset, synth.AUDIO_LABELS),
    ],
)
def test_bundled_model_is_accurate_on_fresh_data(
    name: str, draw: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]], labels: tuple[str, ...]
) -> None:
    spec = ModelRepository(MODELS).resolve(name)
    assert spec.labels == list(labels)
    x, y = draw(SAMPLES, np.random.default_rng(FRESH_SEED))
    engine = OnnxRuntimeEngine(spec)
    predictions = np.concatenate([engine.infer(x[i : i + 16]).argmax(axis=1) for i in range(0, SAMPLES, 16)])
    engine.close()
    accuracy = float((predictions == y).mean())
    assert accuracy >= 0.95, f"{name}: accuracy {accuracy:.3f} on {SAMPLES} fresh samples"
