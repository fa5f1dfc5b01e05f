"""Fixtures: the real local stack (Tansu broker, redis-server) for the whole session, and per-test
settings that give each test its own topics, groups and ClickHouse data (`streams/local/harness.py`),
so tests sharing the broker never see each other's messages. Fixtures only: helpers come from the harness."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.kafka import ensure_topics
from streams.local.harness import Components, fast_groups, isolated_settings, scoped
from streams.local.stack import LocalStack
from streams.settings import SluiceSettings


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SluiceSettings]:
    base = tmp_path_factory.mktemp("stack")
    settings = fast_groups(isolated_settings(SluiceSettings(), base))
    stack = LocalStack(settings)
    stack.up()
    try:
        yield settings
    finally:
        stack.down()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def settings(stack_settings: SluiceSettings, tmp_path: Path) -> SluiceSettings:
    s = scoped(stack_settings, tmp_path)
    asyncio.run(ensure_topics(s.kafka))
    return s


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
