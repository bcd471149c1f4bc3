"""maxReplicaCount changes live: the limiter's resize."""

from __future__ import annotations

import asyncio

import pytest

from jobrunner.dispatch.limiter import ActiveJobs


async def test_larger_limit_wakes_as_many_waiters_as_it_frees_slots() -> None:
    limiter = ActiveJobs(1)
    await limiter.acquire("a")
    waiters = [asyncio.create_task(limiter.acquire(n)) for n in ("b", "c", "d")]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    limiter.resize(3)
    await asyncio.sleep(0.01)
    assert [w.done() for w in waiters] == [True, True, False]
    assert len(limiter) == 3
    limiter.release("a")
    await asyncio.wait_for(waiters[2], 1)


async def test_smaller_limit_lets_active_jobs_run_and_admits_none_until_below_it() -> None:
    limiter = ActiveJobs(3)
    for name in "abc":
        await limiter.acquire(name)
    limiter.resize(1)
    waiter = asyncio.create_task(limiter.acquire("d"))
    limiter.release("a")
    limiter.release("b")
    await asyncio.sleep(0.01)
    assert not waiter.done(), "two active of a limit of one: no new slot yet"
    limiter.release("c")
    await asyncio.wait_for(waiter, 1)


def test_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ActiveJobs(2).resize(0)
