"""Jobs that keep their message: it was acked earlier (ack policy ``onJobCreation``, or
a handover before the broker's consumer timeout), so when such a Job finishes, or its
deletion begins, whichever dispatcher sees it settles the message from the copy the Job
keeps (a failure is dead-lettered from it) and then releases the Job's finalizer.

Also the Jobs being deleted whose message is elsewhere: released once settled, or after
a grace when no delivery of their message comes. Every settlement goes through
``settlement``. Imports, of the dispatch modules, ``settlement`` and below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from jobrunner.core.models import Action, Decision, JobOutcome
from jobrunner.core.timestamps import age_seconds
from jobrunner.dispatch.scope import Scope
from jobrunner.dispatch.settlement import Settlement
from jobrunner.manifest.scaledjob import AckPolicy
from jobrunner.tracking.tracker import JobState


def owns_message(state: JobState) -> bool:
    """The Job keeps its message (acked on creation, or handed over): failures are
    dead-lettered from its copy by whichever dispatcher sees them."""
    return state.ack_policy == AckPolicy.ON_JOB_CREATION.value or state.handed_over


class KeptCopies:
    def __init__(
        self, *, scope: Scope, settlement: Settlement, in_hand: Callable[[str], bool]
    ) -> None:
        self._scope = scope
        self._settlement = settlement
        self._in_hand = in_hand
        """Whether a delivery of Job ``name``'s message is in hand here (then its own
        task settles it)."""

    def job_finished(self, state: JobState, outcome: JobOutcome) -> None:
        """A Job was first seen finished: settle a message it keeps, or release it."""
        if not owns_message(state) or self._in_hand(state.name):
            return
        if state.settled:
            if state.guarded:  # settled, but the release did not happen (a crash)
                self._settlement.release_soon(state.name, state.settled)
            return
        if outcome.succeeded:
            if state.guarded:
                self._release_succeeded(state)
            return
        if outcome.reason == "JobDeleted" and not state.guarded:
            # A Job from before finalizers: its kept copy went with it.
            self._scope.job_log(state.name).error(
                "Job %s, which owned its acked message, was deleted before it finished", state.name
            )
            return
        self._settle_soon(state, outcome)

    def job_deleting(self, state: JobState) -> None:
        """A Job that still carries our finalizer is being deleted (a person, the TTL
        controller, history cleanup, a namespace deletion). Its message is settled
        first, then the finalizer goes and the deletion finishes:

        * its message is in hand here: the waiting task settles it (the Job's outcome,
          or ``JobDeleted`` if it had not finished) and releases the Job;
        * already settled (a crash came between the settlement and the release): release;
        * the Job keeps its message: dead-letter ``JobDeleted`` (or its failure) from the
          copy, or nothing if it succeeded; then release;
        * otherwise the message is with the broker or another dispatcher: its delivery
          adopts the Job and settles it here or there. If none comes within the grace
          (a crash came between an ack and the release), the Job is let go.
        """
        if self._in_hand(state.name):
            return
        if state.settled:
            self._settlement.release_soon(state.name, state.settled)
            return
        if owns_message(state):
            if state.outcome is not None:
                self._finished_quietly(state, state.outcome)
            return
        self._settlement.once(
            state.name, self._release_if_unclaimed(state), f"release-late-{state.name}"
        )

    def _finished_quietly(self, state: JobState, outcome: JobOutcome) -> None:
        """The settle-or-release half of ``job_finished``."""
        if outcome.succeeded and not state.settled:
            self._release_succeeded(state)
        elif state.settled:
            self._settlement.release_soon(state.name, state.settled)
        else:
            self._settle_soon(state, outcome)

    def _release_succeeded(self, state: JobState) -> None:
        """A Job that keeps its (acked) message succeeded. With a settle hook (a
        function's outputs) the success goes through the settlement so the hook runs
        before the Job is released; else the Job is simply released."""
        if not self._settlement.has_hook:
            self._settlement.release_soon(state.name, Action.ACK.value)
            return
        self._settlement.once(
            state.name, self._settle_succeeded(state.name), f"settle-kept-{state.name}"
        )

    async def _settle_succeeded(self, name: str) -> None:
        await self._settlement.settle(decision=Decision.ack(name))

    def _settle_soon(self, state: JobState, outcome: JobOutcome) -> None:
        self._settlement.once(
            state.name, self._settle_kept(state, outcome), f"settle-kept-{state.name}"
        )

    async def _settle_kept(self, state: JobState, outcome: JobOutcome) -> None:
        settlement, scope = self._settlement, self._scope
        decision = await settlement.decide(outcome, state.name)
        if decision.action is not Action.DEAD_LETTER:
            await settlement.settle(decision=decision)
            return
        job = await scope.retry(lambda: scope.jobs.get_job(scope.namespace, state.name))
        if job is None:
            scope.job_log(state.name).error(
                "Job %s vanished before its failure could be dead-lettered", state.name
            )
            return
        original = await settlement.kept_copy(job)
        if original is None:
            scope.job_log(state.name).error(
                "Job %s failed (%s) but keeps no copy of its message", state.name, outcome.reason
            )
            return
        await settlement.settle(decision=decision, original=original)

    async def _release_if_unclaimed(self, state: JobState) -> None:
        grace = self._scope.settings.unclaimed_deletion_grace_seconds
        await asyncio.sleep(max(0.0, grace - age_seconds(state.finished_at)))
        current = self._scope.tracker.jobs.get(state.name)
        if current is None or not current.guarded or self._in_hand(state.name):
            return  # released elsewhere, or its message arrived meanwhile
        self._scope.job_log(state.name).warning(
            "Job %s is being deleted and no delivery of its message came within %.0fs: "
            "its message was settled before a crash; letting the deletion finish",
            state.name,
            grace,
        )
        await self._settlement.release(state.name, "abandoned")
