"""Which offsets are safe to commit.

A consumer may only commit offset N+1 of a partition once the work for every
message up to N is safe (its result acknowledged by the broker, or its dead
letter). Results complete out of order (batches interleave partitions, acks
arrive in any order), so the tracker keeps, per partition, the polled offsets
in poll order and advances a watermark over the acknowledged prefix. This is
what turns "results produced" into "offsets committed" without losing a
message on a crash, and without the failure modes Faust users report:

- duplicate acknowledgements are no-ops (robinhood/faust #625 stalled on them);
- an acknowledgement for a partition we no longer own is ignored (#318, #502);
- gaps in offsets (compaction, transaction markers) never block the watermark,
  because only offsets actually polled are waited for (#221, #216).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from aiokafka import TopicPartition


class _PartitionState:
    __slots__ = ("order", "acked", "watermark")

    def __init__(self) -> None:
        self.order: deque[int] = deque()  # polled, not yet below the watermark, in poll order
        self.acked: set[int] = set()  # acknowledged members of `order`
        self.watermark: int | None = None  # next offset to commit (one past the safe prefix)


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._committed: dict[TopicPartition, int] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        """Record that `offset` was polled and its work has started."""
        state = self._partitions.setdefault(tp, _PartitionState())
        if state.order and offset <= state.order[-1]:
            raise ValueError(f"{tp} offset {offset} polled after {state.order[-1]}: offsets must increase")
        state.order.append(offset)

    def ack(self, tp: TopicPartition, offset: int) -> None:
        """Record that the work for `offset` is safe. Idempotent; unknown partitions and offsets are ignored."""
        state = self._partitions.get(tp)
        if state is None or not state.order or offset < state.order[0]:
            return
        state.acked.add(offset)
        while state.order and state.order[0] in state.acked:
            done = state.order.popleft()
            state.acked.discard(done)
            state.watermark = done + 1

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: partitions whose watermark moved past the last commit."""
        return {
            tp: state.watermark
            for tp, state in self._partitions.items()
            if state.watermark is not None and state.watermark > self._committed.get(tp, -1)
        }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._committed[tp] = max(offset, self._committed.get(tp, -1))

    def inflight(self, tps: Iterable[TopicPartition] | None = None) -> int:
        """Polled messages whose work is not yet safe."""
        chosen = self._partitions if tps is None else tps
        return sum(len(self._partitions[tp].order) for tp in chosen if tp in self._partitions)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop partitions we no longer own; their late acknowledgements become no-ops."""
        for tp in tps:
            self._partitions.pop(tp, None)
            self._committed.pop(tp, None)
