"""Per-partition offset bookkeeping for the Kafka source, kept free of aiokafka so it can
be tested on its own.

The committed offset of a partition never passes the lowest record whose Job has not
reached its outcome: it is the lowest offset still in hand, or one past the highest
offset seen when none is. Offsets need not be contiguous (compaction, transaction
markers), so gaps are never waited for.

**Records settled above the committed offset.** Jobs finish out of order, so a record can
be settled (acked, dead-lettered) while a lower one still runs; the committed offset
cannot pass it. Kafka's offset commit carries a metadata string with the offset (the
``metadata`` of OffsetCommit/TxnOffsetCommit, at most ``offset.metadata.max.bytes``,
4096 by default, on the broker), so each commit also names the records above the offset
that are settled already: ``jr1:`` and their distances from the offset, comma-separated
(``jr1:2,5`` at offset 10 means 12 and 15 are settled). A consumer that resumes from that
commit (a restart, a rebalance) skips them instead of replaying them. This is what makes a
dead letter sent in the same Kafka transaction as its commit final even when a lower
record is still in hand: without it the replay would dead-letter it again (the technique
of Confluent's Parallel Consumer, which encodes its incomplete offsets the same way). A
list longer than ``METADATA_LIMIT`` names only the lowest records that fit; the others
are replayed and adopt their Jobs, as every record was before.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

METADATA_PREFIX = "jr1:"
METADATA_LIMIT = 3000
"""Characters of commit metadata at most: under the broker's default
``offset.metadata.max.bytes`` (4096), which refuses the whole commit when passed."""
MAX_DONE = 2000
"""Settled records above the offset read back from one commit's metadata, at most: the
metadata is the group's (anyone allowed to commit for it can write it), so reading it is
bounded whatever it holds."""


def encode_done(
    offset: int, done: list[int], *, keep: frozenset[int] = frozenset()
) -> tuple[str, list[int]]:
    """The commit metadata naming the settled records ``done`` (each above ``offset``),
    and those of them it names (sorted): every one of ``keep`` (named by the last
    commit: a record once named settled must stay so, as its Job may be gone), then
    the lowest others within METADATA_LIMIT. ``keep`` always fits: it fitted at the
    last commit's offset, which was not higher."""
    named = sorted(o for o in keep if o > offset)
    size = len(METADATA_PREFIX) + sum(len(str(o - offset)) + 1 for o in named)
    for record in sorted(set(done) - set(named)):
        piece = len(str(record - offset)) + 1
        if size + piece > METADATA_LIMIT + 1:  # + 1: the first piece has no comma
            break
        size += piece
        named.append(record)
    named.sort()
    if not named:
        return "", []
    return METADATA_PREFIX + ",".join(str(o - offset) for o in named), named


def decode_done(offset: int, metadata: str | None) -> frozenset[int]:
    """The settled records a commit at ``offset`` names in its ``metadata``; none for
    metadata jobrunner did not write or cannot read (a record left out is replayed, which
    is safe; a record wrongly skipped would be lost, so anything doubtful names none)."""
    if not metadata or not metadata.startswith(METADATA_PREFIX) or offset < 0:
        return frozenset()
    out = set()
    for piece in metadata[len(METADATA_PREFIX) :].split(",")[:MAX_DONE]:
        if not piece.isdigit() or len(piece) > 12:
            return frozenset()
        distance = int(piece)
        if distance <= 0:
            return frozenset()
        out.add(offset + distance)
    return frozenset(out)


@dataclass(frozen=True)
class Mark:
    """What to commit for a partition: the next record a resumed consumer reads, and the
    records above it already settled (named in the commit's metadata)."""

    offset: int
    done: tuple[int, ...] = ()
    metadata: str = ""


@dataclass
class PartitionOffsets:
    start: int
    """The position consumption (re)started from: the committed offset then."""
    done: frozenset[int] = frozenset()
    """Records at or above ``start`` already settled, from the commit's metadata."""
    _pending: list[int] = field(default_factory=list)
    _pending_set: set[int] = field(default_factory=set)
    _settled_above: set[int] = field(default_factory=set)
    _highest_seen: int = -1
    committed: int = -1
    """The offset last committed for this partition; starts at ``start``."""
    committed_done: frozenset[int] = frozenset()
    """The records above ``committed`` that the last commit named as settled."""

    def __post_init__(self) -> None:
        self.committed = max(self.committed, self.start)
        self._settled_above = {o for o in self.done if o >= self.start}
        self.committed_done = frozenset(self._settled_above)

    def received(self, offset: int) -> bool:
        """Note a record read from the partition; False when it was settled before (the
        commit named it) and must not be handed out again."""
        self._highest_seen = max(self._highest_seen, offset)
        if offset in self._settled_above:
            self._prune()
            return False
        if offset in self._pending_set:
            return True
        heapq.heappush(self._pending, offset)
        self._pending_set.add(offset)
        return True

    def finished(self, offset: int) -> None:
        if offset not in self._pending_set:
            return
        self._pending_set.discard(offset)
        self._settled_above.add(offset)
        # Drop finished offsets from the heap's top lazily.
        while self._pending and self._pending[0] not in self._pending_set:
            heapq.heappop(self._pending)
        self._prune()

    def _prune(self) -> None:
        mark = self.watermark()
        # Kept while not read yet, even below the watermark: the read must still skip it.
        self._settled_above = {
            o for o in self._settled_above if o >= mark or o > self._highest_seen
        }

    @property
    def in_hand(self) -> int:
        return len(self._pending_set)

    def watermark(self, *, besides: int | None = None) -> int:
        """The offset to commit: the next record a restarted consumer must read; with
        ``besides``, as it would be were that record finished too."""
        lowest = self._pending[0] if self._pending else None
        if lowest is not None and lowest == besides:
            rest = [o for o in heapq.nsmallest(2, self._pending_set) if o != besides]
            lowest = rest[0] if rest else None
        if lowest is not None:
            return lowest
        mark = self._highest_seen + 1 if self._highest_seen >= 0 else self.start
        # Records settled before (named by the last commit) and not read yet: a resumed
        # consumer need not read them either.
        while mark in self._settled_above:
            mark += 1
        return mark

    def to_commit(self, *, besides: int | None = None) -> Mark | None:
        """What to commit when the watermark moved past what was committed or more
        records above it are settled, else None; with ``besides``, as if that record
        were finished too (the commit of a transaction that settles it)."""
        offset = self.watermark(besides=besides)
        settled = set(self._settled_above)
        if besides is not None:
            settled.add(besides)
        metadata, named = encode_done(
            offset, [o for o in settled if o > offset], keep=self.committed_done
        )
        if offset <= self.committed and set(named) <= self.committed_done:
            return None
        return Mark(offset, tuple(named), metadata)

    def committed_as(self, mark: Mark) -> None:
        """``mark`` is committed."""
        if mark.offset >= self.committed:
            self.committed = mark.offset
            self.committed_done = frozenset(mark.done)

    def is_settled(self, offset: int) -> bool:
        """Whether a commit made the record's settlement final: a resumed consumer will
        not hand it out again."""
        return offset < self.committed or offset in self.committed_done
