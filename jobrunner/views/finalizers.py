"""``jobrunner finalizers``: see and remove jobrunner's finalizer from Jobs by hand.

Every Job jobrunner creates carries ``models.FINALIZER`` until its message has a durable
fate; a running dispatcher removes it. After jobrunner is uninstalled (or a ScaledJob is
retired for good with Jobs still guarded), nothing will: those Jobs cannot be deleted
until the finalizer is removed, which is what ``release`` does. Releasing a Job whose
message is still unsettled gives up the guarantee that a redelivery of that message
adopts the Job rather than making a second one — say so before doing it.

The settlement mark it writes (``released-by-hand``) is signed with the Job's key when
the Job has one (a function's Job, see jobrunner.core.marks), so a dispatcher that sees the
Job later trusts it as it trusts its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jobrunner.core.marks import JobMarks
from jobrunner.core.models import (
    ANNOTATION_MESSAGE_ID,
    ANNOTATION_SETTLED,
    FINALIZER,
    LABEL_MANAGED_BY,
    LABEL_SCALEDJOB,
    MANAGED_BY,
)
from jobrunner.core.protocols import JobClient
from jobrunner.tracking.tracker import outcome_of

RELEASED_BY_HAND = "released-by-hand"


@dataclass(frozen=True)
class GuardedJob:
    namespace: str
    name: str
    scaledjob: str
    message_id: str
    state: str
    """Running, Complete/Failed with the reason, or Deleting."""
    uid: str = ""

    @classmethod
    def of(cls, job: Mapping[str, Any]) -> GuardedJob:
        meta = job.get("metadata") or {}
        outcome = outcome_of(job)
        state = "Running" if outcome is None else f"{outcome.outcome.value} ({outcome.reason})"
        if meta.get("deletionTimestamp"):
            state = f"Deleting, {state}"
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            scaledjob=(meta.get("labels") or {}).get(LABEL_SCALEDJOB, ""),
            message_id=(meta.get("annotations") or {}).get(ANNOTATION_MESSAGE_ID, ""),
            state=state,
            uid=meta.get("uid", ""),
        )


def selector(scaledjob: str | None = None) -> str:
    """The label selector of jobrunner's Jobs (of one ScaledJob, when given)."""
    base = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    return f"{base},{LABEL_SCALEDJOB}={scaledjob}" if scaledjob else base


async def guarded_jobs(
    jobs: JobClient, namespaces: Iterable[str], scaledjob: str | None = None
) -> list[GuardedJob]:
    """Jobs in ``namespaces`` that still carry jobrunner's finalizer."""
    out = []
    for namespace in namespaces:
        token: str | None = None
        while True:
            page = await jobs.list_jobs(namespace, selector(scaledjob), continue_token=token)
            out += [
                GuardedJob.of(j)
                for j in page.items
                if FINALIZER in ((j.get("metadata") or {}).get("finalizers") or [])
            ]
            token = page.continue_token
            if not token:
                break
    return out


async def release(jobs: JobClient, targets: Iterable[GuardedJob]) -> int:
    """Remove the finalizer from each of ``targets``; the number released."""
    count = 0
    for job in targets:
        marks = JobMarks(jobs=jobs, namespace=job.namespace)
        mark = await marks.sign(job.name, job.uid, {ANNOTATION_SETTLED: RELEASED_BY_HAND})
        done = await jobs.release_job(job.namespace, job.name, mark)
        count += done is not None
    return count
