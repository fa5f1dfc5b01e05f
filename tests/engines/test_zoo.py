"""The benchmark zoo: standard ResNet shapes, the simulator's input contract, and loadable, checksummed model files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines import ModelNotFound, ModelRepository
from engines.repository import AudioPreprocessing, FramePreprocessing, model_checksum
from schemas.errors import ConfigError

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
from engines import zoo  # after the skips: it needs torch and the exporter


@pytest.mark.parametrize(("name", "parameters"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_resnets_have_the_standard_layers(name: str, parameters: int) -> None:
    """The parameter counts of torchvision's resnet18 and resnet50 (ImageNet head), which only the standard
    layer counts, widths and shortcuts give."""
    network = zoo.ZOO[name].network(1000)
    assert sum(p.numel() for p in network.parameters()) == parameters


def test_zoo_models_take_the_simulators_input_contract(zoo_repository: ModelRepository) -> None:
    frames = zoo_repository.resolve("resnet18")
    assert (frames.modality, frames.input.dtype, frames.input.shape) == ("frame", "uint8", [224, 224, 3])
    assert isinstance(frames.preprocessing, FramePreprocessing)
    assert frames.labels == [f"class_{i}" for i in range(1000)] and frames.output.shape == [1000]
    audio = zoo_repository.resolve("audio_cnn")
    assert (audio.modality, audio.input.dtype, audio.input.shape) == ("audio", "int16", [4000])
    assert isinstance(audio.preprocessing, AudioPreprocessing) and audio.preprocessing.sample_rate == 16_000
    assert len(audio.labels) == 10


def test_zoo_model_directory_holds_both_formats_a_checksum_and_build_info(zoo_repository: ModelRepository) -> None:
    spec = zoo_repository.resolve("audio_cnn")
    assert spec.directory is not None
    assert {"config.json", "model.onnx", "model.pt2"} <= {p.name for p in spec.directory.iterdir()}
    assert spec.checksum == model_checksum(spec.directory) and spec.checksum.startswith("sha256:")
    assert spec.build["zoo"] == "audio_cnn" and spec.build["torch"] == torch.__version__
    assert spec.batching.preferred_batch_sizes == [1, 4, 8]
    written = json.loads((spec.directory / "config.json").read_text())
    assert "directory" not in written and "path" not in written and written["checksum"] == spec.checksum


def test_zoo_writes_are_reproducible_and_never_overwrite(tmp_path: Path) -> None:
    first = zoo.write_zoo_model("audio_cnn", tmp_path, classes=4, seed=3)
    second = zoo.write_zoo_model("audio_cnn", tmp_path, version=2, classes=4, seed=3)
    assert first.directory is not None and second.directory is not None
    # The same seed gives the same weights and the same ONNX file.
    assert (first.directory / "model.onnx").read_bytes() == (second.directory / "model.onnx").read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        zoo.write_zoo_model("audio_cnn", tmp_path, classes=4)
    assert sorted(p.name for p in (tmp_path / "audio_cnn").iterdir()) == ["1", "2"]  # no leftovers
    with (second.directory / "model.pt2").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelNotFound, match="checksum"):
        ModelRepository(tmp_path).resolve("audio_cnn", 2)
