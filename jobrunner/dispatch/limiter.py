"""At most ``limit`` Jobs active at once for a ScaledJob (KEDA's ``maxReplicaCount``).

Backpressure only: a message that finds no free slot waits, still unacked, and the
source's prefetch stops the broker from sending more. Nothing is dropped or rejected.
A Job already active (a redelivery adopting it) needs no new slot. The limit changes live
(``resize``: the operator applies a new ``maxReplicaCount`` without replacing the
dispatcher): a larger limit wakes as many waiters as it frees slots; a smaller one lets
the Jobs already active run on and admits no new one until enough have ended.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable


class ActiveJobs:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: set[str] = set()
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

    def seed(self, names: Iterable[str]) -> None:
        """Jobs found running at start-up hold slots (possibly above the limit)."""
        self._active.update(names)

    async def acquire(self, name: str) -> None:
        while name not in self._active and len(self._active) >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the wake-up on rather than lose it
                raise
        self._active.add(name)

    def resize(self, limit: int) -> None:
        """A new limit, at once: waiters that now fit are woken."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._wake()

    def release(self, name: str) -> None:
        if name in self._active:
            self._active.remove(name)
            self._wake()

    def _wake(self) -> None:
        """Wake one waiter per free slot (each re-checks the limit when it runs, so a
        spurious wake-up only sends it back to the queue)."""
        free = self.limit - len(self._active)
        while self._waiters and free > 0:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1
