"""From a Kafka message to one model input, following the model's declared contract.

Each decoder checks a record against `ModelSpec` (input shape and dtype,
preprocessing) and writes an array shaped like one item of the model's input.
Anything that cannot become such an array raises `InvalidInput` with a reason a
human can act on; the worker sends that message to the dead-letter topic.

JPEG is decoded by libjpeg-turbo (`simplejpeg`), which releases the GIL, so a
`DecodePool` decodes the inputs of one batch on several threads at once, each
straight into its rows of the batch array the engine takes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import simplejpeg
from PIL import Image

from engines.repository import AudioPreprocessing, ModelSpec
from schemas.codec import Codec, SchemaError
from schemas.errors import SluiceError
from schemas.records import AudioChunk, FrameChunk, InputChunk, identity_problem
from schemas.topics import AUDIO, FRAME


R = TypeVar("R", FrameChunk, AudioChunk)


class InvalidInput(SluiceError, ValueError):
    """A message that cannot become a model input. `stage` says where it failed:
    "decode" (wire format, Avro) or "validate" (shape, dtype, sample rate)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@dataclass(slots=True)
class DecodedInput:
    record: InputChunk  # the input record, its payload bytes dropped
    item: np.ndarray  # one model input, shaped spec.input.shape


# A camera frame larger than this is refused before it is decoded: a 629-byte JPEG can declare
# 10000x10000 pixels and cost a gigabyte to decode. 4096x4096 covers 4K cameras.
DEFAULT_MAX_FRAME_PIXELS = 4096 * 4096

_JPEG_START = b"\xff\xd8"  # the SOI marker every JPEG begins with
_JPEG_END = b"\xff\xd9"  # the EOI marker; a JPEG without it was cut off


class FrameDecoder:
    def __init__(self, spec: ModelSpec, codec: Codec, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        self.spec = spec
        self.codec = codec
        self.max_pixels = max_pixels
        self.height, self.width, self.channels = spec.input.shape

    def decode(self, value: bytes | None) -> DecodedInput:
        """One input, in an array of its own."""
        return self.decode_into(value, np.empty(self.spec.input.shape, dtype=self.spec.input.dtype))

    def decode_into(self, value: bytes | None, out: np.ndarray) -> DecodedInput:
        """One input, written into `out` (a row of a batch, shaped like one model input); its item is `out`."""
        record, data = self.read(value)
        self.payload_into(record, data, out)
        return DecodedInput(record, out)

    def read(self, value: bytes | None) -> tuple[FrameChunk, bytes]:
        """The frame record, its identity checked, and its payload, taken off the record (which the
        result keeps while the batch is in flight)."""
        record = _read(self.codec, value, FrameChunk)
        _check_identity(record)
        data, record.data = record.data, b""
        return record, data

    def payload_into(self, record: FrameChunk, data: bytes, out: np.ndarray) -> None:
        """The payload of a frame `read` returned, decoded and checked, into `out` as one model input."""
        if record.encoding == "JPEG":
            self._jpeg_into(data, out)
        else:
            self._fit_into(self._from_raw(record, data), out)

    def jpeg_size(self, data: bytes) -> tuple[int, int]:
        """(height, width) that a JPEG payload declares, once it is known to be a whole JPEG within the
        pixel limit. Reads the header only: nothing has been decoded when a bomb is refused."""
        if not data.rstrip(b"\x00").endswith(_JPEG_END):
            raise InvalidInput("decode", f"JPEG payload of {len(data)} bytes is truncated (no end-of-image marker)")
        if not data.startswith(_JPEG_START):
            raise InvalidInput("decode", f"payload is not JPEG: it starts with {data[:4]!r}, not the SOI marker")
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise InvalidInput("decode", f"JPEG payload does not decode: {exc}") from exc
        self._check_pixels(width, height)
        return height, width

    def _jpeg_into(self, data: bytes, out: np.ndarray) -> None:
        height, width = self.jpeg_size(data)
        # Not strict: libjpeg's recoverable warnings (extraneous bytes before a marker, which some camera
        # encoders emit) were tolerated when PIL decoded frames, and still are; its errors still raise.
        # libjpeg-turbo converts a grayscale JPEG to RGB itself.
        try:
            if (height, width) == (self.height, self.width):
                simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=False)  # straight into the row
                return
            # A larger camera frame is decoded already scaled down by 1/2, 1/4 or 1/8 in libjpeg's inverse
            # DCT, to the smallest such size that still covers the model's input: a 1920x1080 frame for a
            # 224x224 model decodes as 480x270, a sixteenth of the pixels to decode, convert and resize. DCT
            # scaling is itself a low-pass filter, so the bilinear resize that finishes the job (shrinking by
            # less than 2x) gives what a bilinear resize of the whole frame gives, within JPEG's error.
            image = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=self.height, min_width=self.width, strict=False
            )
        except ValueError as exc:
            raise InvalidInput("decode", f"JPEG payload does not decode: {exc}") from exc
        self._fit_into(image, out)

    def _fit_into(self, image: np.ndarray, out: np.ndarray) -> None:
        """`image` (HxWx1 or HxWx3 uint8) into `out` as the model's input: cameras of other resolutions are
        served, not rejected, resized bilinearly (the only resize FramePreprocessing allows), and a
        grayscale camera's channel is replicated to RGB."""
        if image.shape[:2] != (self.height, self.width):
            gray = image.shape[2] == 1
            picture = Image.fromarray(image[:, :, 0] if gray else image)
            resized = np.asarray(picture.resize((self.width, self.height), Image.BILINEAR))
            image = resized[:, :, None] if gray else resized
        np.copyto(out, image)  # broadcasts one gray channel to three

    def _from_raw(self, record: FrameChunk, data: bytes) -> np.ndarray:
        h, w, c = record.height, record.width, record.channels
        if record.dtype != "uint8":
            raise InvalidInput("validate", f"RAW frames must be uint8, this one says dtype={record.dtype!r}")
        if h <= 0 or w <= 0 or c not in (1, 3):
            raise InvalidInput("validate", f"unsupported frame shape {h}x{w}x{c}: need positive sides and 1 or 3 channels")
        self._check_pixels(w, h)
        if len(data) != h * w * c:
            raise InvalidInput(
                "validate", f"wrong shape: payload has {len(data)} bytes but the header says {h}x{w}x{c} = {h * w * c}"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, c)

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise InvalidInput(
                "validate", f"frame of {width}x{height} pixels is over the limit of {self.max_pixels} "
                "(SLUICE_WORKER__MAX_FRAME_PIXELS); it was not decoded",
            )  # fmt: skip


class AudioDecoder:
    def __init__(self, spec: ModelSpec, codec: Codec) -> None:
        if not isinstance(spec.preprocessing, AudioPreprocessing):
            raise ValueError(f"model {spec.name} declares no audio preprocessing")
        self.spec = spec
        self.codec = codec
        self.sample_rate = spec.preprocessing.sample_rate
        (self.num_samples,) = spec.input.shape

    def decode(self, value: bytes | None) -> DecodedInput:
        """One input, in an array of its own."""
        return self.decode_into(value, np.empty(self.spec.input.shape, dtype=self.spec.input.dtype))

    def decode_into(self, value: bytes | None, out: np.ndarray) -> DecodedInput:
        """One input, written into `out` (a row of a batch, shaped like one model input); its item is `out`."""
        record = _read(self.codec, value, AudioChunk)
        _check_identity(record)
        data, record.data = record.data, b""
        channels = record.channels
        if record.sample_rate != self.sample_rate:
            raise InvalidInput(
                "validate",
                f"sample rate {record.sample_rate} Hz, but model {self.spec.name} v{self.spec.version} "
                f"expects {self.sample_rate} Hz (resample at the device)",
            )
        if channels < 1:
            raise InvalidInput("validate", f"channels must be at least 1, got {channels}")
        if len(data) % (2 * channels):
            raise InvalidInput(
                "validate", f"wrong shape: {len(data)} bytes is not a whole number of {channels}-channel int16 frames"
            )
        pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
        if len(pcm) == 0:
            raise InvalidInput("validate", "empty audio chunk")
        mono = pcm[:, 0] if channels == 1 else pcm.mean(axis=1).astype(np.int16)
        n = min(len(mono), self.num_samples)  # pad with silence, or crop
        out[:n] = mono[:n]
        out[n:] = 0
        return DecodedInput(record, out)


def _check_identity(record: InputChunk) -> None:
    problem = identity_problem(record.device_id, record.trace_id)
    if problem is not None:
        raise InvalidInput("validate", problem)


def _read(codec: Codec, value: bytes | None, record_type: type[R]) -> R:
    try:
        return codec.read(value, record_type)
    except SchemaError as exc:
        raise InvalidInput("decode", str(exc)) from exc


Decoder = FrameDecoder | AudioDecoder

# The decoder of each modality, given the model, the codec and the frame pixel limit.
_DECODERS: dict[str, Callable[[ModelSpec, Codec, int], Decoder]] = {
    FRAME.name: FrameDecoder,
    AUDIO.name: lambda spec, codec, _: AudioDecoder(spec, codec),
}


def decoder_for(spec: ModelSpec, codec: Codec, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> Decoder:
    return _DECODERS[spec.modality](spec, codec, max_frame_pixels)


@dataclass(slots=True)
class DecodedBatch:
    inputs: list[DecodedInput]  # in input order, only the ones that decoded; each item is its row of `batch`
    positions: list[int]  # index in `values` of each decoded input
    batch: np.ndarray  # [len(inputs), *spec.input.shape], contiguous: what the engine takes
    failures: list[tuple[int, Exception]]  # index in `values`, and why that input did not decode


# Decode threads when the settings name none: one per core this process may run on, since JPEG decode and
# resize release the GIL and so scale with cores (inference does not compete: a pipeline decodes a batch,
# then infers it). At most 8: a batch of 16 to 32 split further leaves each thread one or two inputs, and
# the part that holds the GIL (the Avro read) then decides the time.
_MAX_DEFAULT_DECODE_THREADS = 8


def decode_threads(configured: int | None) -> int:
    """The size of a worker's decode pool: `configured`, or one thread per available core, at most 8."""
    if configured is not None:
        return configured
    # The cores this process may run on (a container's cpuset), where the platform says.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, _MAX_DEFAULT_DECODE_THREADS))


class DecodePool:
    """Decodes a batch on threads of its own, never on the event loop's: the batch is cut into one
    contiguous chunk per thread, and each thread decodes its inputs straight into their rows of one
    preallocated batch array, so no item is copied again to build the batch."""

    def __init__(self, decoder: Decoder, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"a decode pool needs at least one thread, not {threads}")
        self.decoder = decoder
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"decode-{decoder.spec.modality}")

    async def decode(self, values: Sequence[bytes | None]) -> DecodedBatch:
        spec = self.decoder.spec
        batch = np.empty((len(values), *spec.input.shape), dtype=spec.input.dtype)
        loop = asyncio.get_running_loop()
        chunks = await asyncio.gather(*(
            loop.run_in_executor(self._executor, self._decode_rows, values, start, stop, batch)
            for start, stop in _chunk_bounds(len(values), self.threads)
        ))  # fmt: skip
        inputs: list[DecodedInput] = []
        positions: list[int] = []
        failures: list[tuple[int, Exception]] = []
        for chunk in chunks:
            for position, outcome in chunk:
                if isinstance(outcome, DecodedInput):
                    inputs.append(outcome)
                    positions.append(position)
                else:
                    failures.append((position, outcome))
        # Compact: decoded rows move up over the failed ones, in order. A row only ever moves to a lower
        # index, one no later row is read from, so the move is in place.
        for row, position in enumerate(positions):
            if row != position:
                batch[row] = batch[position]
            inputs[row].item = batch[row]
        return DecodedBatch(inputs, positions, batch[: len(inputs)], failures)

    def _decode_rows(
        self, values: Sequence[bytes | None], start: int, stop: int, batch: np.ndarray
    ) -> list[tuple[int, DecodedInput | Exception]]:
        outcomes: list[tuple[int, DecodedInput | Exception]] = []
        for position in range(start, stop):
            try:
                outcomes.append((position, self.decoder.decode_into(values[position], batch[position])))
            except Exception as exc:  # whatever one input raises is that input's failure, not the batch's
                outcomes.append((position, exc))
        return outcomes

    def close(self) -> None:
        """Stop the threads, once the chunks they are decoding are done."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """`range(n)` cut into at most `parts` contiguous chunks whose sizes differ by at most one."""
    parts = min(parts, n)
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]
