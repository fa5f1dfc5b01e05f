"""The model repository: per-model batching and engine fields, buckets, several model files per version, checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from engines import ModelNotFound
from engines.repository import Batching, EngineChoice, ModelRepository, model_checksum
from engines.settings import BUNDLED_MODELS


def _copy_version(source: ModelRepository, name: str, root: Path, **config: object) -> Path:
    """The newest version of `name` copied into `root`, with `config` merged into its config.json."""
    spec = source.resolve(name)
    assert spec.directory is not None
    target = root / name / str(spec.version)
    shutil.copytree(spec.directory, target)
    document = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**document, **config}))
    return target


def test_bundled_configs_stay_valid_with_todays_defaults() -> None:
    for name in ("frame_classifier", "audio_classifier"):
        spec = ModelRepository(BUNDLED_MODELS).resolve(name)
        assert spec.engine == EngineChoice(kind="onnxruntime", precision="fp32")
        assert spec.batching == Batching(max_batch_size=16, max_delay_ms=10.0, preferred_batch_sizes=[])
        assert spec.directory == BUNDLED_MODELS / name / "1" and spec.path == spec.directory / "model.onnx"
        assert spec.checksum is None
        # Runtime-only fields never reach a config.json written from a spec.
        assert {"directory", "path"}.isdisjoint(json.loads(spec.model_dump_json()))


def test_bucket_for_is_the_smallest_preferred_size_that_holds_the_batch() -> None:
    spec = ModelRepository(BUNDLED_MODELS).resolve("frame_classifier")
    assert [spec.bucket_for(n) for n in (1, 5, 16)] == [1, 5, 16]  # no buckets: every size as it is
    spec.batching = Batching(max_batch_size=32, preferred_batch_sizes=[16, 4, 1, 8, 4])
    assert spec.batching.preferred_batch_sizes == [1, 4, 8, 16]
    assert [spec.bucket_for(n) for n in (1, 2, 4, 5, 8, 9, 16, 17, 32)] == [1, 4, 4, 8, 8, 16, 16, 17, 32]
    with pytest.raises(ValueError):
        spec.bucket_for(0)


@pytest.mark.parametrize(
    "batching",
    [{"max_batch_size": 8, "preferred_batch_sizes": [16]}, {"preferred_batch_sizes": [0]}, {"max_batch_size": 0}],
)
def test_batching_rejects_sizes_out_of_range(batching: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Batching.model_validate(batching)


def test_engine_choice_accepts_only_known_kinds_and_precisions(tmp_path: Path) -> None:
    bundled = ModelRepository(BUNDLED_MODELS)
    _copy_version(bundled, "frame_classifier", tmp_path, engine={"kind": "tensorrt", "precision": "fp16"},
                  batching={"max_batch_size": 32, "max_delay_ms": 5, "preferred_batch_sizes": [8, 32]})  # fmt: skip
    spec = ModelRepository(tmp_path).resolve("frame_classifier")
    assert spec.engine == EngineChoice(kind="tensorrt", precision="fp16")
    assert spec.batching == Batching(max_batch_size=32, max_delay_ms=5, preferred_batch_sizes=[8, 32])
    _copy_version(bundled, "audio_classifier", tmp_path, engine={"kind": "openvino"})
    with pytest.raises(ValidationError):
        ModelRepository(tmp_path).resolve("audio_classifier")


def test_each_engine_finds_its_own_file(tmp_path: Path) -> None:
    target = _copy_version(ModelRepository(BUNDLED_MODELS), "audio_classifier", tmp_path)
    (target / "model.onnx").rename(target / "model.pt2")  # a version may hold any one format
    spec = ModelRepository(tmp_path).resolve("audio_classifier")
    assert spec.path is None
    assert spec.model_file("model.plan", "model.pt2", "model.pt") == target / "model.pt2"
    with pytest.raises(ModelNotFound, match="model.onnx"):
        spec.model_file("model.onnx")
    (target / "model.pt2").unlink()
    with pytest.raises(ModelNotFound, match="no model file"):
        ModelRepository(tmp_path).resolve("audio_classifier")


def test_a_checksum_in_config_is_verified(tmp_path: Path) -> None:
    bundled = ModelRepository(BUNDLED_MODELS)
    source = bundled.resolve("audio_classifier").directory
    assert source is not None
    target = _copy_version(bundled, "audio_classifier", tmp_path, checksum=model_checksum(source))
    assert ModelRepository(tmp_path).resolve("audio_classifier").checksum == model_checksum(target)
    # A plan is derived on each GPU: building one must not invalidate the model.
    (target / "model.plan").write_bytes(b"plan")
    ModelRepository(tmp_path).resolve("audio_classifier")
    with (target / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelNotFound, match="checksum"):
        ModelRepository(tmp_path).resolve("audio_classifier")
