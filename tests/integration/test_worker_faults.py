"""Fault injection on real worker processes: a rebalance while messages flow, then a
`kill -9` of a worker mid-stream. Nothing may be lost; duplicates are allowed
(at-least-once) and counted."""

from __future__ import annotations

import asyncio

import pytest

from streams.local import processes
from streams.local.harness import Components, publish_frames
from streams.local.observer import OutputObserver
from streams.settings import SluiceSettings

pytestmark = pytest.mark.slow


async def _publish(settings: SluiceSettings, count: int, seed: int) -> set:
    # A stream, not one burst: the kill lands mid-flow.
    return await publish_frames(settings, count, seed=seed, pause_every=40)


def test_rebalance_and_kill_lose_nothing(settings: SluiceSettings, components: Components) -> None:
    first = components.start("worker-a", ["worker", "--modality", "frame"])

    async def scenario() -> tuple[set, list, int]:
        observer = OutputObserver(settings)
        await observer.start()
        try:
            published = await _publish(settings, 200, seed=1)
            # A second worker joins the group while the first is busy: partitions move.
            await asyncio.to_thread(components.start, "worker-b", ["worker", "--modality", "frame"])
            publishing = asyncio.create_task(_publish(settings, 400, seed=2))
            await observer.wait_for(lambda o: len(o.unique_sources()) >= 300, timeout_s=60)
            processes.kill(first)  # SIGKILL: no drain, no commit, no LeaveGroup
            published |= await publishing
            drained = await observer.wait_for(lambda o: len(o.unique_sources()) >= len(published), timeout_s=90)
            assert drained, f"{len(published) - len(observer.observed.unique_sources())} inputs never got a result"
            sources = observer.observed.sources()
            return published, sources, len(observer.observed.dead_letters)
        finally:
            await observer.stop()

    published, sources, dead_letters = asyncio.run(scenario())
    assert set(sources) == published, "no input is lost"
    assert dead_letters == 0
    duplicates = len(sources) - len(set(sources))
    print(f"published={len(published)} results={len(sources)} duplicates={duplicates}")
    # Only the killed worker's uncommitted work may be redone: bounded by its in-flight budget.
    assert duplicates <= settings.worker.max_inflight_messages
