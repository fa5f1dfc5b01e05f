"""The device SDK: what a camera or microphone program imports to publish to Sluice.

    async with DeviceClient("kafka:9092") as client:
        await client.publish_frame("cam-7", frame)            # HxWx3 uint8 RGB
        await client.publish_audio("mic-2", pcm, 16_000)      # int16, (samples,) or (samples, channels)

`publish_*` returns once the record is queued (linger batches records, lz4
compresses them) and hands back a future that resolves when the broker has it;
`wait=True` waits for that. The producer retries transient broker errors by
itself until `request_timeout_ms`; what still fails surfaces as `PublishError`
naming the device and topic. Input the workers could never use (wrong dtype or
rank) raises `ValueError` here, before anything is sent.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from typing import Any, Literal

import numpy as np
import simplejpeg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from schemas.codec import Codec
from schemas.errors import SluiceError
from schemas.records import AudioChunk, FrameChunk, identity_problem, now_us


class PublishError(SluiceError):
    """The broker did not take a record after the producer's own retries."""


class DeviceClient:
    def __init__(
        self,
        bootstrap_servers: str,
        *,
        frames_topic: str = "sluice.frames",
        audio_topic: str = "sluice.audio",
        client_id: str = "sluice-device",
        linger_ms: int = 5,
        compression_type: str | None = "lz4",
        acks: str | int = "all",
        request_timeout_ms: int = 30_000,
        max_request_size: int = 4 * 1024 * 1024,
        codec: Codec | None = None,
        **producer_options: Any,
    ) -> None:
        """`codec`: the pinned schema ids by default; `schemas.registry.codec_for(...)` for a schema registry's."""
        self.frames_topic = frames_topic
        self.audio_topic = audio_topic
        self._codec = codec or Codec()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            linger_ms=linger_ms,
            compression_type=compression_type,
            acks=acks,
            request_timeout_ms=request_timeout_ms,
            max_request_size=max_request_size,
            **producer_options,
        )
        self._seq: dict[str, int] = {}

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            raise PublishError(f"cannot reach the Kafka cluster: {exc}") from exc

    async def stop(self) -> None:
        """Flush what is queued, then close."""
        await self._producer.stop()

    async def flush(self) -> None:
        await self._producer.flush()

    async def __aenter__(self) -> DeviceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @staticmethod
    def _check_identity(device_id: str, trace_id: str) -> str:
        problem = identity_problem(device_id, trace_id)
        if problem is not None:
            raise ValueError(problem)
        return trace_id

    def _next_seq(self, device_id: str) -> int:
        seq = self._seq.get(device_id, 0)
        self._seq[device_id] = seq + 1
        return seq

    async def publish_frame(
        self,
        device_id: str,
        frame: np.ndarray,
        *,
        encoding: Literal["raw", "jpeg"] = "raw",
        jpeg_quality: int = 90,
        capture_time_us: int | None = None,
        label: str | None = None,
        trace_id: str | None = None,
        wait: bool = False,
    ) -> asyncio.Future[RecordMetadata] | RecordMetadata:
        """Publish one HxWxC (C = 1 or 3) uint8 frame, raw or as JPEG."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (1, 3):
            raise ValueError(f"frame must be HxWx1 or HxWx3 uint8, got {frame.shape} {frame.dtype}")
        height, width, channels = frame.shape
        if encoding == "jpeg":
            data = simplejpeg.encode_jpeg(
                np.ascontiguousarray(frame), quality=jpeg_quality, colorspace="RGB" if channels == 3 else "GRAY"
            )
        else:
            data = np.ascontiguousarray(frame).tobytes()
        record = FrameChunk(
            device_id=device_id,
            trace_id=self._check_identity(device_id, trace_id or uuid.uuid4().hex),
            seq=self._next_seq(device_id),
            capture_time_us=capture_time_us if capture_time_us is not None else now_us(),
            encoding=encoding.upper(),
            height=height,
            width=width,
            channels=channels,
            dtype="uint8",
            data=data,
            label=label,
        )
        return await self._send(
            self.frames_topic, device_id, self._codec.write(record, topic=self.frames_topic), wait
        )

    async def publish_audio(
        self,
        device_id: str,
        pcm: np.ndarray,
        sample_rate: int,
        *,
        capture_time_us: int | None = None,
        label: str | None = None,
        trace_id: str | None = None,
        wait: bool = False,
    ) -> asyncio.Future[RecordMetadata] | RecordMetadata:
        """Publish one chunk of int16 PCM, shaped (samples,) or (samples, channels)."""
        if pcm.dtype != np.int16 or pcm.ndim not in (1, 2) or pcm.size == 0:
            raise ValueError(f"audio must be non-empty int16 (samples,) or (samples, channels), got {pcm.shape} {pcm.dtype}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        channels = 1 if pcm.ndim == 1 else pcm.shape[1]
        record = AudioChunk(
            device_id=device_id,
            trace_id=self._check_identity(device_id, trace_id or uuid.uuid4().hex),
            seq=self._next_seq(device_id),
            capture_time_us=capture_time_us if capture_time_us is not None else now_us(),
            encoding="PCM_S16LE",
            sample_rate=sample_rate,
            channels=channels,
            data=np.ascontiguousarray(pcm, dtype="<i2").tobytes(),
            label=label,
        )
        return await self._send(
            self.audio_topic, device_id, self._codec.write(record, topic=self.audio_topic), wait
        )

    async def _send(
        self, topic: str, device_id: str, value: bytes, wait: bool
    ) -> asyncio.Future[RecordMetadata] | RecordMetadata:
        try:
            delivery = await self._producer.send(topic, value, key=device_id.encode())
            return await delivery if wait else _wrap_errors(delivery, device_id, topic)
        except KafkaError as exc:
            raise PublishError(f"{device_id}: could not publish to {topic}: {exc}") from exc


def _wrap_errors(delivery: asyncio.Future[RecordMetadata], device_id: str, topic: str) -> asyncio.Future[RecordMetadata]:
    """A future that fails with PublishError, not a bare KafkaError, when the broker refuses the record."""
    outcome: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()

    def done(future: asyncio.Future[RecordMetadata]) -> None:
        if outcome.cancelled():
            return
        if future.cancelled():
            outcome.cancel()
        elif (exc := future.exception()) is not None:
            outcome.set_exception(PublishError(f"{device_id}: broker refused a record for {topic}: {exc}"))
        else:
            outcome.set_result(future.result())

    delivery.add_done_callback(done)
    return outcome
