"""The notifier: a Faust app that turns results into alerts.

It consumes the results topic, evaluates the rules (`streams/apps/rules.toml` by
default) on each result, and publishes an Alert for each rule that fires and
whose per-device cooldown in Redis is open. Faust commits an offset only after
the agent has processed the event and the producer has flushed what it sent, so
delivery is at-least-once; alert ids are deterministic, so duplicates are
recognisable. Its Kafka connection (servers, TLS, SASL, group timings) comes from
the same `KafkaSettings` as every other process (`consumers/kafka.py`).

Every result ends as its alerts, its suppressions, no match, or one dead letter
that says why, and none stops the agent:
- it does not decode (stage "decode");
- it is not a result a worker makes: an unusable device or trace id, a label
  longer than a class name (stage "validate");
- an alert it fires would be larger than the producer may send
  (`kafka.max_request_size`), found before any cooldown is taken, so the refused
  alert closes no cooldown (stage "notify", `AlertTooLarge`);
- anything else raised while handling it (stage "notify", the exception).
A dead letter too large to send keeps the why and the coordinates and drops the
original message. While Redis cannot answer, the result waits for it
(`CooldownStore` retries) and `sluice_notifier_redis_up` is 0.
"""

from __future__ import annotations

import asyncio

import dataclasses
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faust.types import EventT
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from consumers.kafka import KafkaSettings, faust_broker_options
from consumers.metrics import Health, serve_metrics
from consumers.outcomes import source_of
from consumers.settings import RedisSettings
from schemas.codec import Codec, SchemaError
from schemas.errors import SluiceError
from schemas.records import Alert, DeadLetter, InferenceResult, dead_letter_for, identity_problem
from schemas.registry import SchemaRegistrySettings, codec_for
from streams.apps.rules import CooldownStore, Rule, RuleSet
from streams.apps.settings import NotifierSettings

log = logging.getLogger(__name__)

# An exception's message can quote a whole record; this much of it says what went wrong.
_REASON_MAX_CHARS = 2_000
# How often Redis is pinged for the gauge, which otherwise only moves while a result waits on Redis.
_REDIS_PROBE_S = 5.0


class AlertTooLarge(SluiceError):
    """An alert is larger than the producer may send: a result with an oversized field, or a
    SLUICE_KAFKA__MAX_REQUEST_SIZE too small for alerts."""


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter("sluice_notifier_alerts", "Alerts published", ["rule"], registry=registry)
        self.suppressed = Counter(
            "sluice_notifier_suppressed", "Matches suppressed by a cooldown", ["rule"], registry=registry
        )
        self.redis_up = Gauge(
            "sluice_notifier_redis_up", "1 while Redis answers, 0 while cooldown commands fail and are retried",
            registry=registry,
        )  # fmt: skip


def request_size(key: bytes | None, value: bytes | None) -> int:
    """What the producer counts against its max_request_size for one record (aiokafka's own estimate;
    the notifier sends no headers)."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, [])


def result_problem(result: InferenceResult, max_label_chars: int) -> str | None:
    """Why `result` cannot be from a Sluice worker, so no rule may fire on it, or None.
    Its device id keys a cooldown and is copied into alerts with its trace id."""
    if (problem := identity_problem(result.device_id, result.trace_id)) is not None:
        return problem
    for i, entry in enumerate(result.top_k):
        if len(entry.label) > max_label_chars:
            return (f"top_k[{i}].label is {len(entry.label)} characters, longer than a model's class name "
                    f"(at most {max_label_chars}, SLUICE_NOTIFIER__MAX_LABEL_CHARS)")  # fmt: skip
    return None


def _without_original(letter: DeadLetter) -> DeadLetter:
    """The message fills a whole request by itself: keep the why and the coordinates, drop its key, value
    and headers."""
    size = len(letter.key or b"") + len(letter.value or b"")
    size += sum(len(h.key) + len(h.value or b"") for h in letter.headers)
    reason = f"{letter.reason} (original message of {size} bytes dropped: too large for a dead letter)"
    return dataclasses.replace(letter, key=None, value=None, headers=[], reason=reason)


class Notifier:
    """What becomes of each result: alerts, suppressions, or a dead letter."""

    def __init__(
        self, rules: RuleSet, cooldowns: CooldownStore, codec: Codec, metrics: NotifierMetrics,
        alerts_topic: faust.TopicT, dead_letters_topic: faust.TopicT, max_request_size: int, max_label_chars: int,
    ) -> None:  # fmt: skip
        self._rules = rules
        self._cooldowns = cooldowns
        self._codec = codec
        self._metrics = metrics
        self._alerts_topic = alerts_topic
        self._dead_letters_topic = dead_letters_topic
        # The topics' names: with a schema registry, a record's subject follows from the topic it goes to.
        self._alerts_name = alerts_topic.get_topic_name()
        self._dead_letters_name = dead_letters_topic.get_topic_name()
        self._max_request_size = max_request_size
        self._max_label_chars = max_label_chars
        self.component = f"notifier@{socket.gethostname()}:{os.getpid()}"

    async def handle(self, event: EventT) -> None:
        """Handle one result. Raises only when its dead letter cannot be sent either."""
        try:
            await self._evaluate(event)
        except Exception as exc:  # one result's failure is that result's dead letter, never the agent's end
            if not isinstance(exc, SluiceError):
                log.exception("handling %s failed", source_of(event.message))
            await self._dead_letter(event, "notify", type(exc).__name__, str(exc))

    async def _evaluate(self, event: EventT) -> None:
        try:
            result = self._codec.read(event.value, InferenceResult)
        except SchemaError as exc:
            await self._dead_letter(event, "decode", type(exc).__name__, str(exc))
            return
        if (problem := result_problem(result, self._max_label_chars)) is not None:
            await self._dead_letter(event, "validate", "InvalidResult", problem)
            return
        # Every alert is encoded and measured before any cooldown is taken: a refused alert closes none.
        fired: list[tuple[Rule, Alert, bytes]] = []
        for rule in self._rules.rules:
            if (matched := rule.match(result)) is None:
                continue
            alert = rule.alert(result, *matched)
            value = self._codec.write(alert, topic=self._alerts_name)
            if (size := request_size(event.key, value)) > self._max_request_size:
                raise AlertTooLarge(f"the alert of rule {rule.name!r} is {size} bytes, more than the producer "
                                    f"may send ({self._max_request_size}, kafka.max_request_size)")  # fmt: skip
            fired.append((rule, alert, value))
        for rule, alert, value in fired:
            if await self._cooldowns.acquire(rule, result.device_id, alert.alert_id):
                await self._alerts_topic.send(key=event.key, value=value)
                self._metrics.alerts.labels(rule.name).inc()
            else:
                self._metrics.suppressed.labels(rule.name).inc()

    async def _dead_letter(self, event: EventT, stage: str, error_type: str, reason: str) -> None:
        message = event.message
        if len(reason) > _REASON_MAX_CHARS:
            reason = f"{reason[:_REASON_MAX_CHARS]}... ({len(reason)} characters)"
        log.warning("dead letter %s[%d]@%d (%s): %s", message.topic, message.partition, message.offset, stage, reason)
        letter = dead_letter_for(
            source_of(message), event.key, event.value, stage, error_type, reason, self.component,
            message.headers or (),
        )  # fmt: skip
        key, value = event.key, self._codec.write(letter, topic=self._dead_letters_name)
        if request_size(key, value) > self._max_request_size:
            key, value = None, self._codec.write(_without_original(letter), topic=self._dead_letters_name)
        await self._dead_letters_topic.send(key=key, value=value)


def stateless_app(app_id: str, kafka: KafkaSettings, role: str) -> faust.App:
    """A Faust app with no tables and raw bytes in and out: the notifier's and the drift monitor's."""
    return faust.App(
        app_id,
        **faust_broker_options(kafka, role=role),
        broker_commit_interval=0.5,
        store="memory://",
        # Faust creates a data directory even with the memory store and no tables; nothing durable lives
        # there, so it goes to the temp directory rather than into whatever directory the process runs in.
        datadir=Path(tempfile.gettempdir()) / f"{app_id}-data",
        topic_disable_leader=True,  # no tables, no leader election topic to create
        web_enabled=False,  # metrics are served by prometheus_client beside the app
        value_serializer="raw",
        key_serializer="raw",
    )


def create_app(
    kafka: KafkaSettings,
    settings: NotifierSettings,
    redis: RedisSettings,
    metrics_host: str = "127.0.0.1",
    on_ready: Callable[[], None] | None = None,
    schema_registry: SchemaRegistrySettings | None = None,
) -> faust.App:
    topics = kafka.topics
    rules = RuleSet.load(settings.rules_path)
    registry = CollectorRegistry()
    metrics = NotifierMetrics(registry)
    app = stateless_app(settings.app_id, kafka, role="notifier")
    results_topic = app.topic(topics.results, value_type=bytes, key_type=bytes)
    # No retries inside the client: the cooldown store's backoff is the one policy, and it logs each failure.
    client = Redis.from_url(redis.url, socket_timeout=redis.timeout_s, socket_connect_timeout=redis.timeout_s,
                            retry=Retry(NoBackoff(), 0))  # fmt: skip
    cooldowns = CooldownStore(client, retry_max_s=redis.retry_max_s, on_reachable=metrics.redis_up.set)
    notifier = Notifier(
        rules, cooldowns, codec_for(schema_registry), metrics,
        alerts_topic=app.topic(topics.alerts, value_type=bytes, key_type=bytes),
        dead_letters_topic=app.topic(topics.dead_letters, value_type=bytes, key_type=bytes),
        max_request_size=kafka.max_request_size, max_label_chars=settings.max_label_chars,
    )  # fmt: skip

    health = Health()
    mark_ready = health.ready_then(on_ready)

    @app.on_partitions_assigned.connect
    async def joined(sender: faust.App, assigned: set, **kwargs: Any) -> None:
        log.info("notifier assigned %d partitions", len(assigned))
        mark_ready()

    @app.agent(results_topic)
    async def evaluate(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await notifier.handle(event)

    @app.timer(interval=_REDIS_PROBE_S)
    async def probe_redis() -> None:
        await cooldowns.probe()

    stopping = asyncio.Event()  # set at shutdown: no longer ready, while Faust commits and leaves

    @app.on_before_shutdown.connect
    async def close_redis(sender: faust.App, **kwargs: Any) -> None:
        stopping.set()
        await client.aclose()

    @app.task
    async def expose_metrics() -> None:
        await cooldowns.probe()  # the gauge is right from the first scrape; the timer keeps it so
        serve_metrics(registry, metrics_host, settings.metrics_port, health)
        await health.keep_beating(stopping)

    return app


def run_faust_app(app: faust.App, log_level: str) -> None:
    """Run the app until SIGTERM/SIGINT (Faust's worker owns the event loop and the signals)."""
    worker = faust.Worker(app, loglevel=log_level.lower(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
