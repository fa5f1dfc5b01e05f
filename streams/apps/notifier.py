"""The notifier: a Faust app that turns results into alerts.

It consumes the results topic, evaluates the rules (`streams/apps/rules.toml` by
default) on each result, and publishes an Alert for each rule that fires and
whose per-device cooldown in Redis is open. Faust commits an offset only after
the agent has processed the event and the producer has flushed what it sent, so
delivery is at-least-once; alert ids are deterministic, so duplicates are
recognisable. A result that does not decode goes to the dead-letter topic.
Its Kafka connection (servers, TLS, SASL, group timings) comes from the same
`KafkaSettings` as every other process (`consumers/kafka.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis

from consumers.kafka import KafkaSettings, faust_broker_options
from consumers.metrics import serve_metrics
from consumers.outcomes import source_of
from schemas.codec import Codec, SchemaError
from schemas.records import InferenceResult, dead_letter_for
from streams.apps.rules import CooldownStore, RuleSet
from streams.apps.settings import NotifierSettings, RedisSettings

log = logging.getLogger(__name__)


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter("sluice_notifier_alerts", "Alerts published", ["rule"], registry=registry)
        self.suppressed = Counter(
            "sluice_notifier_suppressed", "Matches suppressed by a cooldown", ["rule"], registry=registry
        )


def create_app(
    kafka: KafkaSettings,
    settings: NotifierSettings,
    redis: RedisSettings,
    metrics_host: str = "127.0.0.1",
    on_ready: Callable[[], None] | None = None,
) -> faust.App:
    topics = kafka.topics
    rules = RuleSet.load(settings.rules_path)
    codec = Codec()
    registry = CollectorRegistry()
    metrics = NotifierMetrics(registry)
    app = faust.App(
        settings.app_id,
        **faust_broker_options(kafka, role="notifier"),
        broker_commit_interval=0.5,
        store="memory://",
        topic_disable_leader=True,  # no tables, no leader election topic to create
        web_enabled=False,  # metrics are served by prometheus_client below
        value_serializer="raw",
        key_serializer="raw",
    )
    results_topic = app.topic(topics.results, value_type=bytes, key_type=bytes)
    alerts_topic = app.topic(topics.alerts, value_type=bytes, key_type=bytes)
    dead_letters_topic = app.topic(topics.dead_letters, value_type=bytes, key_type=bytes)

    @app.on_partitions_assigned.connect
    async def joined(sender: faust.App, assigned: set, **kwargs: Any) -> None:
        log.info("notifier assigned %d partitions", len(assigned))
        if on_ready is not None:
            on_ready()

    @app.agent(results_topic)
    async def evaluate(stream: faust.StreamT) -> None:
        client = Redis.from_url(redis.url)
        cooldowns = CooldownStore(client)
        try:
            async for event in stream.events():
                try:
                    result = codec.read(event.value, InferenceResult)
                except SchemaError as exc:
                    letter = dead_letter_for(
                        source_of(event.message), event.key, event.value, "decode", type(exc).__name__, str(exc),
                        "notifier",
                    )  # fmt: skip
                    await dead_letters_topic.send(key=event.key, value=codec.write(letter))
                    continue
                for rule in rules.rules:
                    matched = rule.match(result)
                    if matched is None:
                        continue
                    alert = rule.alert(result, *matched)
                    if await cooldowns.acquire(rule, result.device_id, alert.alert_id):
                        await alerts_topic.send(key=event.key, value=codec.write(alert))
                        metrics.alerts.labels(rule.name).inc()
                    else:
                        metrics.suppressed.labels(rule.name).inc()
        finally:
            await client.aclose()

    @app.task
    async def expose_metrics() -> None:
        serve_metrics(registry, metrics_host, settings.metrics_port)

    return app


def run_notifier(app: faust.App, log_level: str) -> None:
    """Run the app until SIGTERM/SIGINT (Faust's worker owns the event loop and the signals)."""
    worker = faust.Worker(app, loglevel=log_level.lower(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
