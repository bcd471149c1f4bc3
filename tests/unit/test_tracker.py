"""The tracker's list/watch loop against a scripted JobClient: pure logic, no server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from jobrunner.core.models import Outcome
from jobrunner.core.protocols import JobPage, TransientError, WatchEvent, WatchExpired
from jobrunner.tracking.tracker import JobTracker


def job(name: str, condition: str | None = None, reason: str = "") -> dict[str, Any]:
    conditions = [{"type": condition, "status": "True", "reason": reason}] if condition else []
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "5"},
        "status": {"conditions": conditions},
    }


class ScriptedClient:
    """Each list returns the next listing; each watch plays the next script, where an
    exception in a script is raised at that point."""

    def __init__(self, listings: list[list[dict[str, Any]]], watches: list[list[Any]]) -> None:
        self.listings, self.watches = listings, watches
        self.list_calls = 0

    async def list_jobs(
        self, namespace: str, selector: str, *, limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        # Serves each listing in pages of one Job, to exercise pagination.
        if continue_token is None:
            self.list_calls += 1
            self.current: list[Mapping[str, Any]] = list(
                self.listings.pop(0) if self.listings else []
            )
        page, self.current = self.current[:1], self.current[1:]
        return JobPage(
            items=page, resource_version="10", continue_token="more" if self.current else None
        )

    async def watch_jobs(
        self, namespace: str, selector: str, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        script = self.watches.pop(0) if self.watches else []
        for item in script:
            if isinstance(item, BaseException):
                raise item
            yield item
        if not self.watches:
            await asyncio.Event().wait()


async def run_until(tracker: JobTracker, check: Any) -> None:
    task = asyncio.create_task(tracker.run())
    try:
        for _ in range(200):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")
    finally:
        task.cancel()


async def test_listing_in_pages_tracks_every_job() -> None:
    client = ScriptedClient([[job("a"), job("b", "Complete"), job("c")]], [[]])
    tracker = JobTracker(client=client, namespace="ns", selector="x")  # type: ignore[arg-type]
    await run_until(tracker, tracker.synced.is_set)
    assert sorted(tracker.jobs) == ["a", "b", "c"]
    assert sorted(tracker.unfinished()) == ["a", "c"]


async def test_finished_job_resolves_waiter_with_condition_reason() -> None:
    client = ScriptedClient(
        [[job("a")]], [[WatchEvent("MODIFIED", job("a", "Failed", "DeadlineExceeded"))]]
    )
    tracker = JobTracker(client=client, namespace="ns", selector="x")  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(tracker.wait_for("a"))
    await run_until(tracker, waiter.done)
    assert waiter.result().outcome is Outcome.FAILED
    assert waiter.result().reason == "DeadlineExceeded"


async def test_410_gone_lists_again_and_sees_what_happened_meanwhile() -> None:
    client = ScriptedClient(
        listings=[[job("a")], [job("a", "Complete", "CompletionsReached")]],
        watches=[[WatchExpired("too old resource version")], []],
    )
    tracker = JobTracker(client=client, namespace="ns", selector="x")  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(tracker.wait_for("a"))
    await run_until(tracker, waiter.done)
    assert waiter.result().succeeded
    assert client.list_calls == 2


async def test_broken_watch_reconnects_with_backoff_and_relists() -> None:
    client = ScriptedClient(
        listings=[[job("a")], [job("a", "Complete")]],
        watches=[[TransientError("connection reset")], []],
    )
    tracker = JobTracker(client=client, namespace="ns", selector="x", backoff_ceiling=0.05)  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(tracker.wait_for("a"))
    await run_until(tracker, waiter.done)
    assert waiter.result().succeeded


async def test_job_deleted_unfinished_resolves_as_failure_never_hangs() -> None:
    client = ScriptedClient([[job("a")]], [[WatchEvent("DELETED", job("a"))]])
    tracker = JobTracker(client=client, namespace="ns", selector="x")  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(tracker.wait_for("a"))
    await run_until(tracker, waiter.done)
    assert waiter.result().reason == "JobDeleted"


async def test_job_gone_between_lists_counts_as_deleted() -> None:
    client = ScriptedClient([[job("a")], []], [[WatchExpired("gone")], []])
    tracker = JobTracker(client=client, namespace="ns", selector="x")  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(tracker.wait_for("a"))
    await run_until(tracker, waiter.done)
    assert waiter.result().reason == "JobDeleted"


async def test_limiter_waits_for_a_free_slot() -> None:
    from jobrunner.dispatch.limiter import ActiveJobs

    limiter = ActiveJobs(1)
    await limiter.acquire("a")
    second = asyncio.ensure_future(limiter.acquire("b"))
    await asyncio.sleep(0.01)
    assert not second.done()
    await limiter.acquire("a")  # an active Job adopted again needs no new slot
    limiter.release("a")
    await asyncio.wait_for(second, 1)
    assert "b" in limiter
