"""History limits: finished Jobs beyond ``successfulJobsHistoryLimit`` /
``failedJobsHistoryLimit`` are deleted oldest first, with background propagation so their
pods and message Secrets go with them (as KEDA does).

A Job whose message is still in hand is never deleted, and neither is a finished Job not
known to be settled (by this process, by an annotation, or because it owned its message),
unless it finished long ago: its message may still come back, and the Job is what tells
the redelivery it already ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from jobrunner.core.protocols import ApiRejected, JobClient, TransientError
from jobrunner.core.timestamps import age_seconds
from jobrunner.manifest.scaledjob import AckPolicy
from jobrunner.tracking.tracker import JobState, JobTracker

logger = logging.getLogger(__name__)

UNSETTLED_GRACE_SECONDS = 600.0
BUSY_RECHECK_SECONDS = 1.0


class HistoryCleaner:
    def __init__(
        self,
        *,
        jobs: JobClient,
        tracker: JobTracker,
        namespace: str,
        successful_limit: int,
        failed_limit: int,
        busy: Callable[[str], bool],
        settled: set[str],
        before_pass: Callable[[], None] = lambda: None,
    ) -> None:
        self._jobs = jobs
        self._tracker = tracker
        self._namespace = namespace
        self._limits = {True: successful_limit, False: failed_limit}
        self._busy = busy
        self._settled = settled
        self._before_pass = before_pass
        self._wanted = asyncio.Event()
        self._deleting: set[str] = set()
        self.deleted = 0

    def trigger(self) -> None:
        self._wanted.set()

    def set_limits(self, *, successful: int, failed: int) -> None:
        """New history limits, applied at once (the operator changes them live)."""
        self._limits = {True: successful, False: failed}
        self.trigger()

    def surplus(self) -> list[str]:
        """Names to delete now, oldest first."""
        return self.plan()[0]

    def plan(self) -> tuple[list[str], float | None]:
        """Names to delete now (oldest first), and in how many seconds a Job kept back
        only for now (its message still in hand, or not yet known settled) should be
        looked at again; None when nothing was kept back."""
        doomed: list[str] = []
        recheck: float | None = None

        def again(seconds: float) -> None:
            nonlocal recheck
            recheck = seconds if recheck is None else min(recheck, seconds)

        # A pass runs at every Job's end: one walk over the tracked Jobs, and a sort only
        # when there is something beyond a limit (at 20 Jobs/s with 1,000 in the history,
        # sorting them all each time was half of what the event loop did).
        by_outcome: dict[bool, list[JobState]] = {True: [], False: []}
        for s in self._tracker.jobs.values():
            if s.outcome is not None:
                by_outcome[s.outcome.succeeded].append(s)
        for succeeded, limit in self._limits.items():
            finished = by_outcome[succeeded]
            excess = len(finished) - limit
            if excess <= 0:
                continue
            finished.sort(key=lambda s: (s.finished_at, s.name))
            for state in finished:
                if excess <= 0:
                    break
                if state.name in self._deleting:
                    excess -= 1  # deleted already; its watch event is on the way
                    continue
                if self._busy(state.name):
                    # Its settlement triggers a pass; a Kafka commit does not, so look
                    # again soon (an in-memory check, no API call).
                    again(BUSY_RECHECK_SECONDS)
                    continue
                if not self._is_settled(state):
                    age = age_seconds(state.finished_at)
                    if age < UNSETTLED_GRACE_SECONDS:
                        # Settled elsewhere (a mark arriving by watch), or the grace ends.
                        again(min(BUSY_RECHECK_SECONDS * 4, UNSETTLED_GRACE_SECONDS - age))
                        continue
                doomed.append(state.name)
                excess -= 1
        return doomed, recheck

    def _is_settled(self, state: JobState) -> bool:
        if state.settled or state.name in self._settled:
            return True
        # A Job that owns its message and succeeded has nothing left to settle.
        owns = state.ack_policy == AckPolicy.ON_JOB_CREATION.value or state.handed_over
        return owns and state.outcome is not None and state.outcome.succeeded

    async def run(self) -> None:
        """Delete surplus Jobs whenever a Job finishes or a message is settled, and
        again when a Job kept back only for now may go: promptly, whatever else happens
        (an idle queue included)."""
        recheck: float | None = None
        while True:
            with contextlib.suppress(TimeoutError):
                # Not asyncio.wait_for: on Python 3.11 it loses a cancellation that comes
                # as the event is set, and the cleaner of a stopped unit would run on.
                async with asyncio.timeout(recheck):
                    await self._wanted.wait()
            self._wanted.clear()
            self._before_pass()
            doomed, recheck = self.plan()
            for name in doomed:
                try:
                    await self._jobs.delete_job(self._namespace, name)
                    self._deleting.add(name)
                    self._settled.discard(name)
                    self.deleted += 1
                    logger.info(
                        "deleted Job %s beyond the history limit", name, extra={"job_name": name}
                    )
                except (TransientError, ApiRejected) as exc:
                    logger.warning("could not delete Job %s (%s); will retry", name, exc)
                    recheck = 1.0
                    break
            # Forget settlements of Jobs that are gone (TTL, someone else).
            self._settled.intersection_update(self._tracker.jobs)
            self._deleting.intersection_update(self._tracker.jobs)
