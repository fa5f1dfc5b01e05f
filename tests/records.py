"""Example records and payloads for tests: one factory each, so a change is made once here, not in each test file."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from schemas.records import InferenceResult, LabelScore, LatencyBreakdown

BASE_TIME_US = 1_800_000_000_000_000


def make_result(
    offset: int, *, label: str = "circle", score: float = 0.9, runner_up: str = "triangle", modality: str = "FRAME",
    device_id: str = "cam-1", partition: int = 0, topic: str = "frames",
) -> InferenceResult:  # fmt: skip
    """A result for the input at (topic, partition, offset), its top-1 `label` at `score`."""
    return InferenceResult(
        trace_id=f"t{offset}", device_id=device_id, modality=modality, seq=offset,
        capture_time_us=BASE_TIME_US + offset, source_topic=topic, source_partition=partition, source_offset=offset,
        model_name="frame_classifier", model_version=1,
        top_k=[LabelScore(label, score), LabelScore(runner_up, round(1 - score, 6))], ground_truth="circle",
        latency=LatencyBreakdown(queue_ms=1.0, batch_wait_ms=2.0, decode_ms=0.5, inference_ms=3.0, batch_size=4),
        worker_id="w", result_time_us=BASE_TIME_US + 100_000 + offset,
    )  # fmt: skip


def jpeg(width: int, height: int) -> bytes:
    """A plain grey JPEG of that size."""
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def declaring(jpeg_bytes: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF0) rewritten to declare other dimensions: a decompression
    bomb in a few hundred bytes."""
    sof = jpeg_bytes.index(b"\xff\xc0")
    return jpeg_bytes[: sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg_bytes[sof + 9 :]
