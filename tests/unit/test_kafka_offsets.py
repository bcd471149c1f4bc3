from __future__ import annotations

from jobrunner.sources.kafka_offsets import (
    METADATA_LIMIT,
    Mark,
    PartitionOffsets,
    decode_done,
    encode_done,
)


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
    assert offsets.to_commit() == Mark(4)
    offsets.committed_as(Mark(4))
    assert offsets.to_commit() is None
    offsets.received(4)
    assert offsets.to_commit() is None
    assert offsets.in_hand == 1


def test_records_settled_above_the_watermark_are_named_in_the_commit() -> None:
    """The kind: a record settled while a lower one is still in hand. The offset cannot
    pass the lower one, so the commit's metadata names it, and it counts as settled."""
    offsets = PartitionOffsets(start=10)
    for o in (10, 11, 13):
        offsets.received(o)
    offsets.finished(13)
    offsets.finished(11)
    mark = offsets.to_commit()
    assert mark == Mark(10, (11, 13), "jr1:1,3")
    assert not offsets.is_settled(11), "settled only once committed"
    offsets.committed_as(mark)
    assert offsets.is_settled(11)
    assert offsets.is_settled(13)
    assert not offsets.is_settled(10)
    assert offsets.to_commit() is None
    offsets.finished(10)
    assert offsets.to_commit() == Mark(14)


def test_a_resumed_consumer_skips_what_the_commit_names_and_never_loses_it() -> None:
    mark = Mark(10, (11, 13), "jr1:1,3")
    resumed = PartitionOffsets(start=mark.offset, done=decode_done(mark.offset, mark.metadata))
    assert resumed.is_settled(11)
    assert resumed.is_settled(13)
    assert [o for o in (10, 11, 12, 13, 14) if resumed.received(o)] == [10, 12, 14]
    # Its own commits keep naming them until the offset passes them.
    assert resumed.to_commit() is None
    resumed.finished(12)
    assert resumed.to_commit() == Mark(10, (11, 12, 13), "jr1:1,2,3")
    resumed.finished(10)
    resumed.finished(14)
    assert resumed.to_commit() == Mark(15)


def test_a_commit_passes_named_records_not_read_yet() -> None:
    resumed = PartitionOffsets(start=5, done=decode_done(5, "jr1:1,2"))
    assert resumed.received(5)
    resumed.finished(5)
    assert resumed.to_commit() == Mark(8)


def test_to_commit_besides_is_the_commit_of_a_transaction_that_settles_it() -> None:
    """A dead letter's transaction commits the offsets as if its record were finished;
    nothing changes until the transaction is committed."""
    offsets = PartitionOffsets(start=0)
    for o in (0, 1, 2):
        offsets.received(o)
    assert offsets.to_commit(besides=0) == Mark(1)
    assert offsets.to_commit(besides=1) == Mark(0, (1,), "jr1:1")
    assert offsets.in_hand == 3
    assert offsets.to_commit() is None
    offsets.finished(1)
    assert offsets.to_commit(besides=0) == Mark(2)


def test_metadata_stays_under_the_brokers_limit() -> None:
    text, named = encode_done(0, list(range(1, 10_000)))
    assert len(text) <= METADATA_LIMIT
    assert named == list(range(1, len(named) + 1)), "the lowest ones"
    assert decode_done(0, text) == frozenset(named)


def test_metadata_jobrunner_did_not_write_names_nothing() -> None:
    for metadata in (
        None,
        "",
        "some tool's note",
        "jr1:",
        "jr1:1,x",
        "jr1:0",
        "jr1:-3",
        "jr1:1,,2",
    ):
        assert decode_done(7, metadata) == frozenset(), metadata
    assert decode_done(-1, "jr1:1") == frozenset()
    assert len(decode_done(0, "jr1:" + ",".join(str(i) for i in range(1, 5000)))) == 2000


def test_a_record_once_named_settled_stays_named_when_the_list_is_full() -> None:
    """Its Job may be released and deleted once a commit names it: a later commit that
    dropped it (for lower records, say) would let a resumed consumer run it again."""
    offsets = PartitionOffsets(start=0)
    offsets.received(0)
    high = list(range(5000, 5000 + 800))
    for o in high:
        offsets.received(o)
        offsets.finished(o)
    first = offsets.to_commit()
    assert first is not None
    assert 0 < len(first.done) < len(high)
    offsets.committed_as(first)
    low = list(range(1, 900))
    for o in low:
        offsets.received(o)
        offsets.finished(o)
    second = offsets.to_commit()
    assert second is not None
    assert set(first.done) <= set(second.done)
    assert len(second.metadata) <= METADATA_LIMIT
    assert decode_done(second.offset, second.metadata) == frozenset(second.done)
