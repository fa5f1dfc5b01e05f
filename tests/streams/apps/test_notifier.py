"""The notifier's outcomes for results it cannot alert on: every result ends as alerts, suppressions or
one dead letter with why, and none stops the agent. The end-to-end test runs `sluice notifier` as its own
process on the real broker and redis-server, fed with results published straight onto the results topic
(as a producer that bypasses the worker would)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from consumers.kafka import make_producer
from schemas.codec import Codec
from schemas.records import DeadLetter, InferenceResult, Source, dead_letter_for
from streams.apps.notifier import _without_original, request_size, result_problem
from streams.local.harness import Components
from streams.local.observer import Observed, OutputObserver
from streams.settings import SluiceSettings
from tests.records import make_result

# Formatted with a name of the test's own: the stack's Redis, and so the cooldowns, are shared by the session.
RULES = """
[[rules]]
name = "{name}"
modality = "frame"
labels = ["circle"]
min_score = 0.5
cooldown_s = 600
"""
HEADERS = [("origin", b"test"), ("attempt", None)]
LIMIT = 256 * 1024  # the notifier's producer limit here: an alert past it is cheap to make
HUGE = 2_000_000  # a 2 MB field, as a producer that skips the SDK may write


def test_a_worker_result_has_no_problem() -> None:
    assert result_problem(make_result(1), max_label_chars=256) is None


def test_enormous_device_ids_trace_ids_and_labels_are_problems() -> None:
    device = result_problem(make_result(1, device_id="d" * HUGE), max_label_chars=256)
    assert device is not None and "device_id" in device and f"{HUGE} chars" in device and len(device) < 300
    trace = result_problem(replace(make_result(1), trace_id="t" * 129), max_label_chars=256)
    assert trace is not None and "trace_id is 129 characters" in trace
    label = result_problem(make_result(1, runner_up="x" * HUGE), max_label_chars=256)
    assert label is not None and f"top_k[1].label is {HUGE} characters" in label and "MAX_LABEL_CHARS" in label
    assert result_problem(make_result(1, runner_up="x" * 256), max_label_chars=256) is None


async def test_request_size_is_the_producers_own_check() -> None:
    """The notifier measures before it takes a cooldown; the producer must agree with that measure."""
    key, value = b"cam-1", bytes(1000)
    producer = AIOKafkaProducer(max_request_size=request_size(key, value))
    try:
        producer._serialize(key, value, [])  # exactly at the limit: accepted
        with pytest.raises(MessageSizeTooLargeError):
            producer._serialize(key, value + b"x", [])
    finally:
        await producer.stop()


def test_a_dead_letter_without_its_original_keeps_why_and_where() -> None:
    letter = dead_letter_for(Source("results", 3, 7), b"k" * 10, b"v" * HUGE, "validate", "InvalidResult",
                             "device_id is too long", "notifier@h:1", [("origin", b"test")])  # fmt: skip
    stripped = _without_original(letter)
    assert (stripped.key, stripped.value, stripped.headers) == (None, None, [])
    assert stripped.source == letter.source and (stripped.stage, stripped.error_type) == ("validate", "InvalidResult")
    assert stripped.reason.startswith("device_id is too long") and f"{10 + HUGE + 10} bytes dropped" in stripped.reason
    assert len(Codec().write(stripped)) < 300


async def _publish(settings: SluiceSettings, results: dict[str, InferenceResult]) -> dict[str, Source]:
    """Each result onto the results topic, keyed by its device (one partition per device, so in order)."""
    codec = Codec()
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        landed = {}
        for name, result in results.items():
            key = result.device_id.encode()[:64]
            m = await producer.send_and_wait(settings.kafka.topics.results, codec.write(result), key=key,
                                             headers=HEADERS)  # fmt: skip
            landed[name] = Source(m.topic, m.partition, m.offset)
        return landed
    finally:
        await producer.stop()


def test_oversized_alerts_and_enormous_fields_are_dead_lettered_and_stop_nothing(
    settings: SluiceSettings, components: Components, tmp_path: Path
) -> None:
    rule = f"circle-seen-{uuid.uuid4().hex[:8]}"
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES.format(name=rule))
    settings = settings.model_copy(update={"notifier": settings.notifier.model_copy(update={"rules_path": rules})})
    notifier_settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"max_request_size": LIMIT})}
    )
    notifier = components.start("notifier", ["notifier"], settings=notifier_settings)
    # A cooldown key someone else filled with a list: the script fails on it (WRONGTYPE), for this device only.
    jammed = "cam-jammed"
    with redis.Redis.from_url(settings.redis.url) as client:
        client.rpush(f"sluice:cooldown:{rule}:{jammed}", "not an alert id")

    # Offsets number the results' sources, so that each alert has an id of its own.
    results = {
        "normal cam-0": make_result(0, device_id="cam-0"),
        # Its alert copies a 300 KB source topic: over the limit. It must not take cam-big's cooldown...
        "alert too large": make_result(1, device_id="cam-big", topic="frames-" + "x" * 300_000),
        # ...so this one, from the same device (same key, same partition, after it), still alerts.
        "normal cam-big": make_result(2, device_id="cam-big"),
        "2 MB label": make_result(3, device_id="cam-label", runner_up="x" * HUGE),
        "2 MB device id": make_result(4, device_id="d" * HUGE),
        "normal cam-1": make_result(5, device_id="cam-1"),
        "no rule matches": make_result(6, device_id="cam-2", label="square"),
        "unexpected error": make_result(7, device_id=jammed),
    }
    normal = {"normal cam-0", "normal cam-big", "normal cam-1"}
    bad = {"alert too large", "2 MB label", "2 MB device id", "unexpected error"}

    async def scenario() -> tuple[dict[str, Source], Observed]:
        observer = OutputObserver(settings)
        await observer.start()
        try:
            landed = await _publish(settings, results)
            await observer.wait_for(lambda o: len(o.alerts) >= len(normal) and len(o.dead_letters) >= len(bad),
                                    timeout_s=60)  # fmt: skip
            await asyncio.sleep(1.5)  # anything extra (a duplicate, a letter for a good result) would show by now
            return landed, observer.observed
        finally:
            await observer.stop()

    landed, observed = asyncio.run(scenario())
    alerted = {a.source for a in observed.alerts}
    assert alerted == {results[name].source for name in normal}, "normal results alert, the others do not"
    assert len(observed.alerts) == len(normal)
    letters: dict[Source, DeadLetter] = {d.source: d for d in observed.dead_letters}
    assert set(letters) == {landed[name] for name in bad}, "exactly the bad results are dead-lettered"
    assert len(observed.dead_letters) == len(bad)

    too_large = letters[landed["alert too large"]]
    assert (too_large.stage, too_large.error_type) == ("notify", "AlertTooLarge")
    assert f"({LIMIT}, kafka.max_request_size)" in too_large.reason
    assert too_large.value is None and "bytes dropped: too large for a dead letter" in too_large.reason
    label = letters[landed["2 MB label"]]
    assert (label.stage, label.error_type) == ("validate", "InvalidResult")
    assert f"top_k[1].label is {HUGE} characters" in label.reason and label.value is None
    device = letters[landed["2 MB device id"]]
    assert device.stage == "validate" and "device_id" in device.reason and f"{HUGE} chars" in device.reason
    unexpected = letters[landed["unexpected error"]]
    assert (unexpected.stage, unexpected.error_type) == ("notify", "ResponseError") and "WRONGTYPE" in unexpected.reason
    assert unexpected.value == Codec().write(results["unexpected error"]) and unexpected.key == jammed.encode(), \
        "a dead letter that fits keeps the original message, for replay"
    assert [(h.key, h.value) for h in unexpected.headers] == HEADERS
    for letter in letters.values():
        assert letter.component.startswith("notifier@")

    assert notifier.alive(), f"the notifier died:\n{notifier.log_tail()}"
    assert [p.pid for p in components.started if p.alive()] == [notifier.pid], "it never restarted"
    # Faust logs "Crashed reason=..." when an exception escapes an agent (it then restarts the agent).
    assert "Crashed reason" not in notifier.log_path.read_text(), "no exception escaped into Faust"

