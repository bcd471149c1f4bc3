"""A message's Job as its sender may read it (the HTTP trigger's ``GET <path>/<id>``):
from the tracker's watch when it holds the Job, else from the API server (a Job created
a moment ago may not have reached the watch yet)."""

from __future__ import annotations

from dataclasses import replace

from jobrunner.core.models import JobOutcome, JobStatus
from jobrunner.core.protocols import JobClient, ReadsResults
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
    """Job ``name``'s status; None when there is no such Job. A finished Job's status
    carries its result (exit code, duration, the termination message as ``payload``, at
    most 4096 bytes) when the executor can read it. TransientError when the API server
    cannot be asked now."""
    state = tracker.jobs.get(name)
    if state is not None:
        status = status_of(state.outcome)
    else:
        job = await jobs.get_job(namespace, name)
        if job is None:
            return None
        status = status_of(outcome_of(job))
    if status.phase == "running" or not isinstance(jobs, ReadsResults):
        return status
    result = await jobs.job_result(namespace, name)
    if result is None:
        return status
    return replace(
        status,
        result={
            "exitCode": result.exit_code,
            "durationSeconds": result.duration_seconds,
            "payload": result.payload,
        },
    )
