"""Fixtures: the real local stack (Tansu broker, redis-server) for the whole session,
and per-test settings that give each test its own topics, groups and ClickHouse data,
so tests sharing the broker never see each other's messages."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.kafka import ensure_topics
from streams import processes
from streams.config import SluiceSettings
from streams.processes import ManagedProcess
from streams.stack import LocalStack, isolated_settings, start_component, wait_components_ready


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceSettings]:
    base = tmp_path_factory.mktemp("stack")
    settings = isolated_settings(SluiceSettings(), base)
    # Fast group joins: a test waits for every join, and the machine is not loaded like production.
    settings = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"session_timeout_ms": 6_000, "heartbeat_interval_ms": 300, "rebalance_timeout_ms": 2_000}
            )
        }
    )
    stack = LocalStack(settings)
    stack.up()
    try:
        yield settings
    finally:
        stack.down()
        shutil.rmtree(base, ignore_errors=True)


def scoped(stack_settings: SluiceSettings, tmp_path: Path, name: str | None = None) -> SluiceSettings:
    """Settings on the shared stack with topics, groups, run files and ClickHouse data of their own."""
    tag = name or uuid.uuid4().hex[:8]
    s = stack_settings
    topics = s.kafka.topics.model_copy(
        update={k: f"{tag}.{v}" for k, v in s.kafka.topics.model_dump().items() if isinstance(v, str)}
    )
    return s.model_copy(
        update={
            "kafka": s.kafka.model_copy(update={"topics": topics}),
            "worker": s.worker.model_copy(update={"group_prefix": f"{tag}-worker"}),
            "sink": s.sink.model_copy(update={"group_id": f"{tag}-sink"}),
            "notifier": s.notifier.model_copy(update={"app_id": f"{tag}-notifier"}),
            "stack": s.stack.model_copy(update={"run_dir": tmp_path / "run"}),
            "clickhouse": s.clickhouse.model_copy(update={"dsn": f"chdb://{(tmp_path / 'clickhouse').as_posix()}"}),
        }
    )


@pytest.fixture
def settings(stack_settings: SluiceSettings, tmp_path: Path) -> SluiceSettings:
    s = scoped(stack_settings, tmp_path)
    asyncio.run(ensure_topics(s.kafka))
    return s


class Components:
    """Sluice processes a test starts; all stopped by PID when the test ends."""

    def __init__(self, settings: SluiceSettings) -> None:
        self.settings = settings
        self.started: list[ManagedProcess] = []

    def start(self, name: str, args: list[str], settings: SluiceSettings | None = None, timeout_s: float = 90) -> ManagedProcess:
        process, ready = start_component(settings or self.settings, name, args)
        self.started.append(process)
        wait_components_ready([(process, ready)], timeout_s)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            processes.stop(process)


@pytest.fixture
def components(settings: SluiceSettings) -> Iterator[Components]:
    started = Components(settings)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The one embedded ClickHouse path this test process may open (chDB allows one per process).
    Tests that use it in-process isolate themselves by database."""
    return f"chdb://{tmp_path_factory.mktemp('chdb').as_posix()}"
