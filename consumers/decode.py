"""From a Kafka message to one model input, following the model's declared contract.

Each decoder checks a record against `ModelSpec` (input shape and dtype,
preprocessing) and returns an array shaped like one item of the model's input.
Anything that cannot become such an array raises `InvalidInput` with a reason a
human can act on; the worker sends that message to the dead-letter topic.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

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

_JPEG_END = b"\xff\xd9"  # the EOI marker; a JPEG without it was cut off


class FrameDecoder:
    def __init__(self, spec: ModelSpec, codec: Codec, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        self.spec = spec
        self.codec = codec
        self.max_pixels = max_pixels
        self.height, self.width, self.channels = spec.input.shape

    def decode(self, value: bytes | None) -> DecodedInput:
        record = _read(self.codec, value, FrameChunk)
        _check_identity(record)
        data, record.data = record.data, b""
        if record.encoding == "JPEG":
            image = self._from_jpeg(data)
        else:
            image = self._from_raw(record, data)
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)  # grayscale camera: replicate to RGB
        if image.shape[:2] != (self.height, self.width):
            # Cameras of other resolutions are served, not rejected: resized bilinearly (the only
            # resize FramePreprocessing allows) to the model's input size.
            image = np.asarray(Image.fromarray(image).resize((self.width, self.height), Image.BILINEAR))
        return DecodedInput(record, image)

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

    def _from_jpeg(self, data: bytes) -> np.ndarray:
        if not data.rstrip(b"\x00").endswith(_JPEG_END):
            raise InvalidInput("decode", f"JPEG payload of {len(data)} bytes is truncated (no end-of-image marker)")
        try:
            with warnings.catch_warnings():  # PIL warns of large images; the limit below is ours
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # reads the header only
            with img:
                if img.format != "JPEG":
                    raise InvalidInput("decode", f"payload is {img.format or 'an unknown format'}, not JPEG")
                self._check_pixels(*img.size)
                if img.mode not in ("RGB", "L"):
                    img = img.convert("RGB")
                array = np.asarray(img)
        except InvalidInput:
            raise
        except Image.DecompressionBombError as exc:
            raise InvalidInput("validate", f"JPEG is over the limit of {self.max_pixels} pixels: {exc}") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInput("decode", f"JPEG payload does not decode: {exc}") from exc
        return array[:, :, None] if array.ndim == 2 else array


class AudioDecoder:
    def __init__(self, spec: ModelSpec, codec: Codec) -> None:
        if not isinstance(spec.preprocessing, AudioPreprocessing):
            raise ValueError(f"model {spec.name} declares no audio preprocessing")
        self.spec = spec
        self.codec = codec
        self.sample_rate = spec.preprocessing.sample_rate
        (self.num_samples,) = spec.input.shape

    def decode(self, value: bytes | None) -> DecodedInput:
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
        item = np.zeros(self.num_samples, dtype=np.int16)  # pad with silence, or crop
        n = min(len(mono), self.num_samples)
        item[:n] = mono[:n]
        return DecodedInput(record, item)


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
