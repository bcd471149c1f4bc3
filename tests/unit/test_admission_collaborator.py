"""The dispatcher's Kueue collaborator (jobrunner.dispatch.admission) on a scripted Job
client: when a Job is ended for Kueue's reasons and when it must not be (a reviewer's
reproductions of #25, turned into the behaviour they asked for), and what a tenant who
flips ``spec.suspend`` can make it do. Pure logic; tests/integration/test_kueue.py has the
same against the real Kueue."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from jobrunner.core.admission import ANNOTATION_NOT_ADMITTED, WorkloadView
from jobrunner.core.protocols import ApiRejected
from jobrunner.dispatch.admission import Admission
from jobrunner.dispatch.limiter import ActiveJobs
from jobrunner.tracking.tracker import JobState

UID = "0b7c6d1e-1111-4222-8333-944455556666"
MISSING = {"reason": "Inadmissible", "message": "LocalQueue lq doesn't exist"}
BUSY = {
    "reason": "Pending",
    "message": "couldn't assign flavors to pod set main: insufficient unused quota for cpu "
    "in flavor kwok, 1 more needed",
}


def workload(reserved: dict[str, str]) -> dict[str, Any]:
    condition = {"type": "QuotaReserved", "status": "False", **reserved}
    return {
        "metadata": {"name": "w", "ownerReferences": [{"uid": UID, "controller": True}]},
        "status": {"conditions": [{**condition, "lastTransitionTime": "2026-12-08T00:00:00Z"}]},
    }


class ScriptedJobs:
    """Answers ``workload_of`` with ``workloads`` in turn (the last one for good); records
    every write. ``suspended``: what a patch answers for the Job's spec.suspend."""

    def __init__(self, *workloads: dict[str, Any], suspended: bool = True) -> None:
        self.workloads = list(workloads)
        self.suspended = suspended
        self.calls: list[tuple[Any, ...]] = []
        self.before_answer: Callable[[], None] = lambda: None

    async def workload_of(self, namespace: str, job_uid: str) -> WorkloadView | None:
        self.calls.append(("list",))
        self.before_answer()
        w = self.workloads.pop(0) if len(self.workloads) > 1 else self.workloads[0]
        return WorkloadView.from_object(w)

    async def annotate_job(self, ns: str, name: str, ann: dict[str, str]) -> dict[str, Any]:
        self.calls.append(("annotate", name, dict(ann)))
        return {"metadata": {"name": name}, "spec": {"suspend": self.suspended}}

    async def delete_job(self, ns: str, name: str) -> None:
        self.calls.append(("delete", name))


def waiting(name: str = "j1", *, suspended: bool = True) -> JobState:
    return JobState(name=name, uid=UID, created="", queued=True, suspended=suspended)


def admission(jobs: Any, state: JobState, *, spawned: list[Any] | None = None) -> Admission:
    log = logging.LoggerAdapter(logging.getLogger("test"), {})

    async def retry(call: Callable[[], Awaitable[Any]]) -> Any:
        return await call()

    def spawn(coro: Any, name: str) -> Any:
        task = asyncio.ensure_future(coro)
        if spawned is not None:
            spawned.append(task)
        return task

    scope = SimpleNamespace(
        scaledjob=SimpleNamespace(spec=SimpleNamespace(inadmissibleTimeoutSeconds=300.0)),
        tracker=SimpleNamespace(jobs={state.name: state}),
        jobs=jobs,
        namespace="media",
        log=log,
        job_log=lambda *a, **k: log,
        retry=retry,
        spawn=spawn,
    )
    events = SimpleNamespace(on_name=lambda *a: jobs.calls.append(("event",)))
    metrics = SimpleNamespace(evicted=lambda: None, admitted=lambda waited: None)
    return Admission(scope=scope, limiter=ActiveJobs(10, 5), events=events, metrics=metrics)  # type: ignore[arg-type]


def writes(jobs: ScriptedJobs) -> list[str]:
    return [c[0] for c in jobs.calls if c[0] != "list"]


async def test_a_job_is_ended_only_after_every_read_said_never_for_the_whole_bound() -> None:
    jobs = ScriptedJobs(workload(MISSING))
    state = waiting()
    adm = admission(jobs, state)
    adm._waiting_since[state.name] = time.monotonic() - 3600  # waited an hour for quota
    await adm._check(state.name, bound=300)
    assert writes(jobs) == [], "the first read of 'never' starts the count; it ends nothing"
    adm._never_since[state.name] = ("Inadmissible", time.monotonic() - 301)
    await adm._check(state.name, bound=300)
    assert writes(jobs) == ["annotate", "delete"]


async def test_a_read_that_can_fit_starts_the_count_again() -> None:
    jobs = ScriptedJobs(workload(MISSING), workload(BUSY), workload(MISSING))
    state = waiting()
    adm = admission(jobs, state)
    adm._never_since[state.name] = ("Inadmissible", time.monotonic() - 301)
    jobs.workloads.insert(0, workload(BUSY))
    await adm._check(state.name, bound=300)  # quota in use now: waiting
    await adm._check(state.name, bound=300)  # 'never' again: counted from now
    assert writes(jobs) == []
    assert time.monotonic() - adm._never_since[state.name][1] < 5


async def test_a_job_admitted_between_the_read_and_the_end_runs_on() -> None:
    jobs = ScriptedJobs(workload(MISSING), suspended=False)  # the patch answers admitted
    state = waiting()
    adm = admission(jobs, state)
    adm._never_since[state.name] = ("Inadmissible", time.monotonic() - 301)
    await adm._check(state.name, bound=300)
    assert ("delete", "j1") not in jobs.calls
    last = jobs.calls[-1]
    assert last[0] == "annotate"
    assert last[2] == {ANNOTATION_NOT_ADMITTED: ""}, "the reason is taken back"


async def test_a_job_seen_admitted_meanwhile_is_not_ended() -> None:
    jobs = ScriptedJobs(workload(MISSING))
    state = waiting()
    adm = admission(jobs, state)
    adm._never_since[state.name] = ("Inadmissible", time.monotonic() - 301)
    tracker_jobs = adm._scope.tracker.jobs

    def admitted() -> None:
        tracker_jobs[state.name] = waiting(suspended=False)

    jobs.before_answer = admitted
    await adm._check(state.name, bound=300)
    assert writes(jobs) == []


async def test_a_forbidden_workload_read_is_said_once_at_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Forbidden(ScriptedJobs):
        async def workload_of(self, namespace: str, job_uid: str) -> WorkloadView | None:
            raise ApiRejected(403, "Forbidden", "workloads.kueue.x-k8s.io is forbidden")

    jobs = Forbidden(workload(MISSING))
    state = waiting()
    adm = admission(jobs, state)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        await adm._check(state.name, bound=300)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rbac.readKueueWorkloads" in warnings[0].getMessage()


async def test_a_tenant_flipping_suspend_cannot_make_the_operator_write_without_bound() -> None:
    jobs = ScriptedJobs(workload(BUSY))
    state = waiting()
    spawned: list[Any] = []
    adm = admission(jobs, state, spawned=spawned)
    up, down = waiting(suspended=False), waiting(suspended=True)
    for _ in range(200):
        adm.job_changed(up, down)
        adm.job_changed(down, up)
    await asyncio.gather(*spawned)
    assert len(spawned) == 1, "one count and Event per Job per quiet period"
    assert len(jobs.calls) <= 3


async def test_a_job_kueue_made_no_workload_for_is_ended_as_no_workload() -> None:
    class NoWorkload(ScriptedJobs):
        async def workload_of(self, namespace: str, job_uid: str) -> WorkloadView | None:
            self.calls.append(("list",))
            return None

    jobs = NoWorkload(workload(BUSY))
    state = waiting()
    adm = admission(jobs, state)
    await adm._check(state.name, bound=300)
    assert writes(jobs) == [], "the first read starts the count"
    adm._never_since[state.name] = ("NoWorkload", time.monotonic() - 301)
    await adm._check(state.name, bound=300)
    assert writes(jobs) == ["annotate", "delete"]
    told = next(c for c in jobs.calls if c[0] == "annotate")[2][ANNOTATION_NOT_ADMITTED]
    assert '"NoWorkload"' in told
    assert "WorkloadPriorityClass" in told
