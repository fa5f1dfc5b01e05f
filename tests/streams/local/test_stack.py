"""`sluice stack up|status|down` through the real CLI, on ports of its own."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from consumers.kafka import ensure_topics, make_consumer
from schemas.records import Source
from streams.local import processes
from streams.local.harness import (
    committed_offsets, durable, fast_groups, free_port, isolated_settings, kill_broker, publish_stream, start_broker,
)  # fmt: skip
from streams.local.stack import LocalStack
from streams.settings import SluiceSettings


def _sluice(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args], env=os.environ | env, capture_output=True, text=True, timeout=60
    )


def test_stack_up_status_down_by_pid(tmp_path: Path) -> None:
    env = {
        "SLUICE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "SLUICE_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
        "SLUICE_STACK__RUN_DIR": str(tmp_path),
        "SLUICE_SINK__QUERY_PORT": str(free_port()),
        "COLUMNS": "200",
    }
    try:
        up = _sluice(env, "stack", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "sluice.frames" in up.stdout, "stack up creates the topics"
        kafka, redis = processes.read("kafka", tmp_path), processes.read("redis", tmp_path)
        assert kafka is not None and kafka.alive() and redis is not None and redis.alive()

        again = _sluice(env, "stack", "up")
        assert again.returncode == 0 and f"PID {kafka.pid}" in again.stdout, "up is idempotent"

        status = _sluice(env, "stack", "status")
        assert str(kafka.pid) in status.stdout and str(redis.pid) in status.stdout
        assert "no sink running" in status.stdout, "the embedded ClickHouse is not shown as running without a sink"

        down = _sluice(env, "stack", "down")
        assert down.returncode == 0
        assert not kafka.alive() and not redis.alive()
        assert not (tmp_path / "kafka.pid").exists()
    finally:
        for name in ("kafka", "redis"):
            process = processes.read(name, tmp_path)
            if process is not None:
                processes.stop(process)


def test_stack_refuses_non_loopback_addresses(tmp_path: Path) -> None:
    env = {"SLUICE_KAFKA__BOOTSTRAP_SERVERS": "10.1.2.3:9092", "SLUICE_STACK__RUN_DIR": str(tmp_path)}
    result = _sluice(env, "stack", "up")
    assert result.returncode != 0
    assert "loopback" in result.stderr


def test_durable_stack_keeps_topics_data_and_offsets_across_a_broker_kill(tmp_path: Path) -> None:
    """`kafka_storage = s3://tansu/`: Tansu keeps its data in the stack's S3 server (moto), so a kill -9 of the
    broker and a restart on the same port lose no topic, record or committed offset."""
    settings = durable(fast_groups(isolated_settings(SluiceSettings(), tmp_path)))
    stack = LocalStack(settings)
    try:
        names = {p.name for p in stack.up()}
        assert names == {"kafka", "redis", "s3"}
        assert any(row.name == "s3" and row.running for row in stack.status())
        asyncio.run(ensure_topics(settings.kafka))
        published = asyncio.run(publish_stream(settings, frames=20, audio=180))
        assert len(published.sources) == 200 and published.refused == 0
        group, audio = "durable-check", settings.kafka.topics.audio
        committed = {tp: end // 2 for tp, end in published.ends().items() if tp.topic == audio}

        async def commit() -> None:
            consumer = make_consumer(settings.kafka, group, role="test")
            await consumer.start()
            try:
                consumer.assign(list(committed))
                await consumer.commit(committed)
            finally:
                await consumer.stop()

        asyncio.run(commit())
        old = kill_broker(settings)
        restarted = start_broker(settings)
        assert restarted.pid != old

        async def read_back() -> set[Source]:
            """Every published record, read until the count is reached (reported end offsets may fall short)."""
            consumer = make_consumer(settings.kafka, None, role="test")
            await consumer.start()
            try:
                tps = list(published.ends())
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                seen: set[Source] = set()
                deadline = time.monotonic() + 30
                while len(seen) < len(published.sources) and time.monotonic() < deadline:
                    for messages in (await consumer.getmany(timeout_ms=200)).values():
                        seen |= {Source(m.topic, m.partition, m.offset) for m in messages}
                return seen
            finally:
                await consumer.stop()

        assert asyncio.run(read_back()) == published.sources
        assert asyncio.run(committed_offsets(settings, group, committed)) == committed
    finally:
        stack.down()
        for name in ("kafka", "redis", "s3"):
            assert processes.read(name, settings.stack.run_dir) is None
