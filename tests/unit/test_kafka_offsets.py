from __future__ import annotations

from jobrunner.sources.kafka_offsets import PartitionOffsets


def test_watermark_never_passes_the_lowest_unfinished_record() -> None:
    offsets = PartitionOffsets(start=10)
    for o in (10, 11, 12, 13):
        offsets.received(o)
    offsets.finished(11)
    offsets.finished(13)
    assert offsets.watermark() == 10
    offsets.finished(10)
    assert offsets.watermark() == 12
    offsets.finished(12)
    assert offsets.watermark() == 14


def test_gaps_in_offsets_are_not_waited_for() -> None:
    offsets = PartitionOffsets(start=0)
    offsets.received(0)
    offsets.received(5)  # 1-4 compacted away
    offsets.finished(0)
    assert offsets.watermark() == 5
    offsets.finished(5)
    assert offsets.watermark() == 6


def test_to_commit_only_when_the_watermark_moved() -> None:
    offsets = PartitionOffsets(start=3)
    assert offsets.to_commit() is None
    offsets.received(3)
    offsets.finished(3)
    assert offsets.to_commit() == 4
    offsets.committed = 4
    assert offsets.to_commit() is None
    offsets.received(4)
    assert offsets.to_commit() is None
    assert offsets.in_hand == 1
