"""One Job list+watch per namespace shared by the trackers of many units (operator mode),
on the in-memory Job client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from jobrunner.core.models import LABEL_MANAGED_BY, LABEL_SCALEDJOB
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.operator.jobwatch import SharedJobs, compact
from jobrunner.testing import MemoryJobClient
from jobrunner.tracking.tracker import JobTracker
from tests.helpers import eventually


def job(name: str, scaledjob: str, **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {LABEL_MANAGED_BY: "jobrunner", LABEL_SCALEDJOB: scaledjob},
            "annotations": annotations,
        },
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}},
    }


async def until(check: Callable[[], bool]) -> None:
    async def ok() -> bool:
        return check()

    await eventually(ok, within=5, interval=0.02)


@pytest.fixture
async def shared() -> AsyncIterator[tuple[MemoryJobClient, SharedJobs, list[JobTracker]]]:
    inner = MemoryJobClient()
    jobs = SharedJobs(inner)
    trackers = [
        JobTracker(
            client=jobs,
            namespace="ns",
            selector=f"{LABEL_MANAGED_BY}=jobrunner,{LABEL_SCALEDJOB}={sj}",
        )
        for sj in ("a", "b", "c")
    ]
    tasks = [start_guarded(t.run(), name=f"tracker-{i}") for i, t in enumerate(trackers)]
    yield inner, jobs, trackers
    await stop_tasks(tasks, grace=0)
    await jobs.close()


async def test_many_trackers_share_one_list_and_one_watch(
    shared: tuple[MemoryJobClient, SharedJobs, list[JobTracker]],
) -> None:
    inner, _, trackers = shared
    await inner.create_job(job("a-1", "a"), None)
    await inner.create_job(job("b-1", "b"), None)
    await until(lambda: all(t.synced.is_set() for t in trackers))
    await until(lambda: sorted(trackers[0].jobs) == ["a-1"] and sorted(trackers[1].jobs) == ["b-1"])
    assert trackers[2].jobs == {}
    await inner.finish("ns", "b-1", succeeded=False, reason="DeadlineExceeded")
    await until(lambda: trackers[1].jobs["b-1"].outcome is not None)
    assert trackers[1].jobs["b-1"].outcome.reason == "DeadlineExceeded"  # type: ignore[union-attr]
    assert inner.calls["list_jobs"] == 1
    assert inner.calls["watch_jobs"] == 1


async def test_a_broken_feed_makes_every_tracker_list_again(
    shared: tuple[MemoryJobClient, SharedJobs, list[JobTracker]],
) -> None:
    inner, jobs, trackers = shared
    await until(lambda: all(t.synced.is_set() for t in trackers))
    feed = jobs._feeds["ns"]
    # The feed breaks (its error path bumps the epoch and wakes the watchers): every
    # tracker's watch ends with TransientError, so each lists again and misses nothing.
    lists = inner.calls.get("list_jobs", 0)
    feed.epoch += 1
    feed._wake()
    await until(lambda: not all(t.synced.is_set() for t in trackers) or True)
    await inner.create_job(job("a-2", "a"), None)
    await until(lambda: "a-2" in trackers[0].jobs)
    await until(lambda: all(t.synced.is_set() for t in trackers))
    assert inner.calls.get("list_jobs", 0) == lists, "trackers list from the shared copy"


def test_compact_copy_keeps_what_a_tracker_reads_and_not_the_bulky_message() -> None:
    raw = job(
        "a-1",
        "a",
        **{"jobrunner.dev/original-message": "x" * 100_000, "jobrunner.dev/message-id": "m"},
    )
    raw["metadata"]["managedFields"] = [{"manager": "x"}]
    raw["metadata"]["finalizers"] = ["jobrunner.dev/settlement"]
    raw["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    small = compact(raw)
    assert "spec" not in small
    assert "managedFields" not in small["metadata"]
    assert small["metadata"]["annotations"] == {"jobrunner.dev/message-id": "m"}
    assert small["metadata"]["finalizers"] == ["jobrunner.dev/settlement"]
    assert small["status"] == raw["status"]


async def test_watch_that_falls_behind_the_log_is_told_to_list_again() -> None:
    from jobrunner.core.protocols import WatchExpired
    from jobrunner.operator import jobwatch

    inner = MemoryJobClient()
    jobs = SharedJobs(inner)
    old, jobwatch.LOG_SIZE = jobwatch.LOG_SIZE, 3
    try:
        page = await jobs.list_jobs("ns", "")
        feed = jobs._feeds["ns"]
        feed.log = type(feed.log)(maxlen=3)
        for i in range(6):
            await inner.create_job(job(f"a-{i}", "a"), None)
        await until(lambda: feed.version >= 6)
        with pytest.raises(WatchExpired):
            async for _ in jobs.watch_jobs("ns", "", page.resource_version):
                pass
    finally:
        jobwatch.LOG_SIZE = old
        await jobs.close()
    await asyncio.sleep(0)


async def test_shared_jobs_is_a_token_reviewer_when_its_client_is() -> None:
    """Under the operator the runner sees SharedJobs, not the real client: without the
    pass-through every ``auth: tokenReview`` request was answered 503."""
    from jobrunner.core.models import TokenReview
    from jobrunner.core.protocols import TokenReviewer, TransientError

    asked: list[tuple[str, tuple[str, ...]]] = []

    class Reviewing(MemoryJobClient):
        async def review_token(self, token: str, *, audiences: tuple[str, ...] = ()) -> TokenReview:
            asked.append((token, audiences))
            return TokenReview(authenticated=True, username="system:serviceaccount:a:b")

    shared = SharedJobs(Reviewing())
    assert isinstance(shared, TokenReviewer)
    review = await shared.review_token("t", audiences=("hooks",))
    assert review.username == "system:serviceaccount:a:b"
    assert asked == [("t", ("hooks",))]
    with pytest.raises(TransientError):
        await SharedJobs(MemoryJobClient()).review_token("t")


def test_shared_jobs_offers_every_capability_the_real_client_has() -> None:
    """The kind of fault behind the token review above (and Kueue's Workloads after it):
    the runner finds optional capabilities by protocol (``isinstance``), and under the
    operator it sees SharedJobs, so a capability the real client has and the wrapper
    lacks silently disappears. Every runtime-checkable protocol the Kubernetes client
    implements, SharedJobs implements too."""
    import inspect
    import typing

    from jobrunner.core import protocols
    from jobrunner.kube.client import KubeJobClient

    checked = []
    for name, proto in inspect.getmembers(protocols, inspect.isclass):
        if (
            not getattr(proto, "_is_runtime_protocol", False)
            or proto.__module__ != protocols.__name__
        ):
            continue
        members = typing._get_protocol_attrs(proto)  # type: ignore[attr-defined]
        if all(hasattr(KubeJobClient, m) for m in members):
            checked.append(name)
            missing = [m for m in members if not hasattr(SharedJobs, m)]
            assert not missing, f"SharedJobs lacks {name}: {missing}"
    assert {"ReadsWorkloads", "ReadsResults", "TokenReviewer", "DescribesFailures"} <= set(checked)


def test_the_shared_copy_of_a_job_reads_as_the_job_itself() -> None:
    """Every field the tracker reads survives ``compact`` (once ``spec.suspend`` did not:
    under the operator every Job Kueue held back read as admitted)."""
    from dataclasses import asdict

    from jobrunner.tracking.tracker import JobState

    job = {
        "metadata": {
            "name": "j",
            "namespace": "ns",
            "uid": "u-1",
            "resourceVersion": "7",
            "creationTimestamp": "2026-12-08T01:00:00Z",
            "deletionTimestamp": "2026-12-08T01:09:00Z",
            "finalizers": ["jobrunner.dev/settlement"],
            "labels": {"kueue.x-k8s.io/queue-name": "lq", "jobrunner.dev/scaledjob": "s"},
            "annotations": {
                "jobrunner.dev/message-id": "m",
                "jobrunner.dev/ack-policy": "onJobCompletion",
                "jobrunner.dev/handed-over": "true",
                "jobrunner.dev/settled": "ack",
                "jobrunner.dev/evictions": "2",
                "jobrunner.dev/not-admitted": '{"reason": "Inadmissible", "detail": "d"}',
            },
        },
        "spec": {"suspend": True, "template": {"spec": {"containers": []}}},
        "status": {"startTime": "2026-12-08T01:01:00Z", "active": 1},
    }
    assert asdict(JobState.from_object(compact(job))) == asdict(JobState.from_object(job))
    finished = {
        **job,
        "spec": {},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    assert asdict(JobState.from_object(compact(finished))) == asdict(JobState.from_object(finished))
