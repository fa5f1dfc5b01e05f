"""The commit protocol of Sluice's consumers: what makes delivery at-least-once and a crash lossless.

The worker and the sink both sit on one `Checkpoint` per consumer. It owns the
offset tracker, the commits, the in-flight budget and the rebalance callbacks;
the consumer owns only its work. The order, in one place:

Per message
    1. polled            -> `track(tp, offset, size)`: it is in flight
    2. outcome made safe -> `ack(tp, offset)`. Safe means: the worker's result or
       dead letter was acknowledged by the broker (acks=all); the sink's row was
       inserted into ClickHouse, or its dead letter acknowledged.

Per commit (every commit interval, before a partition is revoked, at stop)
    1. settle: the owner makes buffered outcomes safe (the sink inserts its rows;
       the worker's outcomes are settled by producer acknowledgements)
    2. commit, for each partition this member still owns, one past the
       acknowledged prefix (never past an offset whose outcome is not safe)
    3. remember what was committed

A crash anywhere loses nothing: an uncommitted offset is re-read by the next
owner, and redone work is recognisable downstream (results and rows are keyed
by the input's coordinates). A commit that fails (a rebalance in progress, a
fenced member) is logged and retried on the next round; only this module
handles commit errors. After `halt()` (an outcome the broker refused, an
engine that fails on everything) nothing more is committed: the next owner
redoes the uncommitted tail rather than trusting a broken member.

Budget: at `max_messages` or `max_bytes` in flight every assigned partition is
paused, and resumed below half of both. The owner keeps polling while paused,
so the member stays in its group however long the work takes (aiokafka #848).

Revoke: drain the revoked partitions (bounded by `drain_timeout_s`), commit,
then forget them; their late acknowledgements become no-ops (faust #318, #502).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from consumers.offsets import OffsetTracker

log = logging.getLogger(__name__)

Settle = Callable[[], Awaitable[None]]


async def _wait_for_acks() -> None:
    await asyncio.sleep(0.01)


class Checkpoint(ConsumerRebalanceListener):
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        name: str,
        *,
        max_messages: int,
        max_bytes: int | None,
        drain_timeout_s: float,
        settle: Settle = _wait_for_acks,
        on_revoke: Callable[[set[TopicPartition]], None] | None = None,
    ) -> None:
        """`settle` is step 1 of a commit: one attempt to make buffered outcomes safe (the drain repeats it
        until the deadline). `on_revoke` tells the owner which partitions it must drop unfinished work of."""
        self.consumer = consumer
        self.name = name
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._drain_timeout_s = drain_timeout_s
        self._settle = settle
        self._on_revoke = on_revoke
        self._tracker = OffsetTracker()
        self._sizes: dict[tuple[TopicPartition, int], int] = {}
        self.inflight_bytes = 0
        self.paused = False
        self.halted = False
        self.commits = 0
        self.joined = asyncio.Event()

    def subscribe(self, topics: list[str]) -> None:
        self.consumer.subscribe(topics, listener=self)

    # -- per message ---------------------------------------------------------------------------------

    def track(self, tp: TopicPartition, offset: int, size: int = 0) -> None:
        """Step 1: `offset` was polled and its work has started."""
        self._tracker.track(tp, offset)
        self._sizes[(tp, offset)] = size
        self.inflight_bytes += size

    def ack(self, tp: TopicPartition, offset: int) -> None:
        """Step 2: the outcome of `offset` is safe. Idempotent; offsets of revoked partitions are ignored."""
        size = self._sizes.pop((tp, offset), None)
        if size is None:
            return
        self.inflight_bytes -= size
        self._tracker.ack(tp, offset)

    def inflight(self, tps: Iterable[TopicPartition] | None = None) -> int:
        return self._tracker.inflight(tps)

    def halt(self) -> None:
        """Commit nothing more: an outcome failed in a way that makes this member's acks untrustworthy."""
        self.halted = True

    # -- budget --------------------------------------------------------------------------------------

    def apply_budget(self) -> bool:
        """Pause every assigned partition over the budget; resume below half of it. Returns `paused`."""
        inflight = self._tracker.inflight()
        max_bytes = self._max_bytes if self._max_bytes is not None else float("inf")
        over = inflight >= self._max_messages or self.inflight_bytes >= max_bytes
        under = inflight <= self._max_messages // 2 and self.inflight_bytes <= max_bytes / 2
        assignment = self.consumer.assignment()
        if over or (self.paused and not under):
            self.consumer.pause(*assignment)  # again each time: partitions assigned since the last pause
            if not self.paused:
                log.info("%s over its in-flight budget (%d messages, %d bytes): pausing", self.name, inflight,
                         self.inflight_bytes)  # fmt: skip
            self.paused = True
        elif self.paused:
            self.consumer.resume(*assignment)
            self.paused = False
        return self.paused

    # -- commit --------------------------------------------------------------------------------------

    async def commit(self) -> bool:
        """Steps 2 and 3 of a commit: the acknowledged prefix of each owned partition. Returns whether
        anything was committed. The caller settles first where it buffers outcomes."""
        if self.halted:
            return False
        assignment = self.consumer.assignment()
        offsets = {tp: offset for tp, offset in self._tracker.committable().items() if tp in assignment}
        if not offsets:
            return False
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # Typically a rebalance in progress: the revoke handler or the next round commits. Work that is
            # acknowledged but uncommitted is at worst redone by the next owner, and recognised downstream.
            log.warning("%s commit of %s failed: %s", self.name, offsets, exc)
            return False
        self._tracker.mark_committed(offsets)
        self.commits += 1
        return True

    async def drain(self, tps: Iterable[TopicPartition] | None = None) -> int:
        """Settle until `tps` (default: all) have nothing in flight or the drain timeout passes, then commit.
        Returns how many messages were left unsafe (they will be redone)."""
        chosen = None if tps is None else set(tps)
        deadline = time.monotonic() + self._drain_timeout_s
        while not self.halted and self._tracker.inflight(chosen) and time.monotonic() < deadline:
            await self._settle()
        await self.commit()
        return self._tracker.inflight(chosen)

    # -- rebalance (aiokafka calls these from inside its poll) --------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        left = await self.drain(revoked)
        if left:
            log.warning("%s giving up %s with %d messages unsafe: they will be redone", self.name, revoked, left)
        self._forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("%s assigned %s", self.name, sorted((tp.topic, tp.partition) for tp in assigned))
        self.joined.set()

    def _forget(self, tps: set[TopicPartition]) -> None:
        for key in [key for key in self._sizes if key[0] in tps]:
            self.inflight_bytes -= self._sizes.pop(key)
        self._tracker.forget(tps)
        if self._on_revoke is not None:
            self._on_revoke(tps)
