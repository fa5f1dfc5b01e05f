"""Benchmark models with the shapes of real ones: ResNet-18 and ResNet-50 for frames, a small CNN for audio.

Plain torch, no torchvision. Weights are random (seeded), but BatchNorm statistics are measured
on random inputs, so activations keep the scale of a trained network's: fp16 neither overflows
nor underflows, and engines can be compared and timed as on a real model. Like the bundled
models, every network takes the simulator's raw tensors (uint8 frames, int16 audio) and does its
preprocessing in the graph, so a GPU engine receives the bytes a camera sent.

`write_zoo_model` puts one into a model repository as `<root>/<name>/<version>/` with config.json,
model.onnx (ONNX Runtime, TensorRT) and model.pt2 (torch.export, for the torch engine). Needs torch,
onnx and onnxscript (the `train` extra); nothing imports this module but its callers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from engines.base import EngineError
from engines.repository import (
    AudioPreprocessing,
    Batching,
    EngineChoice,
    FramePreprocessing,
    Modality,
    ModelRepository,
    ModelSpec,
    TensorSpec,
    model_checksum,
)
from schemas.errors import ConfigError

OPSET = 18
# The simulator's input contract (producers/synth.py), which engines/ may not import.
FRAME_SHAPE = [224, 224, 3]
AUDIO_SAMPLES = 4000  # 250 ms
SAMPLE_RATE = 16_000
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Inputs the BatchNorm statistics are measured on: enough for stable means, few enough for 2 cores.
_CALIBRATION_ITEMS = 8


class FrameNormalize(nn.Module):
    """uint8 NHWC RGB -> float NCHW standardised with ImageNet's mean and std. The transpose comes
    before the cast, where it moves a quarter of the bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1) * 255.0))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames.permute(0, 3, 1, 2).to(torch.float32) - self.mean) * self.scale


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """A bias-free convolution and its BatchNorm, which every exporter folds into one convolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(_conv_bn(c_in, width, 3, stride), nn.ReLU(inplace=True), _conv_bn(width, width, 3))
        self.shortcut = _conv_bn(c_in, width, 1, stride) if stride != 1 or c_in != width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (strided, as in ResNet v1.5), 1x1 up to 4x the width, and a shortcut (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.branch = nn.Sequential(
            _conv_bn(c_in, width, 1), nn.ReLU(inplace=True),
            _conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
            _conv_bn(width, c_out, 1),
        )  # fmt: skip
        self.shortcut = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class ResNet(nn.Module):
    """uint8 frames -> class probabilities: the 7x7 stem, four stages of residual blocks (64, 128, 256 and
    512 wide; each after the first halves the resolution), global average pooling, a linear head."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], classes: int) -> None:
        super().__init__()
        stages: list[nn.Module] = [
            FrameNormalize(),
            _conv_bn(3, 64, 7, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
        ]
        c_in = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            for index in range(blocks):
                stages.append(block(c_in, width, stride=2 if stage > 0 and index == 0 else 1))
                c_in = width * block.expansion
        self.features = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, classes)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        pooled = self.features(frames).mean(dim=(2, 3))
        return torch.softmax(self.head(pooled), dim=1)


class AudioCNN(nn.Module):
    """int16 PCM -> class probabilities, straight from the waveform (M5, Dai et al. 2017): a wide strided
    first convolution (80 samples, 5 ms at 16 kHz) learns a filter bank, three small ones follow."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, kernel, stride in ((1, 32, 80, 4), (32, 32, 3, 1), (32, 64, 3, 1), (64, 64, 3, 1)):
            layers += [nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=False), nn.BatchNorm1d(c_out)]
            layers += [nn.ReLU(inplace=True), nn.MaxPool1d(4)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, classes)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.to(torch.float32).unsqueeze(1) * (1.0 / 32768.0)
        return torch.softmax(self.head(self.features(x).mean(dim=2)), dim=1)


@dataclass(frozen=True)
class ZooModel:
    modality: Modality
    classes: int  # the default; ImageNet's 1000 for the vision networks
    network: Callable[[int], nn.Module]  # classes -> the network, freshly initialised
    description: str


ZOO: dict[str, ZooModel] = {
    "resnet18": ZooModel("frame", 1000, lambda k: ResNet(BasicBlock, [2, 2, 2, 2], k), "ResNet-18, 1.8 GFLOPs/frame"),
    "resnet50": ZooModel("frame", 1000, lambda k: ResNet(Bottleneck, [3, 4, 6, 3], k), "ResNet-50, 4.1 GFLOPs/frame"),
    "audio_cnn": ZooModel("audio", 10, AudioCNN, "M5 waveform CNN, 4 convolutions, 0.3 MFLOPs/chunk"),
}


def zoo_spec(name: str, version: int = 1, classes: int | None = None, model_name: str | None = None) -> ModelSpec:
    """The config.json of zoo model `name` (before its files exist): the simulator's input contract,
    labels class_0..class_{k-1}."""
    entry = ZOO[name]
    k = classes or entry.classes
    if entry.modality == "frame":
        tensor = TensorSpec(name="frames", dtype="uint8", shape=FRAME_SHAPE, layout="NHWC")
        preprocessing: FramePreprocessing | AudioPreprocessing = FramePreprocessing(
            in_graph=f"uint8 NHWC -> NCHW float, ImageNet mean/std, {entry.description}, softmax"
        )
    else:
        tensor = TensorSpec(name="audio", dtype="int16", shape=[AUDIO_SAMPLES], layout="NW")
        preprocessing = AudioPreprocessing(
            sample_rate=SAMPLE_RATE, in_graph=f"int16 /32768, {entry.description}, softmax"
        )
    return ModelSpec(
        name=model_name or name, version=version, modality=entry.modality,
        labels=[f"class_{i}" for i in range(k)], input=tensor,
        output=TensorSpec(name="probabilities", dtype="float32", shape=[k], layout="NC"),
        preprocessing=preprocessing,
    )  # fmt: skip


def write_zoo_model(
    name: str,
    root: Path,
    version: int = 1,
    *,
    classes: int | None = None,
    seed: int = 0,
    model_name: str | None = None,
    batching: Batching | None = None,
    engine: EngineChoice | None = None,
) -> ModelSpec:
    """Build zoo model `name` with seeded random weights and write it to `<root>/<model_name or name>/<version>/`;
    returns its spec as `ModelRepository` resolves it."""
    spec = zoo_spec(name, version, classes, model_name)
    spec.batching = batching or Batching()
    spec.engine = engine or EngineChoice()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = ZOO[name].network(len(spec.labels))
        _measure_batchnorm(network, _random_batch(spec.input, _CALIBRATION_ITEMS, seed))
    return write_model(network, root, spec, build={"zoo": name, "seed": seed, "weights": "random"})


def write_model(network: nn.Module, root: Path, spec: ModelSpec, build: dict[str, object]) -> ModelSpec:
    """Export `network` (raw input -> probabilities, as `spec` declares them) to `<root>/<spec.name>/<spec.version>/`
    as model.pt2 and model.onnx, check that ONNX Runtime agrees with torch, and write config.json with the
    files' checksum and `build` plus how they were exported. Returns the spec as `ModelRepository` resolves it."""
    destination = Path(root) / spec.name / str(spec.version)
    if destination.exists():
        raise ConfigError(f"{destination} exists; a version is never rewritten, write another version")
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Written in a directory the repository does not list (not a number), then renamed: a worker resolving
    # the model meanwhile never sees a half-written version.
    directory = Path(tempfile.mkdtemp(prefix=f".{spec.version}-", dir=destination.parent))
    try:
        _export(network.eval(), directory, spec)
        spec.build = {
            **build,
            "parameters": sum(p.numel() for p in network.parameters()),
            "exporter": "torch.export + torch.onnx (dynamo)",
            "opset": OPSET,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
        }
        spec.checksum = model_checksum(directory)
        (directory / "config.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
        directory.chmod(0o755)  # mkdtemp's 0o700 would hide the model from a worker running as another user
        directory.rename(destination)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return ModelRepository(Path(root)).resolve(spec.name, spec.version)


def _export(network: nn.Module, directory: Path, spec: ModelSpec) -> None:
    """model.pt2 and model.onnx from one torch.export trace, with a dynamic batch axis."""
    # A batch of 2: torch.export specialises dimensions of size 0 and 1, and the batch axis must stay dynamic.
    example = torch.from_numpy(_random_batch(spec.input, 2, seed=1))
    onnx_path = directory / "model.onnx"
    with warnings.catch_warnings():
        # torch 2.13's own exporter trips its pytree deprecation; nothing a caller can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.export.export(network, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, directory / "model.pt2")
        torch.onnx.export(
            program, (example,), str(onnx_path), input_names=[spec.input.name], output_names=[spec.output.name],
            opset_version=OPSET, dynamo=True, external_data=False, optimize=True, verbose=False,
        )  # fmt: skip
    # The exporter annotates every node with its Python stack trace: local paths that do not belong in a model file.
    proto = onnx.load(str(onnx_path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    _check_onnx_agrees(network, onnx_path, spec)


def _random_batch(tensor: TensorSpec, n: int, seed: int) -> np.ndarray:
    """`n` items spanning the input dtype's whole range (uniform noise frames, full-scale noise audio)."""
    info = np.iinfo(tensor.dtype)
    rng = np.random.default_rng(seed)
    return rng.integers(info.min, info.max, size=(n, *tensor.shape), endpoint=True).astype(tensor.dtype)


def _measure_batchnorm(network: nn.Module, batch: np.ndarray) -> None:
    """Set every BatchNorm's running statistics to those of `batch`: with the untrained defaults (mean 0,
    variance 1) activations grow block after block, until fp16 overflows in a ResNet-50."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics exactly
    network.train()
    with torch.no_grad():
        network(torch.from_numpy(batch))
    network.eval()


def _check_onnx_agrees(network: nn.Module, onnx_path: Path, spec: ModelSpec) -> None:
    """ONNX Runtime and torch on the same inputs, at a batch size other than the export's: a silent export
    difference (an op lowered differently, a batch axis left static) fails here rather than in a benchmark."""
    probe = _random_batch(spec.input, 3, seed=2)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (ort_out,) = session.run([spec.output.name], {spec.input.name: probe})
    with torch.no_grad():
        torch_out = network(torch.from_numpy(probe)).numpy()
    if not np.allclose(ort_out, torch_out, rtol=1e-3, atol=1e-5):
        raise EngineError(f"{onnx_path}: ONNX Runtime and torch disagree by {np.abs(ort_out - torch_out).max():.2e}")
