"""Admission by Kueue as a state of its own, for one ScaledJob's queued Jobs
(jobrunner.core.admission says which Jobs are queued and how their state reads).

* The tracker tells each change of a queued Job (first seen, admitted, evicted, started);
  the slot it holds moves between waiting and admitted (``ActiveJobs.admission``), so
  ``maxPendingAdmission`` bounds the Jobs that wait for quota.
* An eviction (preemption, a lost admission check) is not a failure: the Job keeps its
  message and its name, Kueue requeues it, and it is settled when it finally ends. It is
  counted on the Job and in the metrics, logged, told in an Event with Kueue's reason
  code, and on the message's trace. The Event and the count are written at most once per
  ``EVICTION_QUIET_SECONDS`` per Job and ``EVICTION_TELLERS`` at once: a tenant who flips
  ``spec.suspend`` of their own Jobs cannot make the operator write without bound.
* A Job that Kueue says can never be admitted (``WorkloadView.never_admitted``), read so
  by this dispatcher on every read for ``inadmissibleTimeoutSeconds``, is ended: annotated
  with the reason (``ANNOTATION_NOT_ADMITTED``), checked still waiting in the patch's
  answer, then deleted (the finalizer keeps it until its message is dead-lettered with
  that reason, whichever dispatcher does it). A read that says anything else starts the
  count again.

``run`` reads, each pass, the Workloads of the Jobs that have waited half the timeout or
more (at most ``READS_PER_PASS``, oldest first). Imports, of the dispatch modules,
``scope``, ``events``, ``limiter`` and ``metrics``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span

from jobrunner.core.admission import (
    ANNOTATION_EVICTIONS,
    ANNOTATION_NOT_ADMITTED,
    REASON_NO_WORKLOAD,
    REASON_SECRET_NOT_SENT,
    WorkloadView,
    dispatched_by_multikueue,
    is_suspended,
    pod_uses_secret,
    without_uids,
)
from jobrunner.core.protocols import ApiRejected, ReadsWorkloads, TransientError
from jobrunner.core.redaction import redact
from jobrunner.core.timestamps import now_rfc3339, seconds_between
from jobrunner.dispatch.events import JobEvents
from jobrunner.dispatch.limiter import ActiveJobs
from jobrunner.dispatch.metrics import DispatchMetrics
from jobrunner.dispatch.scope import Scope
from jobrunner.tracking.tracker import JobState


@dataclass(frozen=True)
class AdmissionCounts:
    """Unfinished queued Jobs by stage, and the evictions seen (for status)."""

    pending: int
    """Waiting for admission (suspended): never admitted yet, or evicted and requeued."""
    admitted: int
    """Admitted, no pod started yet."""
    running: int
    """Admitted and started."""
    evicted: int
    """Evictions recorded on the ScaledJob's Jobs (those not yet removed by history)."""


PASS_SECONDS_MAX = 30.0
"""The longest pause between two passes over the waiting Jobs."""
READS_PER_PASS = 50
"""The most Workloads read in one pass (the longest-waiting Jobs first)."""
EVICTION_QUIET_SECONDS = 10.0
"""An evicted Job's count and Event are written at most once in this many seconds."""
EVICTION_TELLERS = 8
"""The most eviction writes in flight at once; past it an eviction is only counted in
the metrics and the log."""


class Admission:
    def __init__(
        self,
        *,
        scope: Scope,
        limiter: ActiveJobs,
        events: JobEvents,
        metrics: DispatchMetrics,
        span_of: Callable[[str], Span | None] = lambda name: None,
    ) -> None:
        self._scope = scope
        self._limiter = limiter
        self._events = events
        self._metrics = metrics
        self._span_of = span_of
        """The trace span of the message in hand for Job ``name``, if any."""
        self._waiting_since: dict[str, float] = {}
        """Monotonic time each waiting Job began waiting (its creation or eviction)."""
        self._never_since: dict[str, tuple[str, float]] = {}
        """Per waiting Job: the "never" reason this dispatcher read, and since when."""
        self._ending: set[str] = set()
        self._told_at: dict[str, float] = {}
        self._telling = 0
        self._forbidden_said = False

    def job_changed(self, state: JobState, old: JobState | None) -> None:
        """Listener of the tracker's ``on_admission``."""
        name = state.name
        span = self._span_of(name)
        if state.suspended:
            self._limiter.admission(name, pending=True)
            if name not in self._waiting_since:
                # First seen (its age: a restart finds it waiting since its creation) or
                # evicted just now.
                age = seconds_between(state.created, now_rfc3339()) if old is None else 0.0
                self._waiting_since[name] = time.monotonic() - max(0.0, age or 0.0)
            if old is not None and not old.suspended:
                self._evicted(state, span)
            return
        self._limiter.admission(name, pending=False)
        since = self._waiting_since.pop(name, None)
        self._never_since.pop(name, None)
        if old is not None and old.suspended:
            # A Job first seen admitted was admitted before this dispatcher looked (a
            # restart): not counted again.
            waited = time.monotonic() - since if since is not None else None
            self._metrics.admitted(waited)
            self._scope.job_log(name).info(
                "Job %s admitted by Kueue%s",
                name,
                f" after {waited:.1f}s" if waited is not None else "",
            )
            if span is not None:
                span.add_event("admitted", {"jobrunner.admission_wait_seconds": waited or 0.0})
        if state.started and (old is None or not old.started) and span is not None:
            span.add_event("started")

    def _evicted(self, state: JobState, span: Span | None) -> None:
        self._metrics.evicted()
        self._scope.job_log(state.name).info(
            "Job %s evicted by Kueue; it keeps its message and waits to be admitted again",
            state.name,
        )
        if span is not None:
            span.add_event("evicted")
        now = time.monotonic()
        quiet = now - self._told_at.get(state.name, -EVICTION_QUIET_SECONDS)
        if quiet < EVICTION_QUIET_SECONDS or self._telling >= EVICTION_TELLERS:
            return
        self._told_at[state.name] = now
        self._telling += 1
        self._scope.spawn(self._tell_eviction(state.name), name=f"eviction-{state.name}")

    async def _tell_eviction(self, name: str) -> None:
        """The count on the Job, and an Event with Kueue's reason code (best effort: the
        eviction is counted in the metrics whether or not these can be written)."""
        try:
            scope, jobs = self._scope, self._scope.jobs
            state = scope.tracker.jobs.get(name)
            if state is None:
                return
            count = {ANNOTATION_EVICTIONS: str(state.evictions + 1)}
            try:
                await jobs.annotate_job(scope.namespace, name, count)
            except (ApiRejected, TransientError) as exc:
                scope.job_log(name).info("could not count the eviction: %s", exc)
            reason = ""
            workload = await self._workload(state)
            told = workload.eviction() if workload is not None else None
            if told is not None:
                reason = f": {told}"
            self._events.on_name(
                name,
                "Normal",
                "Evicted",
                f"evicted by Kueue{reason}; requeued, the message stays with this Job",
            )
        finally:
            self._telling -= 1

    async def _workload(self, state: JobState) -> WorkloadView | None:
        """The Job's Workload, or None when it cannot be read (said once at WARNING
        when it is forbidden: then no Job is ever ended for Kueue's reasons)."""
        return (await self._read_workload(state))[1]

    async def _read_workload(self, state: JobState) -> tuple[bool, WorkloadView | None]:
        """(read, the Workload): ``read`` False when the list failed (then the Workload is
        unknown), True with None when Kueue has made none."""
        jobs = self._scope.jobs
        if not isinstance(jobs, ReadsWorkloads) or not state.uid:
            return False, None
        try:
            return True, await jobs.workload_of(self._scope.namespace, state.uid)
        except ApiRejected as exc:
            if exc.status == 403 and not self._forbidden_said:
                self._forbidden_said = True
                self._scope.log.warning(
                    "cannot list Kueue Workloads in %s (403): Jobs Kueue can never admit "
                    "wait until someone deletes them. Grant list on workloads.kueue.x-k8s.io "
                    "(the chart's rbac.readKueueWorkloads)",
                    self._scope.namespace,
                )
            else:
                self._scope.job_log(state.name).info("could not read its Workload: %s", exc)
            return False, None
        except (TransientError, ValueError) as exc:
            self._scope.job_log(state.name).info("could not read its Workload: %s", exc)
            return False, None

    def counts(self) -> AdmissionCounts | None:
        """This ScaledJob's queued Jobs by stage, None when it has had none here."""
        jobs = self._scope.tracker.jobs.values()
        queued = [s for s in jobs if s.queued and s.outcome is None]
        evicted = sum(s.evictions for s in jobs)
        if not queued and not evicted:
            return None
        pending = sum(1 for s in queued if s.suspended)
        running = sum(1 for s in queued if not s.suspended and s.started)
        return AdmissionCounts(
            pending=pending,
            admitted=len(queued) - pending - running,
            running=running,
            evicted=evicted,
        )

    def forget(self, name: str) -> None:
        """Job ``name`` finished or is gone."""
        self._waiting_since.pop(name, None)
        self._never_since.pop(name, None)
        self._told_at.pop(name, None)

    async def run(self) -> None:
        """Until cancelled: end the Jobs Kueue can never admit (see the module docstring).
        Nothing to do when the Job client cannot read Workloads (it waits to be
        cancelled)."""
        if not isinstance(self._scope.jobs, ReadsWorkloads):
            await asyncio.Event().wait()
        while True:
            bound = self._scope.scaledjob.spec.inadmissibleTimeoutSeconds
            await asyncio.sleep(min(PASS_SECONDS_MAX, max(1.0, bound / 5)))
            now = time.monotonic()
            due = sorted(
                (since, name)
                for name, since in self._waiting_since.items()
                if now - since >= bound / 2 and name not in self._ending
            )
            for _, name in due[:READS_PER_PASS]:
                await self._check(name, bound=bound)

    async def check_created(self, job: Mapping[str, Any], *, secret: str | None) -> None:
        """A Job just created or adopted, whose message Secret is ``secret`` (None: it has
        none). One that MultiKueue dispatches to a worker cluster and whose pod needs that
        Secret could never start there (MultiKueue copies the Job, not the Secret): it is
        ended at once, its message dead-lettered ``MultiKueueSecret``."""
        if secret is None or not dispatched_by_multikueue(job) or not pod_uses_secret(job, secret):
            return
        state = JobState.from_object(job)
        if state.outcome is not None or state.name in self._ending:
            return
        await self._end(
            state,
            REASON_SECRET_NOT_SENT,
            "MultiKueue runs this Job on a worker cluster, which does not get its message "
            f"Secret {secret}; deliver the message in env (messageDelivery: env, a body "
            "under the env bound, no function) for a ScaledJob whose LocalQueue "
            "dispatches by MultiKueue",
        )

    async def _check(self, name: str, *, bound: float) -> None:
        """Read the Workload of waiting Job ``name``; end the Job once every read for
        ``bound`` seconds said it can never be admitted (the same reason each time)."""
        state = self._scope.tracker.jobs.get(name)
        if state is None or not state.pending_admission:
            self._waiting_since.pop(name, None)
            self._never_since.pop(name, None)
            return
        read, workload = await self._read_workload(state)
        if not read:
            return
        # No Workload at all, half the bound after the Job was made (Kueue makes one in
        # milliseconds): Kueue refused to, and says why only in its own log.
        never = (REASON_NO_WORKLOAD, NO_WORKLOAD) if workload is None else workload.never_admitted()
        if never is None:
            self._never_since.pop(name, None)
            return
        reason, message = never
        now = time.monotonic()
        first = self._never_since.get(name)
        if first is None or first[0] != reason:
            self._never_since[name] = (reason, now)
            return
        current = self._scope.tracker.jobs.get(name)
        if now - first[1] < bound or current is None or not current.pending_admission:
            return
        await self._end(current, reason, f"Kueue cannot admit it: {kueue_text(message)}")

    async def _end(self, state: JobState, reason: str, detail: str) -> None:
        """Annotate the reason; then, if the patched Job still waits (Kueue may have
        admitted it meanwhile) or is a MultiKueue one, delete it: it then reads as failed
        for that reason. An admitted Job gets the annotation cleared and runs on."""
        scope, name = self._scope, state.name
        self._ending.add(name)
        try:
            told = json.dumps({"reason": reason, "detail": detail[:4000]})
            job = await scope.retry(
                lambda: scope.jobs.annotate_job(
                    scope.namespace, name, {ANNOTATION_NOT_ADMITTED: told}
                )
            )
            if reason != REASON_SECRET_NOT_SENT and not is_suspended(job):
                await scope.retry(
                    lambda: scope.jobs.annotate_job(
                        scope.namespace, name, {ANNOTATION_NOT_ADMITTED: ""}
                    )
                )
                return
            scope.job_log(name).warning("ending Job %s (%s): %s", name, reason, detail[:512])
            await scope.retry(lambda: scope.jobs.delete_job(scope.namespace, name))
            self._waiting_since.pop(name, None)
            self._never_since.pop(name, None)
        except ApiRejected as exc:
            scope.job_log(name).warning("could not end Job %s: %s", name, exc)
        finally:
            self._ending.discard(name)


NO_WORKLOAD = (
    "no Workload was made for this Job; Kueue refuses to make one when a "
    "WorkloadPriorityClass the Job names (kueue.x-k8s.io/priority-class) does not exist"
)
"""The detail of ``NoWorkload`` (jobrunner's words: Kueue says nothing on the Job)."""

KUEUE_TEXT_MAX = 1024
"""The most of a Kueue condition message that reaches an Event or a dead letter."""


def kueue_text(message: str) -> str:
    """Kueue's message on why a Workload cannot be admitted, as jobrunner repeats it in
    the dead letter: redacted, without uids, bounded. An exception to "never a server's
    text" (README, Security), and why it is safe: Kueue writes it about the tenant's own
    Workload from queue, flavor and quota names, the tenant reads the same on that
    Workload (Kueue's user roles grant it), and no address a tenant chooses produces
    it. Eviction messages are never repeated (they name the preemptor)."""
    return redact(without_uids(message))[:KUEUE_TEXT_MAX]
