"""Train the bundled `frame_classifier` and `audio_classifier` on the simulator and export them to ONNX.

- All preprocessing (cast, scaling, layout, downsampling, spectrogram) is in the graph: engines get raw uint8/int16.
- Frames: 4x4 average pool (224 -> 56: an anti-aliased downscale that keeps 36 px shapes separable), per-image
  standardisation (brightness drift ~ no-op), four 3x3 conv/BN/ReLU blocks (16-32-64-64) with 2x2 max pools, then
  global average+max pooling: ~21 MFLOPs, ~0.35 ms/frame on one ORT thread. (A 2x pool with strided convs trained
  twice as slowly and ended less accurate.)
- Audio: a fixed Conv1d of Hann-windowed DFT kernels (256 points, hop 128) gives a 129 x 30 log-power spectrogram,
  mean-removed per chunk (loudness-invariant); a small 2D CNN tells flat ridges (tone), sloped ones (chirp) and
  broadband energy (noise) apart.
- The simulator gives unlimited labels, so front ends carry no weights and are run once per sample and cached;
  frames also get the 8 flips/rotations, which keep every label. Export: torch.export-based, one file, dynamic batch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from engines.onnxruntime import OnnxRuntimeEngine
from engines.repository import ModelRepository, ModelSpec
from producers import synth

OPSET = 18
VERSION = 1
# Streams of the seed: training draws and evaluation draws never share random numbers.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1
BATCH_SIZE = 64
# Samples per generation task: small enough to spread over the workers, large enough to amortise a task.
_CHUNK = 250


class FrameFrontEnd(nn.Module):
    """uint8 NHWC RGB frames -> standardised float NCHW at a quarter of the resolution (56 x 56).

    Transposing while still uint8 moves a quarter of the bytes; the 4x4 average pool is an
    anti-aliased downscale, so a shape's edges keep sub-pixel information; standardising per image
    after pooling makes a uniformly darker frame (brightness drift) look the same to the network."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).to(torch.float32) * (1.0 / 255.0)
        x = F.avg_pool2d(x, 4)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        centred = x - mean
        std = torch.sqrt((centred * centred).mean(dim=(1, 2, 3), keepdim=True))
        return centred / (std + 0.02)


class AudioFrontEnd(nn.Module):
    """int16 PCM -> per-chunk-centred log-power spectrogram [N, 1, 129, 30].

    The STFT is a strided Conv1d with fixed Hann-windowed cosine and sine kernels: every backend,
    TensorRT included, runs a Conv fast, which is not true of the ONNX STFT op. The kernels are a
    buffer, not trained."""

    def __init__(self, n_fft: int = 256, hop: int = 128) -> None:
        super().__init__()
        self.hop = hop
        self.bins = n_fft // 2 + 1
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(self.bins, dtype=torch.float64)[:, None]
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        phase = 2 * torch.pi * k * n / n_fft
        kernels = torch.cat([torch.cos(phase) * window, -torch.sin(phase) * window])
        self.register_buffer("kernels", kernels.to(torch.float32)[:, None, :])

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.to(torch.float32).unsqueeze(1) * (1.0 / 32768.0)
        spectrum = F.conv1d(x, self.kernels, stride=self.hop)
        real, imag = spectrum[:, : self.bins], spectrum[:, self.bins :]
        log_power = torch.log(real * real + imag * imag + 1e-5)
        log_power = log_power - log_power.mean(dim=(1, 2), keepdim=True)
        return log_power.unsqueeze(1)


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 conv without bias (BatchNorm has one), which the exporter folds into a single Conv + Relu."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class GlobalAvgMaxPool(nn.Module):
    """Average and max over space, concatenated: the max keeps a small shape's evidence from being
    averaged away by the background around it, the average keeps the larger shapes' overall outline."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def frame_body() -> nn.Sequential:
    """56x56 -> 7x7x64. The last block sees 38 px of the pooled frame (152 px of the original), more than the
    largest shape (80 px across), so outlines are judged whole, not only by local corners."""
    return nn.Sequential(
        *_conv_block(3, 16),
        nn.MaxPool2d(2),
        *_conv_block(16, 32),
        nn.MaxPool2d(2),
        *_conv_block(32, 64),
        nn.MaxPool2d(2),
        *_conv_block(64, 64),
        GlobalAvgMaxPool(),
        nn.Linear(128, len(synth.FRAME_LABELS)),
    )


def audio_body() -> nn.Sequential:
    """129x30 -> 32x7x32. The last block sees 26 of the 30 frames, so a chirp's slope is measured over
    almost the whole chunk, where a tone's ridge stays flat."""
    return nn.Sequential(
        *_conv_block(1, 8),
        nn.MaxPool2d(2),
        *_conv_block(8, 16),
        nn.MaxPool2d(2),
        *_conv_block(16, 32),
        *_conv_block(32, 32),
        GlobalAvgMaxPool(),
        nn.Linear(64, len(synth.AUDIO_LABELS)),
    )


class Classifier(nn.Module):
    """The exported graph: raw tensor -> front end -> body -> softmax probabilities."""

    def __init__(self, front: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.front = front
        self.body = body

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(self.front(raw)), dim=1)


def _frame_training_draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Independent frames; half the chunks darkened, as the fleet's brightness drift does."""
    brightness = 1.0 if rng.random() < 0.5 else float(rng.uniform(0.35, 1.0))
    return synth.frame_dataset(n, rng, brightness=brightness)


def _audio_training_draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Independent chunks; half the chunks with extra broadband noise, as the fleet's noise drift adds."""
    extra_noise = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.0, 0.03))
    return synth.audio_dataset(n, rng, extra_noise=extra_noise)


def _frame_scenes(scenes: int, steps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive frames from a few cameras: the demo's distribution (shapes bouncing off edges)."""
    frames, labels = [], []
    for _ in range(scenes):
        camera = synth.CameraScene(rng)
        for _ in range(steps):
            frame, label = camera.next_frame()
            frames.append(frame)
            labels.append(synth.FRAME_LABELS.index(label))
    return np.stack(frames), np.array(labels, dtype=np.int64)


def _audio_scenes(scenes: int, steps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive chunks from a few microphones: the demo's distribution."""
    chunks, labels = [], []
    for _ in range(scenes):
        microphone = synth.MicrophoneScene(rng)
        for _ in range(steps):
            chunk, label = microphone.next_chunk()
            chunks.append(chunk)
            labels.append(synth.AUDIO_LABELS.index(label))
    return np.stack(chunks), np.array(labels, dtype=np.int64)


def _dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and transposes of square images, per sample: every shape keeps its class under them."""
    for flip in (lambda t: t.flip(2), lambda t: t.flip(3), lambda t: t.transpose(2, 3)):
        chosen = torch.rand(len(x), 1, 1, 1, generator=generator) < 0.5
        x = torch.where(chosen, flip(x), x)
    return x


def _identity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """No feature-space augmentation: audio's variations (noise drift, loudness) are drawn at generation time."""
    return x


@dataclass(frozen=True)
class Recipe:
    """Everything that differs between the two bundled models."""

    name: str
    modality: str
    labels: tuple[str, ...]
    input: dict[str, object]
    output: dict[str, object]
    preprocessing: dict[str, object]
    front: Callable[[], nn.Module]
    body: Callable[[], nn.Module]
    training_draw: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    fresh_draw: Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    scene_draw: Callable[[int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    augmentation: str
    train_samples: int
    epochs: int
    learning_rate: float


RECIPES: dict[str, Recipe] = {
    "frame": Recipe(
        name="frame_classifier",
        modality="frame",
        labels=synth.FRAME_LABELS,
        input={
            "name": "frames",
            "dtype": "uint8",
            "shape": [synth.FRAME_HEIGHT, synth.FRAME_WIDTH, 3],
            "layout": "NHWC",
        },
        output={"name": "probabilities", "dtype": "float32", "shape": [len(synth.FRAME_LABELS)], "layout": "NC"},
        preprocessing={
            "color": "RGB",
            "resize": "bilinear",
            "in_graph": "uint8 NHWC -> NCHW float /255, 4x4 average pool to 56x56, per-image mean/std "
            "standardisation, CNN, softmax",
        },
        front=FrameFrontEnd,
        body=frame_body,
        training_draw=_frame_training_draw,
        fresh_draw=synth.frame_dataset,
        scene_draw=_frame_scenes,
        augment=_dihedral,
        augmentation="half the chunks darkened (brightness 0.35-1), random flips and transposes",
        train_samples=24_000,
        epochs=10,
        learning_rate=3e-3,
    ),
    "audio": Recipe(
        name="audio_classifier",
        modality="audio",
        labels=synth.AUDIO_LABELS,
        input={"name": "audio", "dtype": "int16", "shape": [synth.CHUNK_SAMPLES], "layout": "NW"},
        output={"name": "probabilities", "dtype": "float32", "shape": [len(synth.AUDIO_LABELS)], "layout": "NC"},
        preprocessing={
            "sample_rate": synth.SAMPLE_RATE,
            "downmix": "mean",
            "length": "pad_or_crop",
            "in_graph": "int16 /32768, Hann-windowed 256-point DFT as a stride-128 Conv1d, log power, "
            "per-chunk mean removal, CNN, softmax",
        },
        front=AudioFrontEnd,
        body=audio_body,
        training_draw=_audio_training_draw,
        fresh_draw=synth.audio_dataset,
        scene_draw=_audio_scenes,
        augment=_identity,
        augmentation="half the chunks with extra broadband noise (0-0.03 of full scale)",
        train_samples=12_000,
        epochs=5,
        learning_rate=3e-3,
    ),
}


def _draw_chunk(kind: str, n: int, entropy: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One generation task; module-level so a worker process can run it."""
    return RECIPES[kind].training_draw(n, np.random.default_rng(np.random.SeedSequence(entropy)))


def training_features(
    kind: str, front: nn.Module, samples: int, seed: int, workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `samples` training samples and pass them through the front end once.

    Each chunk has its own seed, so the data does not depend on the number of workers. Features are
    kept as float16 (a frame's 3x56x56 take 19 kB instead of 150 kB raw); the body trains in float32."""
    tasks = [(kind, min(_CHUNK, samples - start), (seed, _TRAIN_STREAM, start)) for start in range(0, samples, _CHUNK)]
    features, labels = [], []
    with torch.no_grad():
        if workers > 1:
            # spawn, not fork: the parent's OpenMP threads must not be forked mid-flight.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                chunks = list(pool.map(_draw_chunk, *zip(*tasks, strict=True)))
        else:
            chunks = [_draw_chunk(*task) for task in tasks]
        for raw, y in chunks:
            features.append(front(torch.from_numpy(raw)).to(torch.float16))
            labels.append(torch.from_numpy(y))
    return torch.cat(features), torch.cat(labels)


def fit(
    body: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    learning_rate: float,
    seed: int,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    batch_size: int = BATCH_SIZE,
) -> None:
    """AdamW with a one-cycle schedule: reaches a good optimum in few epochs, which is what a 2-core budget allows."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(features) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(body.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=epochs * steps_per_epoch)
    body.train()
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(features), batch_size):
            index = order[start : start + batch_size]
            x = augment(features[index].to(torch.float32), generator)
            logits = body(x)
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(index)
            correct += int((logits.argmax(1) == labels[index]).sum())
        print(
            f"  epoch {epoch + 1}/{epochs}: loss {total_loss / len(features):.4f}, "
            f"train accuracy {correct / len(features):.4f}",
            flush=True,
        )
    body.eval()


def train_model(kind: str, train_samples: int, epochs: int, seed: int, workers: int = 1) -> Classifier:
    """Train the `kind` ("frame" or "audio") model from scratch; deterministic for a given seed and thread count."""
    recipe = RECIPES[kind]
    torch.manual_seed(seed)
    model = Classifier(recipe.front(), recipe.body())
    features, labels = training_features(kind, model.front, train_samples, seed, workers)
    fit(model.body, features, labels, epochs, recipe.learning_rate, seed, recipe.augment)
    return model.eval()


def export(model: Classifier, kind: str, path: Path) -> None:
    """Write `model` as one self-contained ONNX file with a dynamic batch axis, and check it.

    The check compares ONNX Runtime with torch on real simulator samples, so a silent export
    difference (an op lowered differently, a wrong dtype) fails here rather than in a worker."""
    recipe = RECIPES[kind]
    in_name, out_name = str(recipe.input["name"]), str(recipe.output["name"])
    probe, _ = recipe.fresh_draw(5, np.random.default_rng(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch 2.13's own exporter trips its pytree deprecation; nothing a caller can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        torch.onnx.export(
            model,
            (torch.from_numpy(probe[:2]),),
            str(path),
            input_names=[in_name],
            output_names=[out_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    # The exporter annotates every node with its Python stack trace and module path; dropping them keeps
    # local paths out of a committed file and makes a rerun byte-identical, so a git diff means a real change.
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ort_out,) = session.run([out_name], {in_name: probe})
    with torch.no_grad():
        torch_out = model(torch.from_numpy(probe)).numpy()
    if not np.allclose(ort_out, torch_out, atol=1e-4):
        raise RuntimeError(f"{path}: ONNX Runtime and torch disagree by {np.abs(ort_out - torch_out).max():.2e}")


def accuracy(engine: OnnxRuntimeEngine, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> float:
    """Top-1 accuracy through the engine, in batches as a worker would send them."""
    predictions = np.concatenate(
        [engine.infer(np.ascontiguousarray(x[i : i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)]
    )
    return float((predictions == y).mean())


def latency_ms_per_item(engine: OnnxRuntimeEngine, batch_size: int, repeats: int = 30) -> float:
    """Median wall time of one `infer` call at `batch_size`, per item: the number the worker budget is set in."""
    item = np.random.default_rng(0).integers(0, 256, size=engine.spec.input.shape)
    batch = np.broadcast_to(item.astype(engine.spec.input.dtype), (batch_size, *engine.spec.input.shape)).copy()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.infer(batch)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings)) * 1000.0 / batch_size


def _write_config(path: Path, recipe: Recipe, training: dict[str, object], metrics: dict[str, float]) -> None:
    spec = ModelSpec(
        name=recipe.name,
        version=VERSION,
        modality=recipe.modality,  # type: ignore[arg-type]  # "frame" | "audio", checked by pydantic
        labels=list(recipe.labels),
        input=recipe.input,  # type: ignore[arg-type]  # validated into TensorSpec
        output=recipe.output,  # type: ignore[arg-type]
        preprocessing=recipe.preprocessing,  # type: ignore[arg-type]
        training=training,
        metrics=metrics,
    )
    path.write_text(spec.model_dump_json(indent=2, exclude={"path"}) + "\n")


def build(
    kind: str,
    out: Path,
    train_samples: int,
    epochs: int,
    seed: int,
    eval_samples: int,
    scenes: int = 8,
    scene_steps: int = 250,
    workers: int = 1,
    command: str = "",
) -> ModelSpec:
    """Train, export and measure one model into `out/<name>/1/`, and return its spec as a worker loads it.

    Evaluation goes through `ModelRepository` and `OnnxRuntimeEngine`, the worker's own path, on data drawn
    from a seed stream that training never touches."""
    recipe = RECIPES[kind]
    version_dir = out / recipe.name / str(VERSION)
    started = time.perf_counter()
    model = train_model(kind, train_samples, epochs, seed, workers)
    print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
    export(model, kind, version_dir / "model.onnx")
    training: dict[str, object] = {
        "seed": seed,
        "train_samples": train_samples,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "learning_rate": recipe.learning_rate,
        "augmentation": recipe.augmentation,
        "torch_threads": torch.get_num_threads(),
        "opset": OPSET,
        "torch": torch.__version__,
        "command": command,
    }
    _write_config(version_dir / "config.json", recipe, training, {})

    spec = ModelRepository(out).resolve(recipe.name, VERSION)
    engine = OnnxRuntimeEngine(spec, intra_op_threads=1)
    eval_rng = np.random.default_rng(np.random.SeedSequence((seed, _EVAL_STREAM)))
    x_fresh, y_fresh = recipe.fresh_draw(eval_samples, eval_rng)
    x_scene, y_scene = recipe.scene_draw(scenes, scene_steps, eval_rng)
    engine.warmup(16)
    metrics = {
        "accuracy_fresh": round(accuracy(engine, x_fresh, y_fresh), 4),
        "eval_samples": float(eval_samples),
        "accuracy_scenes": round(accuracy(engine, x_scene, y_scene), 4),
        "scene_samples": float(len(y_scene)),
        "ort_ms_per_item_batch1": round(latency_ms_per_item(engine, 1), 3),
        "ort_ms_per_item_batch16": round(latency_ms_per_item(engine, 16), 3),
    }
    engine.close()
    _write_config(version_dir / "config.json", recipe, training, metrics)
    size_kb = (version_dir / "model.onnx").stat().st_size / 1024
    print(f"  {recipe.name}: {json.dumps(metrics)}, model.onnx {size_kb:.0f} kB", flush=True)
    return ModelRepository(out).resolve(recipe.name, VERSION)


def main(argv: list[str] | None = None) -> None:
    defaults = ", ".join(f"{kind} {r.train_samples}" for kind, r in RECIPES.items())
    default_epochs = ", ".join(f"{kind} {r.epochs}" for kind, r in RECIPES.items())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["frame", "audio", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("engines/models"), help="model repository root")
    parser.add_argument("--train-samples", type=int, help=f"default per model: {defaults}")
    parser.add_argument("--epochs", type=int, help=f"default per model: {default_epochs}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=2000, help="fresh simulator samples to measure on")
    parser.add_argument(
        "--workers", type=int, default=2, help="processes generating data (results do not depend on it)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (results may depend on it)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    for kind in ("frame", "audio") if args.model == "all" else (args.model,):
        recipe = RECIPES[kind]
        train_samples = args.train_samples or recipe.train_samples
        epochs = args.epochs or recipe.epochs
        # Recorded fully resolved, so it reproduces this model even after the defaults change.
        command = shlex.join(
            [
                "python", "-m", "streams.training.train", "--model", kind, "--out", str(args.out),
                "--train-samples", str(train_samples), "--epochs", str(epochs), "--seed", str(args.seed),
                "--eval-samples", str(args.eval_samples), "--threads", str(args.threads),
            ]
        )  # fmt: skip
        print(f"{recipe.name}: {command}", flush=True)
        build(
            kind, args.out, train_samples, epochs, args.seed, args.eval_samples, workers=args.workers, command=command
        )


if __name__ == "__main__":
    main()
