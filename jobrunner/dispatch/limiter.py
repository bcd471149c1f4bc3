"""At most ``limit`` Jobs active at once for a ScaledJob (KEDA's ``maxReplicaCount``).

Backpressure only: a message that finds no free slot waits, still unacked, and the
source's prefetch stops the broker from sending more. Nothing is dropped or rejected.
A Job already active (a redelivery adopting it) needs no new slot. The limit changes live
(``resize``: the operator applies a new ``maxReplicaCount`` without replacing the
dispatcher): a larger limit wakes as many waiters as it frees slots; a smaller one lets
the Jobs already active run on and admits no new one until enough have ended.

Queued Jobs (Kueue's, ``core.admission``): of the ``limit`` slots, at most
``pending_limit`` may be held by Jobs waiting for admission (``maxPendingAdmission``), so
a quota-starved queue leaves its messages in the broker instead of turning them into
thousands of suspended Jobs. A queued Job is pending from its slot's acquisition (Kueue's
webhook creates it suspended) until the tracker sees it admitted, and again when it is
evicted. Pending Jobs still hold a slot: every admitted Job was pending first, so at most
``limit`` are ever admitted at once, however fast Kueue admits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable


class ActiveJobs:
    def __init__(self, limit: int, pending_limit: int | None = None) -> None:
        self.limit = limit
        self.pending_limit = pending_limit
        self._active: set[str] = set()
        self._pending: set[str] = set()
        """Of ``_active``, the queued Jobs that wait for admission."""
        self._waiters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._active)

    def __contains__(self, name: object) -> bool:
        return name in self._active

    @property
    def waiting(self) -> int:
        """Messages in hand that wait for a free slot (received, not yet a Job): the
        broker no longer counts them as ready, so a queue's depth leaves them out."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def pending(self) -> int:
        """Slots held by queued Jobs waiting for admission."""
        return len(self._pending)

    def seed(self, names: Iterable[str], pending: Iterable[str] = ()) -> None:
        """Jobs found running at start-up hold slots (possibly above the limit); those of
        ``pending`` wait for admission."""
        self._active.update(names)
        self._pending.update(n for n in pending if n in self._active)

    def _full(self, name: str, queued: bool) -> bool:
        if name in self._active:
            return False
        if len(self._active) >= self.limit:
            return True
        return queued and self.pending_limit is not None and self.pending >= self.pending_limit

    async def acquire(self, name: str, *, queued: bool = False) -> None:
        """A slot for Job ``name``, waiting while none is free; ``queued``: the Job will
        wait for admission, so it also needs one of the ``pending_limit``."""
        while self._full(name, queued):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the wake-up on rather than lose it
                raise
        if name not in self._active and queued:
            self._pending.add(name)
        self._active.add(name)

    def resize(self, limit: int, pending_limit: int | None = None) -> None:
        """New limits, at once: waiters that now fit are woken."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if pending_limit is not None and pending_limit < 1:
            raise ValueError(f"pending_limit must be at least 1, got {pending_limit}")
        self.limit, self.pending_limit = limit, pending_limit
        self._wake()

    def admission(self, name: str, *, pending: bool) -> None:
        """Job ``name`` (holding a slot) was admitted (``pending=False``) or is waiting
        for admission again (evicted, requeued)."""
        if name not in self._active:
            return
        if pending:
            self._pending.add(name)
        elif name in self._pending:
            self._pending.remove(name)
            self._wake()

    def release(self, name: str) -> None:
        self._pending.discard(name)
        if name in self._active:
            self._active.remove(name)
            self._wake()

    def _wake(self) -> None:
        """Wake one waiter per free slot (each re-checks the limits when it runs, so a
        spurious wake-up only sends it back to the queue)."""
        free = self.limit - len(self._active)
        if self.pending_limit is not None:
            # Queued or not is each waiter's own (its Job's template decides): a queued one
            # may find the pending bound full and wait on, so wake them all to re-check
            # (they are at most the messages in hand, bounded by the source's prefetch).
            free = len(self._waiters) if free > 0 else 0
        while self._waiters and free > 0:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
