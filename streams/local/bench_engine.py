"""`sluice bench engine`: one model on one engine, alone and behind the worker's decode path.

For each batch size and frame encoding, measured back to back in one run (the machine is shared and
noisy, so figures compare within a run, not across runs):

- infer: the engine on a batch decoded beforehand;
- decode+infer: each batch decoded from Avro wire-format messages (built from the simulator's scenes
  as the device SDK builds them: raw RGB, or JPEG at the SDK's quality) through the worker's
  `DecodePool`, then inferred.

Each gives items/s and the latency of one batch (p50, p99); their ratio is what decoding costs. Frames
are rendered at the model's input size; audio is PCM whatever the encodings say. The model is one of
the configured repository, or a zoo model (engines/zoo.py: resnet18, resnet50, audio_cnn) built with
seeded random weights into a temporary repository for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import itertools
import json
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, get_args

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consumers.decode import DecodePool, decode_threads, decoder_for
from engines import Engine, ModelNotFound, ModelRepository, ModelSpec, load_engine
from engines.base import Device
from engines.repository import AudioPreprocessing, Batching, EngineKind, Precision
from producers.synth import CameraScene, MicrophoneScene
from schemas.codec import Codec
from schemas.errors import ConfigError, SluiceError
from schemas.records import AudioChunk, FrameChunk
from schemas.topics import FRAME

if TYPE_CHECKING:
    from streams.settings import SluiceSettings

ENCODINGS = ("raw", "jpeg")
_JPEG_QUALITY = 90  # the device SDK's default (producers/sdk.py)
# Distinct messages decoded per cell, in batches, cycled: several batches' worth, so a batch is not decoded from
# bytes that the previous one left in the cache.
_BATCHES_OF_MESSAGES = 4
_DEVICES = 8  # cameras or microphones, each its own scene


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes are comma-separated integers, not {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1: {text!r}")
    return sizes


def _encodings(text: str) -> list[str]:
    encodings = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(encodings) - set(ENCODINGS)
    if not encodings or unknown:
        raise argparse.ArgumentTypeError(
            f"encodings are a comma-separated list of {', '.join(ENCODINGS)}, not {text!r}"
        )
    return list(dict.fromkeys(encodings))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a model of the repository, or a zoo model built for this run (resnet18, "
                        "resnet50, audio_cnn; needs the train extra); default: the configured frame model")  # fmt: skip
    parser.add_argument("--engine", choices=get_args(EngineKind), default="onnxruntime", help="the engine to run it on")
    parser.add_argument("--device", choices=get_args(Device), default="cpu", help="where the engine runs")
    parser.add_argument("--precision", choices=["auto", *get_args(Precision)], default="auto",
                        help="auto: what the model's config.json names")  # fmt: skip
    parser.add_argument("--batch", type=_sizes, default=[1, 8, 32], help="batch sizes, comma-separated (1,8,32)")
    parser.add_argument("--encoding", type=_encodings, default=list(ENCODINGS),
                        help="frame encodings, comma-separated (raw,jpeg); audio is PCM")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time per measurement; each cell is measured twice (infer, decode+infer)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="the engine's intra-op threads (default: the engine settings')")
    parser.add_argument("--decode-threads", type=int,
                        help="the decode pool's threads (default: the worker settings', else from the cores)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")


def main(settings: SluiceSettings, args: argparse.Namespace, console: Console) -> int:
    threads = args.threads or settings.engine.intra_op_threads
    pool_threads = decode_threads(args.decode_threads or settings.worker.decode_threads)
    try:
        with _model(settings, args.model or settings.engine.frame_model, args.batch) as spec:
            encodings = args.encoding if spec.modality == FRAME.name else ["pcm"]
            with load_engine(args.engine, spec, threads, device=args.device, precision=args.precision) as engine:
                pool = DecodePool(decoder_for(spec, Codec(), settings.worker.max_frame_pixels), pool_threads)
                try:
                    cells = asyncio.run(_bench(engine, pool, args.batch, encodings, args.seconds))
                finally:
                    pool.close()
    except SluiceError as exc:  # no such model, an engine or device this host lacks: one line, as the CLI says errors
        # Escaped: a message naming an extra ('sluice[tensorrt]') is not markup.
        Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    report = {
        "model": f"{spec.name} v{spec.version}", "engine": engine.kind, "device": args.device,
        "precision": spec.engine.precision if args.precision == "auto" else args.precision,
        "intra_op_threads": threads, "decode_threads": pool_threads, "cells": cells,
    }  # fmt: skip
    _print(console, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


@contextlib.contextmanager
def _model(settings: SluiceSettings, name: str, batch_sizes: list[int]) -> Iterator[ModelSpec]:
    """`name` from the configured repository, else built from the zoo into a repository that lasts the run."""
    repository = ModelRepository(settings.engine.model_repository)
    if repository.versions(name):
        yield repository.resolve(name)
        return
    try:
        from engines import zoo
    except ImportError as exc:
        raise ModelNotFound(
            f"no model {name!r} in repository {repository.root}; zoo models are built with torch, onnx and "
            f"onnxscript (pip install 'sluice[train]'), and {exc.name} is missing"
        ) from exc
    if name not in zoo.ZOO:
        raise ModelNotFound(f"no model {name!r} in repository {repository.root}, nor in the zoo ({', '.join(zoo.ZOO)})")
    # The bench's batch sizes as the buckets, so an engine with fixed shapes (CUDA graphs) prepares each of them.
    batching = Batching(max_batch_size=max(batch_sizes), preferred_batch_sizes=batch_sizes)
    with tempfile.TemporaryDirectory(prefix="sluice-zoo-") as root:
        yield zoo.write_zoo_model(name, Path(root), batching=batching)


async def _bench(
    engine: Engine, pool: DecodePool, batch_sizes: list[int], encodings: list[str], seconds: float
) -> list[dict[str, Any]]:
    engine.warmup(batch_sizes)  # as a worker does before it takes traffic
    codec = Codec()
    cells = []
    for encoding in encodings:
        messages = _messages(engine.spec, encoding, max(batch_sizes) * _BATCHES_OF_MESSAGES, codec)
        for size in batch_sizes:
            batches = [messages[start : start + size] for start in range(0, len(messages) - size + 1, size)]
            decoded = await pool.decode(batches[0])
            if decoded.failures:
                position, exc = decoded.failures[0]
                raise ConfigError(f"the synthetic inputs do not fit {engine.spec.name}: input {position}: {exc}")
            infer_rate, infer_latency = await _measure(functools.partial(_infer, engine, decoded.batch), size, seconds)
            decode_infer = functools.partial(_decode_infer, engine, pool, itertools.cycle(batches))
            decode_rate, decode_latency = await _measure(decode_infer, size, seconds)
            cells.append({
                "batch_size": size, "encoding": encoding,
                "infer_items_per_s": infer_rate, "infer_p50_ms": infer_latency[0], "infer_p99_ms": infer_latency[1],
                "decode_infer_items_per_s": decode_rate, "decode_infer_p50_ms": decode_latency[0],
                "decode_infer_p99_ms": decode_latency[1], "vs_infer": round(decode_rate / infer_rate, 2),
            })  # fmt: skip
    return cells


async def _infer(engine: Engine, batch: np.ndarray) -> None:
    engine.infer(batch)


async def _decode_infer(engine: Engine, pool: DecodePool, batches: Iterator[list[bytes]]) -> None:
    engine.infer((await pool.decode(next(batches))).batch)


async def _measure(step: Callable[[], Awaitable[None]], size: int, seconds: float) -> tuple[float, tuple[float, float]]:
    """Calls of `step` (a batch of `size` items each) for `seconds`, one at least: items/s, and the p50 and p99
    of one call in ms."""
    await step()  # the first call at a shape, or on a fresh thread: not a sample
    latencies = []
    started = time.perf_counter()
    while not latencies or time.perf_counter() - started < seconds:
        call_started = time.perf_counter()
        await step()
        latencies.append(time.perf_counter() - call_started)
    rate = len(latencies) * size / (time.perf_counter() - started)
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return round(rate, 1), (round(float(p50), 2), round(float(p99), 2))


def _messages(spec: ModelSpec, encoding: str, count: int, codec: Codec) -> list[bytes]:
    """`count` wire-format input messages for `spec`, from the simulator's scenes, as the device SDK writes them."""
    if spec.modality != FRAME.name:
        sample_rate = cast(AudioPreprocessing, spec.preprocessing).sample_rate  # as AudioDecoder checked
        scenes = [MicrophoneScene(np.random.default_rng(i), sample_rate, spec.input.shape[0]) for i in range(_DEVICES)]
        chunks = [scenes[i % _DEVICES].next_chunk() for i in range(count)]
        return [
            codec.write(AudioChunk(
                device_id=f"mic-{i % _DEVICES}", trace_id=f"bench-{i}", seq=i, capture_time_us=0, encoding="PCM_S16LE",
                sample_rate=sample_rate, channels=1, data=pcm.astype("<i2").tobytes(), label=label,
            ))
            for i, (pcm, label) in enumerate(chunks)
        ]  # fmt: skip
    height, width, _ = spec.input.shape
    scenes = [CameraScene(np.random.default_rng(i), height, width) for i in range(_DEVICES)]
    messages = []
    for i in range(count):
        frame, label = scenes[i % _DEVICES].next_frame()
        if encoding == "jpeg":
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=_JPEG_QUALITY)
            data = buf.getvalue()
        else:
            data = frame.tobytes()
        messages.append(codec.write(FrameChunk(
            device_id=f"cam-{i % _DEVICES}", trace_id=f"bench-{i}", seq=i, capture_time_us=0,
            encoding=encoding.upper(), height=height, width=width, channels=3, dtype="uint8", data=data, label=label,
        )))  # fmt: skip
    return messages


def _print(console: Console, report: dict[str, Any]) -> None:
    table = Table(
        "batch", "encoding", "infer items/s", "p50 ms", "p99 ms", "decode+infer items/s", "p50 ms", "p99 ms",
        "vs infer",
        title=f"{report['model']} on {report['engine']} ({report['device']}, {report['precision']}, "
        f"{report['intra_op_threads']} intra-op threads, {report['decode_threads']} decode threads; same run)",
    )  # fmt: skip
    for cell in report["cells"]:
        table.add_row(*(str(value) for value in cell.values()))
    console.print(table)
