"""Per-partition offset bookkeeping for the Kafka source, kept free of aiokafka so it can
be tested on its own.

The committed offset of a partition never passes the lowest record whose Job has not
reached its outcome: it is the lowest offset still in hand, or one past the highest
offset seen when none is. Offsets need not be contiguous (compaction, transaction
markers), so gaps are never waited for.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class PartitionOffsets:
    start: int
    """The position consumption (re)started from: the committed offset then."""
    _pending: list[int] = field(default_factory=list)
    _pending_set: set[int] = field(default_factory=set)
    _highest_seen: int = -1
    committed: int = -1
    """The offset last committed for this partition; starts at ``start``."""

    def __post_init__(self) -> None:
        self.committed = max(self.committed, self.start)

    def received(self, offset: int) -> None:
        if offset in self._pending_set:
            return
        heapq.heappush(self._pending, offset)
        self._pending_set.add(offset)
        self._highest_seen = max(self._highest_seen, offset)

    def finished(self, offset: int) -> None:
        self._pending_set.discard(offset)
        # Drop finished offsets from the heap's top lazily.
        while self._pending and self._pending[0] not in self._pending_set:
            heapq.heappop(self._pending)

    @property
    def in_hand(self) -> int:
        return len(self._pending_set)

    def watermark(self) -> int:
        """The offset to commit: the next record a restarted consumer must read."""
        if self._pending:
            return self._pending[0]
        if self._highest_seen >= 0:
            return self._highest_seen + 1
        return self.start

    def to_commit(self) -> int | None:
        """The watermark when it moved past what was committed, else None."""
        mark = self.watermark()
        return mark if mark > self.committed else None
