"""A message's Job as its sender may read it (the HTTP trigger's ``GET <path>/<id>``):
from the tracker's watch when it holds the Job, else from the API server (a Job created
a moment ago may not have reached the watch yet)."""

from __future__ import annotations

from jobrunner.core.models import JobOutcome, JobStatus
from jobrunner.core.protocols import JobClient
from jobrunner.tracking.tracker import JobTracker, outcome_of


def status_of(outcome: JobOutcome | None) -> JobStatus:
    if outcome is None:
        return JobStatus(phase="running")
    if outcome.succeeded:
        return JobStatus(phase="succeeded", reason=outcome.reason)
    return JobStatus(phase="failed", reason=outcome.reason, message=outcome.message)


async def job_status(
    name: str, *, jobs: JobClient, tracker: JobTracker, namespace: str
) -> JobStatus | None:
    """Job ``name``'s status; None when there is no such Job. TransientError when the API
    server cannot be asked now."""
    state = tracker.jobs.get(name)
    if state is not None:
        return status_of(state.outcome)
    job = await jobs.get_job(namespace, name)
    if job is None:
        return None
    return status_of(outcome_of(job))
