"""SIGKILL the dispatcher at each dangerous moment, start it again, and check that every
message still ends with exactly one Job and exactly one settlement."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from tests.integration.harness import (
    Dispatcher,
    drain_queue,
    finished,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]


def armed(point: str) -> dict[str, str]:
    return {"JOBRUNNER_DISPATCHER__FAILPOINTS": json.dumps([point])}


async def assert_exactly_once(
    kube_api: client.ApiClient,
    namespace: str,
    ids: list[str],
    rabbitmq_url: str,
    queue: str,
    dispatcher: Dispatcher,
) -> None:
    await dispatcher.settled("ack", len(ids))
    await wait_for_jobs(kube_api, namespace, "work", len(ids), state="Complete")
    jobs = jobs_of(kube_api, namespace, "work")
    by_message = sorted(j.metadata.annotations["jobrunner.dev/message-id"] for j in jobs)
    assert by_message == sorted(ids), "exactly one Job per message"
    assert all(finished(j) == "Complete" for j in jobs)
    # Nothing left to redeliver once the dispatcher lets go of the channel.
    assert dispatcher.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    assert await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=0.5) == []


@pytest.mark.parametrize("point", ["before-create", "after-create", "before-settle"])
async def test_sigkill_at_crash_point_then_restart_settles_each_message_once(
    point: str,
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest()
    first = dispatchers(path, armed(point))
    ids = [f"{point}-{i}" for i in range(3)]
    for message_id in ids:
        await publish(rabbitmq_url, queue, b'{"seconds": 1}', message_id=message_id)
    await asyncio.to_thread(first.process.wait, 30)  # type: ignore[union-attr]
    assert first.process.returncode == -9  # type: ignore[union-attr]
    assert f"failpoint {point} reached" in first.logs()

    second = dispatchers(path)
    await assert_exactly_once(kube_api, namespace, ids, rabbitmq_url, queue, second)


async def test_sigkill_while_jobs_run_then_restart_adopts_them(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest()
    first = dispatchers(path)
    ids = [f"long-{i}" for i in range(3)]
    for message_id in ids:
        await publish(rabbitmq_url, queue, b'{"seconds": 6}', message_id=message_id)
    jobs = await wait_for_jobs(kube_api, namespace, "work", 3)
    assert not any(finished(j) for j in jobs)
    first.kill()

    second = dispatchers(path)
    await assert_exactly_once(kube_api, namespace, ids, rabbitmq_url, queue, second)
    assert "adopted its existing Job" in second.logs()


async def test_sigkill_between_create_and_ack_with_ack_on_creation(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest(ackPolicy="onJobCreation")
    first = dispatchers(path, armed("after-create"))
    await publish(rabbitmq_url, queue, b'{"seconds": 2}', message_id="on-create")
    await asyncio.to_thread(first.process.wait, 30)  # type: ignore[union-attr]

    second = dispatchers(path)
    await assert_exactly_once(kube_api, namespace, ["on-create"], rabbitmq_url, queue, second)
