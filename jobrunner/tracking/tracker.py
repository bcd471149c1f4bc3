"""Follows every Job of one (namespace, label selector) to its end with a single watch.

List, then watch from the list's resourceVersion; on 410 Gone list again; on any other
break reconnect with exponential backoff. Each Job is kept as a small ``JobState`` so
tens of thousands fit in little memory. A Job deleted by someone else before it finished
resolves as a failure with reason ``JobDeleted`` rather than leaving a waiter hanging.

With ``marks`` (a ScaledJob whose pods may annotate Jobs: a function's), every Job is
screened as it comes in: a settlement mark that does not verify under the Job's own key
is dropped before anything sees it (jobrunner.core.marks), so no listener, no history cleanup
and no listing ever takes a forged ``settled`` for the truth.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobrunner.core.admission import evictions_of, is_queued, is_suspended, not_admitted_outcome
from jobrunner.core.marks import JobMarks
from jobrunner.core.models import (
    ANNOTATION_ACK_POLICY,
    ANNOTATION_HANDED_OVER,
    ANNOTATION_MESSAGE_ID,
    ANNOTATION_SETTLED,
    FINALIZER,
    JobOutcome,
    Outcome,
)
from jobrunner.core.protocols import ApiRejected, JobClient, TransientError, WatchExpired

logger = logging.getLogger(__name__)

DELETED = JobOutcome(Outcome.FAILED, "JobDeleted", "the Job was deleted before it finished")


def outcome_of(job: Mapping[str, Any]) -> JobOutcome | None:
    """Finished means a ``Complete`` or ``Failed`` condition that is True (as KEDA reads it);
    an unfinished Job whose deletion has begun (``deletionTimestamp``: our finalizer keeps
    it) has ended too, as ``JobDeleted`` (or, ended because Kueue can never admit it, as
    the reason ``core.admission.ANNOTATION_NOT_ADMITTED`` gives)."""
    outcome = _condition_outcome(job)
    if outcome is None and (job.get("metadata") or {}).get("deletionTimestamp"):
        # Ended by jobrunner because Kueue can never admit it: that reason, not a deletion.
        told = not_admitted_outcome(job)
        if told is not None:
            return JobOutcome(Outcome.FAILED, *told)
        return DELETED
    return outcome


def _condition_outcome(job: Mapping[str, Any]) -> JobOutcome | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return JobOutcome(
                Outcome.SUCCEEDED,
                condition.get("reason") or "Complete",
                condition.get("message") or "",
            )
        if condition.get("type") == "Failed":
            return JobOutcome(
                Outcome.FAILED, condition.get("reason") or "Failed", condition.get("message") or ""
            )
    return None


@dataclass(slots=True)
class JobState:
    name: str
    uid: str
    created: str
    outcome: JobOutcome | None = None
    finished_at: str = ""
    ack_policy: str = ""
    handed_over: bool = False
    settled: str = ""
    message_id: str = ""
    """The identity of the message the Job was made for (its annotation)."""
    deleting: bool = False
    """Its deletion has begun (``deletionTimestamp``)."""
    guarded: bool = False
    """It carries jobrunner's finalizer: its message's fate is not yet durable."""
    queued: bool = False
    """Kueue manages it (``kueue.x-k8s.io/queue-name``): ``suspended`` is its admission."""
    suspended: bool = False
    """``spec.suspend``: for a queued Job, waiting for admission (or evicted, requeued)."""
    started: bool = False
    """It has had a pod (``status.startTime`` set by the Job controller once running)."""
    evictions: int = 0
    """Kueue evictions recorded on it (``core.admission.ANNOTATION_EVICTIONS``)."""

    @classmethod
    def from_object(cls, job: Mapping[str, Any]) -> JobState:
        meta = job.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        status = job.get("status") or {}
        outcome = outcome_of(job)
        finished_at = ""
        if outcome is not None:
            finished_at = (
                status.get("completionTime")
                or _condition_time(status)
                or meta.get("deletionTimestamp")
                or meta.get("creationTimestamp", "")
            )
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            created=meta.get("creationTimestamp", ""),
            outcome=outcome,
            finished_at=finished_at,
            ack_policy=annotations.get(ANNOTATION_ACK_POLICY, ""),
            handed_over=annotations.get(ANNOTATION_HANDED_OVER) == "true",
            settled=annotations.get(ANNOTATION_SETTLED, ""),
            message_id=annotations.get(ANNOTATION_MESSAGE_ID, ""),
            deleting=bool(meta.get("deletionTimestamp")),
            guarded=FINALIZER in (meta.get("finalizers") or []),
            queued=is_queued(job),
            suspended=is_suspended(job),
            started=bool(status.get("startTime")),
            evictions=evictions_of(job),
        )

    @property
    def pending_admission(self) -> bool:
        """Waiting for Kueue to admit it: queued, suspended and not finished."""
        return self.queued and self.suspended and self.outcome is None


def _condition_time(status: Mapping[str, Any]) -> str:
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return str(condition.get("lastTransitionTime") or "")
    return ""


FinishedListener = Callable[[JobState, JobOutcome], None]
AdmissionListener = Callable[[JobState, "JobState | None"], None]
"""Called with the new and the previous state (None: first seen) of an unfinished queued
Job whose admission (``suspended``) or start changed."""


def _admission_changed(old: JobState | None, new: JobState) -> bool:
    return old is None or old.suspended != new.suspended or old.started != new.started


@dataclass
class _Backoff:
    initial: float = 0.2
    ceiling: float = 30.0
    current: float = field(default=0.0)

    def next(self) -> float:
        self.current = min(self.ceiling, max(self.initial, self.current * 2))
        return self.current * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self.current = 0.0


class JobTracker:
    def __init__(
        self,
        *,
        client: JobClient,
        namespace: str,
        selector: str,
        backoff_ceiling: float = 30.0,
        marks: JobMarks | None = None,
    ) -> None:
        self._client = client
        self._marks = marks
        self.namespace = namespace
        self.selector = selector
        self.jobs: dict[str, JobState] = {}
        self._waiters: dict[str, list[asyncio.Future[JobOutcome]]] = {}
        self._listeners: list[FinishedListener] = []
        self._deletion_listeners: list[Callable[[JobState], None]] = []
        self._admission_listeners: list[AdmissionListener] = []
        self.synced = asyncio.Event()
        self._backoff = _Backoff(ceiling=backoff_ceiling)

    def on_finished(self, listener: FinishedListener) -> None:
        """Called once per Job when it is first seen finished (or deleted unfinished)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: FinishedListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def on_deletion(self, listener: Callable[[JobState], None]) -> None:
        """Called once per Job that still carries jobrunner's finalizer when it is first
        seen being deleted (after ``on_finished``, which a deletion also triggers for a
        Job that had not finished)."""
        self._deletion_listeners.append(listener)

    def remove_deletion_listener(self, listener: Callable[[JobState], None]) -> None:
        if listener in self._deletion_listeners:
            self._deletion_listeners.remove(listener)

    def on_admission(self, listener: AdmissionListener) -> None:
        """Called for an unfinished queued Job first seen, admitted, evicted or started."""
        self._admission_listeners.append(listener)

    def remove_admission_listener(self, listener: AdmissionListener) -> None:
        if listener in self._admission_listeners:
            self._admission_listeners.remove(listener)

    def pending_admission(self) -> list[str]:
        """Unfinished queued Jobs that Kueue has not admitted (or has evicted)."""
        return [name for name, state in self.jobs.items() if state.pending_admission]

    def deleting(self) -> list[JobState]:
        """Jobs whose deletion waits on jobrunner's finalizer."""
        return [s for s in self.jobs.values() if s.deleting and s.guarded]

    def unfinished(self) -> list[str]:
        return [name for name, state in self.jobs.items() if state.outcome is None]

    async def wait_for(self, name: str) -> JobOutcome:
        state = self.jobs.get(name)
        if state is not None and state.outcome is not None:
            return state.outcome
        future: asyncio.Future[JobOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, []).append(future)
        try:
            return await future
        finally:
            waiters = self._waiters.get(name)
            if waiters and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[name]

    def _resolve(self, state: JobState, outcome: JobOutcome) -> None:
        for future in self._waiters.pop(state.name, []):
            if not future.done():
                future.set_result(outcome)
        for listener in self._listeners:
            try:
                listener(state, outcome)
            except Exception:
                logger.exception("finished-listener failed for job %s", state.name)

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        new = JobState.from_object(obj)
        old = self.jobs.get(new.name)
        if kind == "DELETED":
            self.jobs.pop(new.name, None)
            if old is None or old.outcome is None:
                finished = new.outcome or DELETED
                new.outcome = finished
                self._resolve(new, finished)
            return
        self.jobs[new.name] = new
        if new.outcome is not None and (old is None or old.outcome is None):
            self._resolve(new, new.outcome)
        elif new.queued and new.outcome is None and _admission_changed(old, new):
            for admission_listener in self._admission_listeners:
                try:
                    admission_listener(new, old)
                except Exception:
                    logger.exception("admission-listener failed for job %s", new.name)
        if new.deleting and new.guarded and not (old is not None and old.deleting):
            for deletion_listener in self._deletion_listeners:
                try:
                    deletion_listener(new)
                except Exception:
                    logger.exception("deletion-listener failed for job %s", new.name)

    async def _screened(self, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        """``obj`` without the marks that do not verify (with ``marks``); TransientError
        when the key cannot be read now (the watch then starts over)."""
        if self._marks is None:
            return obj
        return await self._marks.screen(obj)

    async def _list(self) -> str:
        """List page by page, keeping only a JobState per Job so a large listing never
        sits in memory whole; then count Jobs gone since the last listing as deleted."""
        seen: set[str] = set()
        token: str | None = None
        resource_version = ""
        while True:
            page = await self._client.list_jobs(self.namespace, self.selector, continue_token=token)
            resource_version = resource_version or page.resource_version
            for obj in page.items:
                seen.add((obj.get("metadata") or {}).get("name", ""))
                self._apply("MODIFIED", await self._screened(obj))
            token = page.continue_token
            if not token:
                break
        for name in [n for n in self.jobs if n not in seen]:
            state = self.jobs[name]
            self._apply("DELETED", {"metadata": {"name": name, "uid": state.uid}})
        return resource_version

    async def run(self) -> None:
        """List and watch until cancelled."""
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._list()
                    self.synced.set()
                    logger.debug(
                        "listed %d jobs in %s (%s)", len(self.jobs), self.namespace, self.selector
                    )
                async for event in self._client.watch_jobs(
                    self.namespace, self.selector, resource_version
                ):
                    self._backoff.reset()
                    meta = event.object.get("metadata") or {}
                    resource_version = meta.get("resourceVersion") or resource_version
                    if event.type == "DELETED":
                        self._apply(event.type, event.object)  # gone: nothing left to act on
                    elif event.type != "BOOKMARK":
                        self._apply(event.type, await self._screened(event.object))
            except WatchExpired:
                logger.info("watch on %s expired (410 Gone); listing again", self.namespace)
                resource_version = None
            except (TransientError, ApiRejected) as exc:
                self.synced.clear()
                delay = self._backoff.next()
                logger.warning(
                    "watch on %s broke (%s); reconnecting in %.1fs", self.namespace, exc, delay
                )
                await asyncio.sleep(delay)
                # Events may have been missed while disconnected: a fresh list is exact.
                resource_version = None
