"""A finished Job's result (``JobResult``), read from the Job object and what its last
pod's containers ended with: one pure function shared by the Kubernetes client (which
reads the pod) and the local executor (which keeps the same facts in its Job record), so
both give the same answer for the same Job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobrunner.core.models import TERMINATION_MESSAGE_LIMIT, JobResult
from jobrunner.core.timestamps import seconds_between
from jobrunner.tracking.tracker import outcome_of


@dataclass(frozen=True)
class Ended:
    """One container of the last attempt, as it terminated."""

    container: str
    exit_code: int | None
    message: str = ""


def bounded_message(raw: bytes | str) -> str:
    """A termination message as the kubelet keeps it: at most
    ``TERMINATION_MESSAGE_LIMIT`` bytes (the rest dropped), as text."""
    data = raw.encode() if isinstance(raw, str) else raw
    return data[:TERMINATION_MESSAGE_LIMIT].decode("utf-8", errors="replace")


def result_of(job: Mapping[str, Any], ended: Sequence[Ended] = ()) -> JobResult | None:
    """The Job's result, or None while it has not finished. The container it speaks
    for is the first of ``ended`` that exited non-zero, else the first with a
    termination message, else the first."""
    outcome = outcome_of(job)
    if outcome is None:
        return None
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    finished = status.get("completionTime") or _finished_condition_time(status)
    duration = seconds_between(status.get("startTime") or "", finished or "")
    chosen = next((e for e in ended if e.exit_code), None)
    chosen = chosen or next((e for e in ended if e.message), None)
    chosen = chosen or (ended[0] if ended else None)
    return JobResult(
        job_name=str(meta.get("name", "")),
        outcome=outcome.outcome,
        reason=outcome.reason,
        message=outcome.message,
        exit_code=None if chosen is None else chosen.exit_code,
        duration_seconds=duration,
        payload="" if chosen is None else bounded_message(chosen.message),
        container="" if chosen is None else chosen.container,
    )


def ended_in_pod(pod: Mapping[str, Any]) -> list[Ended]:
    """The app containers of a pod that terminated (``state.terminated``, or
    ``lastState.terminated`` of a container restarted in place), in spec order."""
    status = pod.get("status") or {}
    found = []
    for item in status.get("containerStatuses") or []:
        ended = (item.get("state") or {}).get("terminated") or (
            (item.get("lastState") or {}).get("terminated") or {}
        )
        if not ended:
            continue
        code = ended.get("exitCode")
        found.append(
            Ended(
                container=str(item.get("name", "")),
                exit_code=None if code is None else int(code),
                message=bounded_message(str(ended.get("message") or "")),
            )
        )
    order = [c.get("name") for c in ((pod.get("spec") or {}).get("containers") or [])]
    found.sort(key=lambda e: order.index(e.container) if e.container in order else len(order))
    return found


def _finished_condition_time(status: Mapping[str, Any]) -> str:
    for condition in status.get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return str(condition.get("lastTransitionTime") or "")
    return ""
