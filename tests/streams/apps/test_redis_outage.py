"""The notifier through a Redis outage, on a redis-server of the test's own (stopping it touches no other
test): cooldown commands wait and are retried with capped backoff, each failure is logged, the process
stays up, `sluice_notifier_redis_up` says whether Redis answers, and the alerts arrive by themselves once
Redis is back on the same port."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from consumers.kafka import make_producer
from schemas.codec import Codec
from schemas.records import InferenceResult, Source
from streams.apps.rules import CooldownStore, Rule
from streams.local import processes
from streams.local.harness import Components, free_port
from streams.local.observer import OutputObserver
from streams.local.processes import ManagedProcess
from streams.local.stack import redis_binary
from streams.settings import SluiceSettings
from tests.records import make_result

RULE = Rule(name="tri", labels={"triangle"}, min_score=0.9, cooldown_s=60, modality="frame")
RULES = """
[[rules]]
name = "circle-seen"
modality = "frame"
labels = ["circle"]
min_score = 0.5
cooldown_s = 600
"""


class OwnRedis:
    """A redis-server on a free loopback port that a test stops and starts again, by PID, on that same port."""

    def __init__(self, run_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._run_dir = run_dir
        self._process: ManagedProcess | None = None

    def start(self) -> None:
        argv = [str(redis_binary()), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self._run_dir)]  # fmt: skip
        self._process = processes.start("own-redis", argv, self._run_dir)
        processes.wait_ready(self._process, self._answers, timeout_s=10)

    def stop(self) -> None:
        if self._process is not None:
            processes.stop(self._process)
            self._process = None

    def _answers(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_timeout=0.2) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "own-redis")
    try:
        yield server
    finally:
        server.stop()


async def test_cooldown_store_retries_until_redis_answers(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = Redis.from_url(own_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    reachable: list[bool] = []
    store = CooldownStore(client, prefix=f"test:{uuid.uuid4().hex}", retry_max_s=0.4, on_reachable=reachable.append)
    try:
        with caplog.at_level(logging.WARNING, logger="streams.apps.rules"):
            acquiring = asyncio.create_task(store.acquire(RULE, "cam-1", "alert-1"))
            await asyncio.sleep(1.5)  # Redis is not started yet: retried after 0.1, 0.2, 0.4, 0.4, ... s
            assert not acquiring.done(), "the cooldown waits for Redis"
            assert 4 <= len(reachable) <= 7 and not any(reachable), "backoff doubles up to retry_max_s, no further"
            failures = [r for r in caplog.records if "Redis cannot answer" in r.getMessage()]
            assert len(failures) == len(reachable), "each failure is logged"
            await asyncio.to_thread(own_redis.start)
            assert await asyncio.wait_for(acquiring, timeout=5), "it resumes by itself"
            assert reachable[-1] is True
        assert not await store.acquire(RULE, "cam-1", "alert-2"), "the cooldown was taken once Redis answered"
        await asyncio.to_thread(own_redis.stop)
        await store.probe()
        assert reachable[-1] is False
    finally:
        await client.aclose()


def _redis_up(port: int) -> float | None:
    """The notifier's sluice_notifier_redis_up, or None while its metrics endpoint does not answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith("sluice_notifier_redis_up ")]
    return values[0] if values else None


async def _until_redis_up_is(port: int, value: float, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_redis_up, port) == value:
            return True
        await asyncio.sleep(0.2)
    return False


async def _publish(settings: SluiceSettings, results: list[InferenceResult]) -> None:
    codec = Codec()
    producer = make_producer(settings.kafka, "test")
    await producer.start()
    try:
        for result in results:
            await producer.send_and_wait(settings.kafka.topics.results, codec.write(result),
                                         key=result.device_id.encode())  # fmt: skip
    finally:
        await producer.stop()


def test_notifier_waits_out_a_redis_outage_and_alerts_after_it(
    settings: SluiceSettings, components: Components, own_redis: OwnRedis, tmp_path: Path
) -> None:
    own_redis.start()
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    metrics_port = free_port()
    settings = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"url": own_redis.url, "retry_max_s": 0.5}),
        "notifier": settings.notifier.model_copy(update={"rules_path": rules, "metrics_port": metrics_port}),
    })  # fmt: skip
    notifier = components.start("notifier", ["notifier"], settings=settings)
    before = make_result(0, device_id="cam-0")
    during = [make_result(1, device_id="cam-1"), make_result(2, device_id="cam-2")]

    async def scenario() -> tuple[set[Source], set[Source], int]:
        observer = OutputObserver(settings)
        await observer.start()
        try:
            await _publish(settings, [before])
            assert await observer.wait_for(lambda o: o.alerts, timeout_s=30), "an alert while Redis is up"
            assert await _until_redis_up_is(metrics_port, 1.0, timeout_s=10)

            await asyncio.to_thread(own_redis.stop)
            await _publish(settings, during)
            assert await _until_redis_up_is(metrics_port, 0.0, timeout_s=10), "the gauge shows the outage"
            await asyncio.sleep(2)  # the results wait: retried, not dead-lettered, not dropped
            during_outage = {a.source for a in observer.observed.alerts}

            await asyncio.to_thread(own_redis.start)  # the same port, empty
            resumed = await observer.wait_for(lambda o: len(o.alerts) >= 1 + len(during), timeout_s=30)
            assert resumed, f"no alerts after Redis came back:\n{notifier.log_tail()}"
            assert await _until_redis_up_is(metrics_port, 1.0, timeout_s=10)
            await asyncio.sleep(1)  # a duplicate or a dead letter would show by now
            return during_outage, {a.source for a in observer.observed.alerts}, len(observer.observed.dead_letters)
        finally:
            await observer.stop()

    during_outage, alerted, dead_letters = asyncio.run(scenario())
    assert during_outage == {before.source}, "nothing alerts while Redis is down"
    assert alerted == {before.source} | {r.source for r in during}, "every result waited and alerted"
    assert dead_letters == 0
    assert notifier.alive(), f"the notifier died:\n{notifier.log_tail()}"
    assert [p.pid for p in components.started if p.alive()] == [notifier.pid], "it never restarted"
    log = notifier.log_path.read_text()
    assert "Redis cannot answer" in log, "each failure is logged"
    # Faust logs "Crashed reason=..." when an exception escapes an agent (it then restarts the agent).
    assert "Crashed reason" not in log, "no exception escaped into Faust"
