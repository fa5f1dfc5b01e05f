import pytest
from aiokafka import TopicPartition

from consumers.offsets import OffsetTracker

TP = TopicPartition("frames", 0)
OTHER = TopicPartition("frames", 1)


def test_commits_only_the_acknowledged_prefix() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.track(TP, offset)
    tracker.ack(TP, 12)
    tracker.ack(TP, 13)
    assert tracker.committable() == {}, "10 and 11 are not safe yet"
    tracker.ack(TP, 10)
    assert tracker.committable() == {TP: 11}
    tracker.ack(TP, 11)
    assert tracker.committable() == {TP: 14}
    assert tracker.inflight() == 0


def test_duplicate_and_stale_acks_are_no_ops() -> None:
    tracker = OffsetTracker()
    for offset in (0, 1, 2):
        tracker.track(TP, offset)
    tracker.ack(TP, 0)
    tracker.ack(TP, 0)
    tracker.ack(TP, 99)  # never polled
    assert tracker.committable() == {TP: 1}
    assert tracker.inflight() == 2


def test_gaps_in_offsets_do_not_block_the_watermark() -> None:
    tracker = OffsetTracker()
    for offset in (5, 9, 20):  # compacted topic, or transaction markers in between
        tracker.track(TP, offset)
        tracker.ack(TP, offset)
    assert tracker.committable() == {TP: 21}


def test_partitions_advance_independently_and_commits_are_remembered() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.track(OTHER, 0)
    tracker.ack(OTHER, 0)
    assert tracker.committable() == {OTHER: 1}
    tracker.mark_committed({OTHER: 1})
    assert tracker.committable() == {}
    assert tracker.inflight([TP]) == 1 and tracker.inflight([OTHER]) == 0


def test_forgotten_partitions_ignore_late_acks() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.forget([TP])
    tracker.ack(TP, 0)
    assert tracker.committable() == {} and tracker.inflight() == 0


def test_offsets_must_increase_within_a_partition() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 3)
    with pytest.raises(ValueError, match="must increase"):
        tracker.track(TP, 3)
