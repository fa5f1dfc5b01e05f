"""Model repositories the engine tests share, written once per session (exports take seconds each on 2 cores):
zoo models, and nets shaped like the bundled ones, each as model.onnx + model.pt2 from one trace."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from engines.repository import Batching, ModelRepository, ModelSpec
from engines.settings import BUNDLED_MODELS


@pytest.fixture(scope="session")
def zoo_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """audio_cnn and resnet18 (the one ResNet export of the suite), with CUDA-graph buckets declared."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from engines.zoo import write_zoo_model

    root = tmp_path_factory.mktemp("zoo")
    batching = Batching(max_batch_size=8, preferred_batch_sizes=[1, 4, 8])
    write_zoo_model("audio_cnn", root, batching=batching)
    write_zoo_model("resnet18", root, batching=batching)
    return ModelRepository(root)


@pytest.fixture(scope="session")
def shaped_repository(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """`frame_shaped` and `audio_shaped`: the bundled models' networks and contracts, freshly initialised."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from engines.zoo import write_model
    from streams.training import train

    root = tmp_path_factory.mktemp("shaped")
    bundled = ModelRepository(BUNDLED_MODELS)
    for kind, name in (("frame", "frame_classifier"), ("audio", "audio_classifier")):
        recipe = train.RECIPES[kind]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            network = train.Classifier(recipe.front(), recipe.body())
        spec = bundled.resolve(name).model_copy(
            update={"name": f"{kind}_shaped", "training": {}, "metrics": {}, "checksum": None}
        )
        write_model(network, root, spec, build={"network": f"streams.training.train {kind}", "weights": "random"})
    return ModelRepository(root)


@pytest.fixture
def random_batch() -> Callable[[ModelSpec, int], np.ndarray]:
    """Items over the input dtype's whole range, as noise frames and full-scale noise audio are."""
    rng = np.random.default_rng(7)

    def draw(spec: ModelSpec, n: int) -> np.ndarray:
        info = np.iinfo(spec.input.dtype)
        return rng.integers(info.min, info.max, size=(n, *spec.input.shape), endpoint=True).astype(spec.input.dtype)

    return draw
