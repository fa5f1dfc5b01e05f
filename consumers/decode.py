"""From a Kafka message to one model input, following the model's declared contract.

Each decoder checks a record against `ModelSpec` (input shape and dtype,
preprocessing) and returns an array shaped like one item of the model's input.
Anything that cannot become such an array raises `InvalidInput` with a reason a
human can act on; the worker sends that message to the dead-letter topic.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from engines.repository import AudioPreprocessing, ModelSpec
from schemas.codec import Codec, SchemaError
from schemas.errors import SluiceError
from schemas.records import AudioChunk, FrameChunk, InputChunk
from schemas.topics import AUDIO, FRAME, Modality


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


class FrameDecoder:
    modality: Modality = FRAME

    def __init__(self, spec: ModelSpec, codec: Codec) -> None:
        self.spec = spec
        self.codec = codec
        self.height, self.width, self.channels = spec.input.shape

    def decode(self, value: bytes | None) -> DecodedInput:
        record = _read(self.codec, value, FrameChunk)
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
        if len(data) != h * w * c:
            raise InvalidInput(
                "validate", f"wrong shape: payload has {len(data)} bytes but the header says {h}x{w}x{c} = {h * w * c}"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, c)

    def _from_jpeg(self, data: bytes) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.mode not in ("RGB", "L"):
                    img = img.convert("RGB")
                array = np.asarray(img)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise InvalidInput("decode", f"JPEG payload does not decode: {exc}") from exc
        return array[:, :, None] if array.ndim == 2 else array


class AudioDecoder:
    modality: Modality = AUDIO

    def __init__(self, spec: ModelSpec, codec: Codec) -> None:
        if not isinstance(spec.preprocessing, AudioPreprocessing):
            raise ValueError(f"model {spec.name} declares no audio preprocessing")
        self.spec = spec
        self.codec = codec
        self.sample_rate = spec.preprocessing.sample_rate
        (self.num_samples,) = spec.input.shape

    def decode(self, value: bytes | None) -> DecodedInput:
        record = _read(self.codec, value, AudioChunk)
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


def _read(codec: Codec, value: bytes | None, record_type: type[R]) -> R:
    try:
        return codec.read(value, record_type)
    except SchemaError as exc:
        raise InvalidInput("decode", str(exc)) from exc


Decoder = FrameDecoder | AudioDecoder
_DECODERS: dict[str, type[Decoder]] = {d.modality.name: d for d in (FrameDecoder, AudioDecoder)}


def decoder_for(spec: ModelSpec, codec: Codec) -> Decoder:
    return _DECODERS[spec.modality](spec, codec)
