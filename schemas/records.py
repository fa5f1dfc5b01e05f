"""Typed records, one per schema, and the builders for what Sluice itself writes.

Each record is a dataclass whose fields are the `.avsc` file's fields;
`Codec.write(record)` and `Codec.read(value, RecordType)` move them across the
wire. Code above this floor passes these records, never hand-built dicts, so a
field renamed in a schema is renamed in one place.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field, fields
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

from schemas.codec import ALERT, AUDIO_CHUNK, DEAD_LETTER, DRIFT_EVENT, FRAME_CHUNK, INFERENCE_RESULT


class Source(NamedTuple):
    """Where an input sits in Kafka. It identifies the input: a redelivered input has the same source,
    so its result, alert and ClickHouse row do too (that is what deduplication keys on)."""

    topic: str
    partition: int
    offset: int


def now_us() -> int:
    return time.time_ns() // 1000


class Record:
    """Base of the typed records: plain conversion to and from the Avro dict form."""

    __slots__ = ()
    schema: ClassVar[str]

    def to_avro(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Record:
        return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_avro()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(slots=True)
class FrameChunk(Record):
    schema: ClassVar[str] = FRAME_CHUNK
    device_id: str
    trace_id: str
    seq: int
    capture_time_us: int
    encoding: str  # RAW | JPEG
    height: int
    width: int
    channels: int
    dtype: str
    data: bytes
    label: str | None = None  # ground truth, when the device knows it (the simulator does)


@dataclass(slots=True)
class AudioChunk(Record):
    schema: ClassVar[str] = AUDIO_CHUNK
    device_id: str
    trace_id: str
    seq: int
    capture_time_us: int
    encoding: str  # PCM_S16LE
    sample_rate: int
    channels: int
    data: bytes
    label: str | None = None


InputChunk = FrameChunk | AudioChunk


@dataclass(slots=True)
class LabelScore(Record):
    label: str
    score: float


@dataclass(slots=True)
class LatencyBreakdown(Record):
    """Where the time went, in milliseconds (see inference_result.avsc)."""

    queue_ms: float
    batch_wait_ms: float
    decode_ms: float
    inference_ms: float
    batch_size: int


@dataclass(slots=True)
class InferenceResult(Record):
    schema: ClassVar[str] = INFERENCE_RESULT
    trace_id: str
    device_id: str
    modality: str  # the modality's enum symbol: FRAME | AUDIO
    seq: int
    capture_time_us: int
    source_topic: str
    source_partition: int
    source_offset: int
    model_name: str
    model_version: int
    top_k: list[LabelScore]  # best first
    ground_truth: str | None
    latency: LatencyBreakdown
    worker_id: str
    result_time_us: int
    # Version 2 (inference_result_v2.avsc): what drift detection and analysts read; empty in version 1 records.
    input_stats: dict[str, float] = field(default_factory=dict)  # by name, see the schema's doc
    probabilities: list[float] = field(default_factory=list)  # in the model's label order
    prediction_entropy: float | None = None  # nats
    embedding: list[float] = field(default_factory=list)

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> InferenceResult:
        return cls(**{
            **data,
            "top_k": [LabelScore(**entry) for entry in data["top_k"]],
            "latency": LatencyBreakdown(**data["latency"]),
        })  # fmt: skip

    @property
    def source(self) -> Source:
        return Source(self.source_topic, self.source_partition, self.source_offset)

    @property
    def best(self) -> LabelScore | None:
        return self.top_k[0] if self.top_k else None


@dataclass(slots=True)
class Alert(Record):
    schema: ClassVar[str] = ALERT
    alert_id: str
    rule: str
    device_id: str
    modality: str
    label: str
    score: float
    trace_id: str
    capture_time_us: int
    source_topic: str
    source_partition: int
    source_offset: int
    cooldown_s: float
    alert_time_us: int
    # Version 2 (alert_v2.avsc); rule alerts keep the defaults, drift alerts fill them.
    severity: str = "WARNING"  # INFO | WARNING | CRITICAL
    details: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> Source:
        return Source(self.source_topic, self.source_partition, self.source_offset)


@dataclass(slots=True)
class DriftEvent(Record):
    """One drift test on one window of results (drift_event.avsc): what `drift_events` stores."""

    schema: ClassVar[str] = DRIFT_EVENT
    window_start_us: int
    window_end_us: int
    device_group: str  # a device id, or "all"
    modality: str  # the modality's enum symbol
    model_name: str
    model_version: int
    statistic: str
    test: str
    score: float
    threshold: float
    p_value: float | None
    drifted: bool
    reference_size: int
    current_size: int
    detected_at_us: int


@dataclass(slots=True)
class Header(Record):
    """One Kafka header of the original message."""

    key: str
    value: bytes | None


@dataclass(slots=True)
class DeadLetter(Record):
    schema: ClassVar[str] = DEAD_LETTER
    source_topic: str
    source_partition: int
    source_offset: int
    key: bytes | None
    value: bytes | None
    stage: str  # decode | validate | infer | result | insert | notify
    error_type: str
    reason: str  # a sentence a human can act on
    component: str  # which process, e.g. worker-frame@host:pid
    failed_time_us: int
    headers: list[Header] = field(default_factory=list)  # schema version 2; empty when read from version 1

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> DeadLetter:
        return cls(**{**data, "headers": [Header(**h) for h in data.get("headers", ())]})

    @property
    def source(self) -> Source:
        return Source(self.source_topic, self.source_partition, self.source_offset)


RECORD_TYPES: dict[str, type[Record]] = {
    t.schema: t for t in (FrameChunk, AudioChunk, InferenceResult, Alert, DeadLetter, DriftEvent)
}


# -- builders: the records Sluice writes ---------------------------------------------------------------


def result_for(
    chunk: InputChunk,
    modality_symbol: str,
    source: Source,
    model_name: str,
    model_version: int,
    top_k: list[LabelScore],
    latency: LatencyBreakdown,
    worker_id: str,
    *,
    input_stats: dict[str, float] | None = None,
    probabilities: list[float] | None = None,
    prediction_entropy: float | None = None,
) -> InferenceResult:
    """The one result of one input."""
    return InferenceResult(
        trace_id=chunk.trace_id,
        device_id=chunk.device_id,
        modality=modality_symbol,
        seq=chunk.seq,
        capture_time_us=chunk.capture_time_us,
        source_topic=source.topic,
        source_partition=source.partition,
        source_offset=source.offset,
        model_name=model_name,
        model_version=model_version,
        top_k=top_k,
        ground_truth=chunk.label,
        latency=latency,
        worker_id=worker_id,
        result_time_us=now_us(),
        input_stats=input_stats or {},
        probabilities=probabilities or [],
        prediction_entropy=prediction_entropy,
    )


def dead_letter_for(
    source: Source, key: bytes | None, value: bytes | None, stage: str, error_type: str, reason: str, component: str,
    headers: Iterable[tuple[str, bytes | None]] = (),
) -> DeadLetter:
    """A dead letter keeps the original key, value and headers, so a fixed worker (or a human) can replay it."""
    return DeadLetter(
        source_topic=source.topic,
        source_partition=source.partition,
        source_offset=source.offset,
        key=key,
        value=value,
        stage=stage,
        error_type=error_type,
        reason=reason,
        component=component,
        failed_time_us=now_us(),
        headers=[Header(k, v) for k, v in headers],
    )


def alert_id(rule: str, source: Source) -> str:
    """Derived from the rule and the result's source: a redelivered result re-emits the same id."""
    return hashlib.sha256(f"{rule}|{source.topic}|{source.partition}|{source.offset}".encode()).hexdigest()[:32]


def alert_for(rule: str, cooldown_s: float, result: InferenceResult, label: str, score: float) -> Alert:
    return Alert(
        alert_id=alert_id(rule, result.source),
        rule=rule,
        device_id=result.device_id,
        modality=result.modality,
        label=label,
        score=score,
        trace_id=result.trace_id,
        capture_time_us=result.capture_time_us,
        source_topic=result.source_topic,
        source_partition=result.source_partition,
        source_offset=result.source_offset,
        cooldown_s=cooldown_s,
        alert_time_us=now_us(),
    )


# -- what every input must satisfy, whoever sent it -----------------------------------------------------

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
TRACE_ID_MAX = 128


def identity_problem(device_id: str, trace_id: str) -> str | None:
    """Why a device or trace id is unusable (it keys partitions, metrics labels and ClickHouse rows), or None."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        shown = device_id if len(device_id) <= 40 else f"{device_id[:40]}... ({len(device_id)} chars)"
        return (f"device_id {shown!r} is not 1-128 characters of letters, digits and ._:@/- "
                "starting with a letter or digit")  # fmt: skip
    if len(trace_id) > TRACE_ID_MAX:
        return f"trace_id is {len(trace_id)} characters; at most {TRACE_ID_MAX}"
    return None
