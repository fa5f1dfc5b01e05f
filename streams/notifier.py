"""The notifier: a Faust app that turns results into alerts.

It consumes the results topic, evaluates the rules (`streams/rules.toml` by
default) on each result, and publishes an Alert for each rule that fires and
whose per-device cooldown in Redis is open. Faust commits an offset only after
the agent has processed the event and the producer has flushed what it sent, so
delivery is at-least-once; alert ids are deterministic, so duplicates are
recognisable. A result that does not decode goes to the dead-letter topic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis

from consumers.dead_letter import dead_letter_record
from consumers.metrics import serve_metrics
from schemas.codec import ALERT, DEAD_LETTER, INFERENCE_RESULT, Codec, SchemaError
from streams.config import SluiceSettings
from streams.rules import CooldownStore, RuleSet, build_alert

log = logging.getLogger(__name__)


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter("sluice_notifier_alerts", "Alerts published", ["rule"], registry=registry)
        self.suppressed = Counter(
            "sluice_notifier_suppressed", "Matches suppressed by a cooldown", ["rule"], registry=registry
        )


def create_app(settings: SluiceSettings, on_ready: Callable[[], None] | None = None) -> faust.App:
    kafka = settings.kafka
    topics = kafka.topics
    rules = RuleSet.load(settings.notifier.rules_path)
    codec = Codec()
    registry = CollectorRegistry()
    metrics = NotifierMetrics(registry)
    app = faust.App(
        settings.notifier.app_id,
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
        broker_client_id=f"{kafka.client_id}-notifier",
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=kafka.heartbeat_interval_ms / 1000,
        broker_rebalance_timeout=kafka.rebalance_timeout_ms / 1000,
        broker_commit_interval=0.5,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=kafka.linger_ms,
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
        redis = Redis.from_url(settings.redis.url)
        cooldowns = CooldownStore(redis)
        try:
            async for event in stream.events():
                message = event.message
                try:
                    _, result = codec.decode(event.value, expect=INFERENCE_RESULT)
                except SchemaError as exc:
                    record = dead_letter_record(
                        message.topic, message.partition, message.offset, event.key, event.value,
                        "decode", type(exc).__name__, str(exc), "notifier",
                    )  # fmt: skip
                    await dead_letters_topic.send(key=event.key, value=codec.encode(DEAD_LETTER, record))
                    continue
                for rule in rules.rules:
                    matched = rule.match(result)
                    if matched is None:
                        continue
                    alert = build_alert(rule, result, *matched)
                    if await cooldowns.acquire(rule, result["device_id"], alert["alert_id"]):
                        await alerts_topic.send(key=event.key, value=codec.encode(ALERT, alert))
                        metrics.alerts.labels(rule.name).inc()
                    else:
                        metrics.suppressed.labels(rule.name).inc()
        finally:
            await redis.aclose()

    @app.task
    async def expose_metrics() -> None:
        serve_metrics(registry, settings.metrics_host, settings.notifier.metrics_port)

    return app


def run_notifier(settings: SluiceSettings, on_ready: Callable[[], None] | None = None) -> None:
    """Run the notifier until SIGTERM/SIGINT (Faust's worker owns the event loop and the signals)."""
    app = create_app(settings, on_ready)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
