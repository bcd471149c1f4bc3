"""The finalizer that guards every unsettled Job, on the real API server: a Job deleted
before its message has a durable fate never takes the message with it, and never lets a
redelivery make a second Job — whoever deletes it and whether or not a dispatcher runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from jobrunner.core.models import FINALIZER
from tests.helpers import eventually
from tests.integration.harness import (
    Dispatcher,
    busybox_job,
    drain_queue,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]


def delete(kube_api: client.ApiClient, namespace: str, name: str) -> None:
    client.BatchV1Api(kube_api).delete_namespaced_job(
        name, namespace, propagation_policy="Background"
    )


async def gone(kube_api: client.ApiClient, namespace: str) -> None:
    async def none_left() -> bool:
        return not await asyncio.to_thread(jobs_of, kube_api, namespace, "work")

    await eventually(none_left, within=60, interval=0.3)


async def test_every_job_is_created_guarded_and_released_once_settled(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = dispatchers(manifest())
    await publish(rabbitmq_url, queue, b'{"seconds": 3}', message_id="guarded")
    [running] = await wait_for_jobs(kube_api, namespace, "work", 1)
    assert running.metadata.finalizers == [FINALIZER]
    await dispatcher.settled("ack", 1)

    async def released() -> bool:
        [job] = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return not job.metadata.finalizers

    await eventually(released, within=30, interval=0.3)
    [job] = jobs_of(kube_api, namespace, "work")
    assert job.metadata.annotations["jobrunner.dev/settled"] == "ack"


async def test_a_job_owning_its_acked_message_deleted_mid_run_dead_letters_the_copy(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    # onJobCreation acks at once: the Job holds the only copy. Deleting it used to lose
    # the message; now the deletion waits until the copy is dead-lettered.
    dispatcher = dispatchers(manifest(ackPolicy="onJobCreation", messageDelivery={"mode": "file"}))
    await publish(rabbitmq_url, queue, b'{"seconds": 60, "n": 1}', message_id="owned")
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1)
    await dispatcher.settled("ack", 1)  # the broker no longer has it: the Job does
    delete(kube_api, namespace, job.metadata.name)
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=30)
    assert dead.headers["x-jobrunner-reason"] == "JobDeleted"
    assert dead.headers["x-jobrunner-job"] == job.metadata.name
    assert dead.headers["x-jobrunner-message-id"] == "owned"
    assert dead.message_id == "owned"
    assert json.loads(dead.body) == {"seconds": 60, "n": 1}
    await gone(kube_api, namespace)


async def test_a_job_deleted_while_no_dispatcher_runs_is_settled_by_the_next_one(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest()
    first = dispatchers(path)
    await publish(rabbitmq_url, queue, b'{"seconds": 60}', message_id="orphan")
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1)
    first.kill()
    delete(kube_api, namespace, job.metadata.name)
    await asyncio.sleep(2)
    # Still there: nothing may finish the deletion before the message is settled.
    [kept] = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
    assert kept.metadata.deletion_timestamp is not None
    assert kept.metadata.uid == job.metadata.uid
    second = dispatchers(path)
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=60)
    assert dead.headers["x-jobrunner-reason"] == "JobDeleted"
    await gone(kube_api, namespace)
    # The redelivered message adopted the Job being deleted; no second Job was made.
    assert "created Job" not in second.logs()
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


async def test_a_finished_job_removed_by_ttl_before_settlement_is_adopted_not_repeated(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    # The dispatcher dies right before settling a finished Job whose TTL is 1 s: the
    # TTL controller deletes it at once. The redelivered message must find it (kept by
    # the finalizer) and be acked, not run again as a second Job.
    path = manifest(job_spec={**busybox_job(), "ttlSecondsAfterFinished": 1})
    first = dispatchers(path, {"JOBRUNNER_DISPATCHER__FAILPOINTS": '["before-settle"]'})
    await publish(rabbitmq_url, queue, b"{}", message_id="ttl")
    await asyncio.to_thread(first.process.wait, 60)  # type: ignore[union-attr]
    [job] = jobs_of(kube_api, namespace, "work")

    async def marked_for_deletion() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return bool(jobs) and jobs[0].metadata.deletion_timestamp is not None

    await eventually(marked_for_deletion, within=30, interval=0.3)
    second = dispatchers(path)
    await second.settled("ack", 1)
    await gone(kube_api, namespace)
    assert "created Job" not in second.logs()
    assert f"adopted its existing Job {job.metadata.name}" in second.logs()
    assert await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=1) == []
