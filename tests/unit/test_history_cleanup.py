"""History limits (jobrunner/tracking/cleanup.py) on the in-memory twins: finished Jobs
beyond ``successfulJobsHistoryLimit`` / ``failedJobsHistoryLimit`` go oldest first, each
limit counted apart, and a pass with nothing beyond a limit plans nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from jobrunner.testing import MemoryJobClient
from jobrunner.tracking.cleanup import HistoryCleaner
from jobrunner.tracking.tracker import JobTracker

NS = "media"
WITHIN = 10.0


def job(name: str) -> dict[str, object]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": {}, "annotations": {}},
        "spec": {"template": {"spec": {"containers": [{"name": "w", "image": "busybox"}]}}},
    }


@pytest.fixture
async def tracked() -> AsyncIterator[tuple[MemoryJobClient, JobTracker]]:
    jobs = MemoryJobClient()
    tracker = JobTracker(client=jobs, namespace=NS, selector="")
    task = asyncio.create_task(tracker.run(), name="test-tracker")
    try:
        await asyncio.wait_for(tracker.synced.wait(), WITHIN)
        yield jobs, tracker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def finished(jobs: MemoryJobClient, tracker: JobTracker, outcomes: str) -> list[str]:
    """One Job per letter, ended in order: s succeeded, f failed."""
    names = []
    for i, letter in enumerate(outcomes):
        name = f"j-{i}"
        await jobs.create_job(job(name), None)
        await jobs.finish(NS, name, succeeded=letter == "s")
        names.append(name)
    for name in names:
        await asyncio.wait_for(tracker.wait_for(name), WITHIN)
    return names


def cleaner(
    jobs: MemoryJobClient, tracker: JobTracker, *, successful: int, failed: int, settled: set[str]
) -> HistoryCleaner:
    return HistoryCleaner(
        jobs=jobs,
        tracker=tracker,
        namespace=NS,
        successful_limit=successful,
        failed_limit=failed,
        busy=lambda _: False,
        settled=settled,
    )


async def test_history_beyond_each_limit_goes_oldest_first(
    tracked: tuple[MemoryJobClient, JobTracker],
) -> None:
    jobs, tracker = tracked
    names = await finished(jobs, tracker, "sfssf")
    plan = cleaner(jobs, tracker, successful=1, failed=1, settled=set(names))
    assert sorted(plan.surplus()) == ["j-0", "j-1", "j-2"]  # two successes, one failure


async def test_history_within_its_limits_plans_nothing(
    tracked: tuple[MemoryJobClient, JobTracker],
) -> None:
    jobs, tracker = tracked
    names = await finished(jobs, tracker, "sfssf")
    assert cleaner(jobs, tracker, successful=3, failed=2, settled=set(names)).plan() == ([], None)


async def test_history_keeps_a_job_not_known_settled_and_looks_again(
    tracked: tuple[MemoryJobClient, JobTracker],
) -> None:
    jobs, tracker = tracked
    await finished(jobs, tracker, "ss")
    doomed, recheck = cleaner(jobs, tracker, successful=1, failed=1, settled=set()).plan()
    assert doomed == []
    assert recheck is not None
    assert recheck > 0
