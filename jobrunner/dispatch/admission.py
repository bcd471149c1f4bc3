"""Admission by Kueue as a state of its own, for one ScaledJob's queued Jobs
(jobrunner.core.admission says which Jobs are queued and how their state reads).

* The tracker tells each change of a queued Job (first seen, admitted, evicted, started);
  the slot it holds moves between waiting and admitted (``ActiveJobs.admission``), so
  ``maxPendingAdmission`` bounds the Jobs that wait for quota.
* An eviction (preemption, a lost admission check) is not a failure: the Job keeps its
  message and its name, Kueue requeues it, and it is settled when it finally ends. It is
  counted, logged, put in an Event on the Job with Kueue's reason, and on the message's
  trace.
* A Job that Kueue says can never be admitted (``WorkloadView.never_admitted``) for
  ``inadmissibleTimeoutSeconds`` is ended: annotated with the reason
  (``ANNOTATION_NOT_ADMITTED``), then deleted (the finalizer keeps it until its message
  is dead-lettered with that reason, whichever dispatcher does it).

The timeout is checked by ``run``, a loop that reads the Workloads of the Jobs that have
waited at least that long: at most ``maxPendingAdmission`` reads a pass (those are the
only Jobs that wait). Imports, of the dispatch modules, ``scope``, ``events``,
``limiter`` and ``metrics``.
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
    REASON_SECRET_NOT_SENT,
    dispatched_by_multikueue,
    pod_uses_secret,
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
        """Monotonic time each waiting Job was first seen waiting (this dispatcher)."""
        self._ending: set[str] = set()

    def job_changed(self, state: JobState, old: JobState | None) -> None:
        """Listener of the tracker's ``on_admission``."""
        name = state.name
        span = self._span_of(name)
        if state.suspended:
            self._limiter.admission(name, pending=True)
            self._waiting_since.setdefault(name, time.monotonic())
            if old is not None and not old.suspended:
                self._evicted(state, span)
            return
        self._limiter.admission(name, pending=False)
        since = self._waiting_since.pop(name, None)
        if old is not None and old.suspended:
            # Waiting since it was first seen waiting here (or since its creation, when
            # this dispatcher started while it waited). A Job first seen admitted was
            # admitted before this dispatcher looked (a restart): not counted again.
            waited = (
                time.monotonic() - since
                if since is not None
                else seconds_between(state.created, now_rfc3339())
            )
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
        self._scope.spawn(self._tell_eviction(state), name=f"eviction-{state.name}")

    async def _tell_eviction(self, state: JobState) -> None:
        """The count on the Job, and an Event with Kueue's reason (best effort: the
        eviction is counted in the metrics whether or not these can be written)."""
        reason = ""
        jobs = self._scope.jobs
        count = {ANNOTATION_EVICTIONS: str(state.evictions + 1)}
        try:
            await jobs.annotate_job(self._scope.namespace, state.name, count)
        except (ApiRejected, TransientError) as exc:
            self._scope.job_log(state.name).info("could not count the eviction: %s", exc)
        if isinstance(jobs, ReadsWorkloads) and state.uid:
            try:
                workload = await jobs.workload_of(self._scope.namespace, state.uid)
            except (ApiRejected, TransientError, ValueError):
                workload = None
            told = workload.eviction() if workload is not None else None
            if told is not None:
                reason = f": {kueue_words(*told)}"
        self._events.on_name(
            state.name,
            "Normal",
            "Evicted",
            f"evicted by Kueue{reason}; requeued, the message stays with this Job",
        )

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

    async def run(self) -> None:
        """Until cancelled: end the Jobs Kueue can never admit (see the module docstring).
        Nothing to do, and returns at once, when the Job client cannot read Workloads."""
        jobs = self._scope.jobs
        if not isinstance(jobs, ReadsWorkloads):
            await asyncio.Event().wait()  # nothing will ever be checked; wait to be cancelled
        while True:
            timeout = self._scope.scaledjob.spec.inadmissibleTimeoutSeconds
            await asyncio.sleep(min(PASS_SECONDS_MAX, max(1.0, timeout / 5)))
            now = time.monotonic()
            for name, since in list(self._waiting_since.items()):
                if now - since >= timeout and name not in self._ending:
                    await self._check(name, bound=timeout)

    async def _check(self, name: str, *, bound: float) -> None:
        scope = self._scope
        state = scope.tracker.jobs.get(name)
        jobs = scope.jobs
        if state is None or not state.pending_admission or not isinstance(jobs, ReadsWorkloads):
            self._waiting_since.pop(name, None)
            return
        try:
            workload = await jobs.workload_of(scope.namespace, state.uid)
        except (ApiRejected, TransientError, ValueError) as exc:
            scope.job_log(name).info("could not read the Workload of Job %s: %s", name, exc)
            return
        never = workload.never_admitted() if workload is not None else None
        if never is None:
            return
        reason, message, since = never
        held = seconds_between(since, now_rfc3339()) if since else None
        if held is not None and held < bound:
            return  # Kueue has said so for less than the timeout (it changed its mind)
        self._ending.add(name)
        try:
            await self._end(state, reason, f"Kueue cannot admit it: {kueue_text(message)}")
        finally:
            self._ending.discard(name)

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
        self._ending.add(state.name)
        try:
            await self._end(
                state,
                REASON_SECRET_NOT_SENT,
                "MultiKueue runs this Job on a worker cluster, which does not get its message "
                f"Secret {secret}; deliver the message in env (messageDelivery: env, a body "
                "under the env bound, no function) for a ScaledJob whose LocalQueue "
                "dispatches by MultiKueue",
            )
        finally:
            self._ending.discard(state.name)

    async def _end(self, state: JobState, reason: str, detail: str) -> None:
        """Annotate the reason, then delete: the Job then reads as failed for it."""
        scope, name = self._scope, state.name
        detail = detail[:4000]
        scope.job_log(name).warning("ending Job %s (%s): %s", name, reason, detail[:512])
        told = json.dumps({"reason": reason, "detail": detail})
        try:
            await scope.retry(
                lambda: scope.jobs.annotate_job(
                    scope.namespace, name, {ANNOTATION_NOT_ADMITTED: told}
                )
            )
            await scope.retry(lambda: scope.jobs.delete_job(scope.namespace, name))
        except ApiRejected as exc:
            scope.job_log(name).warning("could not end Job %s: %s", name, exc)
            return
        self._waiting_since.pop(name, None)


KUEUE_TEXT_MAX = 1024
"""The most of a Kueue condition message that reaches an Event or a dead letter."""


def kueue_words(reason: str, message: str) -> str:
    """Kueue's reason and message on a Workload, as jobrunner repeats them: redacted and
    bounded. An exception to "never a server's text" (README, Security), and why it is
    safe: Kueue writes it about the tenant's own Workload, from queue, flavor and quota
    names, and the tenant reads the same on that Workload (Kueue's user roles grant
    it); no address a tenant chooses produces it."""
    reason = reason if reason.isidentifier() else "Unknown"
    text = kueue_text(message)
    return f"{reason} ({text})" if text else reason


def kueue_text(message: str) -> str:
    """A Kueue condition message, redacted and bounded (see ``kueue_words``)."""
    return redact(message)[:KUEUE_TEXT_MAX]
