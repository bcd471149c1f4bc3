"""Which delivery of a message made its Job (``JOBRUNNER_DELIVERY_COUNT``, the base of a
function's ``DequeueCount``), counted by each real broker: a dispatcher killed before it
creates the Job, so the broker hands the message out again, makes the Job with 2; a
message delivered once makes it with 1. SQS (ElasticMQ), Redis Streams, NATS JetStream
and MQTT (Mosquitto) on the cluster stack; RabbitMQ; Azure Storage (Azurite) with the
local executor. (The embedded queue: tests/local/test_functions_tries.py.)"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from kubernetes import client

from jobrunner.local.jobdir import JobDir
from tests.helpers import eventually, wait_until
from tests.integration.brokers import KITS, Kit, make_kit
from tests.integration.harness import Dispatcher, busybox_job, jobs_of, publish, wait_for_jobs
from tests.integration.test_azure_queue import b64json, send
from tests.integration.test_azure_queue import manifest as azure_manifest
from tests.integration.test_azure_queue import start as azure_start
from tests.integration.test_quorum_queues import declare, quorum_manifest
from tests.local.conftest import Dispatchers

KILL_BEFORE_CREATE = {"JOBRUNNER_DISPATCHER__FAILPOINTS": json.dumps(["before-create"])}


def by_message(jobs: list[Any]) -> dict[str, int]:
    """Each Job's JOBRUNNER_DELIVERY_COUNT by the task its message names."""
    counts = {}
    for job in jobs:
        env = {e.name: e.value for e in job.spec.template.spec.containers[0].env}
        task = json.loads(env["JOBRUNNER_MESSAGE"])["task"]
        counts[task] = int(env["JOBRUNNER_DELIVERY_COUNT"])
    return counts


def redelivered_and_once(counts: dict[str, int]) -> bool:
    """The message handed out again counts 2 or more (the broker's count: SQS may count
    a receive of the dying dispatcher's that never reached it), the other 1."""
    return counts.keys() == {"again", "once"} and counts["again"] >= 2 and counts["once"] == 1


@pytest.fixture(params=[pytest.param(k, marks=getattr(pytest.mark, k)) for k in KITS])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    made = make_kit(request.param, request)
    await made.prepare()
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.mark.kube
async def test_each_broker_counts_the_delivery_that_made_the_job(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work", "namespace": namespace},
        "spec": {"jobTargetRef": busybox_job(), "triggers": [kit.trigger()], **kit.spec()},
    }
    path = tmp_path / "work.yaml"
    path.write_text(yaml.safe_dump(doc))
    first = dispatchers(path, {**kit.dispatcher_env(0), **KILL_BEFORE_CREATE})
    await kit.publish(b'{"task": "again"}', message_id="again")
    await asyncio.to_thread(first.process.wait, 60)  # type: ignore[union-attr]
    assert first.process.returncode == -9  # type: ignore[union-attr]
    assert jobs_of(kube_api, namespace, "work") == []

    second = dispatchers(path, kit.dispatcher_env(0))
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    await kit.publish(b'{"task": "once"}', message_id="once")
    jobs = await wait_for_jobs(kube_api, namespace, "work", 2, state="Complete")
    assert redelivered_and_once(by_message(jobs)), (by_message(jobs), second.logs()[-5000:])


@pytest.mark.kube
@pytest.mark.rabbitmq
async def test_rabbitmq_counts_a_redelivery(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest()
    first = dispatchers(path, KILL_BEFORE_CREATE)
    await publish(rabbitmq_url, queue, b'{"task": "again"}', message_id="again")
    await asyncio.to_thread(first.process.wait, 60)  # type: ignore[union-attr]
    assert first.process.returncode == -9  # type: ignore[union-attr]

    dispatchers(path)
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    await publish(rabbitmq_url, queue, b'{"task": "once"}', message_id="once")
    jobs = await wait_for_jobs(kube_api, namespace, "work", 2, state="Complete")
    assert by_message(jobs) == {"again": 2, "once": 1}


@pytest.fixture
async def quorum(rabbitmq_url: str) -> AsyncIterator[str]:
    """A quorum queue's name (declared by the test), deleted afterwards with its dead
    letters."""
    name = f"qq-{uuid.uuid4().hex[:10]}"
    yield name
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        for queue in (name, f"{name}.dead-letter"):
            await channel.queue_delete(queue)


@pytest.mark.kube
@pytest.mark.rabbitmq
async def test_a_rabbitmq_quorum_queue_counts_every_return(
    kube_api: client.ApiClient,
    namespace: str,
    quorum: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    """Returned twice (nack with requeue) before jobrunner takes it: the quorum queue's
    x-delivery-count is 2, so this is the third delivery."""
    await declare(rabbitmq_url, quorum)
    await publish(rabbitmq_url, quorum, b'{"task": "returned"}', message_id="returned")
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(quorum)
        for _ in range(2):
            message = await eventually(lambda: queue.get(fail=False), within=10, interval=0.2)
            assert message is not None
            await message.nack(requeue=True)
    dispatchers(quorum_manifest(tmp_path, namespace, quorum, rabbitmq_url))
    await publish(rabbitmq_url, quorum, b'{"task": "once"}', message_id="once")
    jobs = await wait_for_jobs(kube_api, namespace, "work", 2, state="Complete")
    assert by_message(jobs) == {"returned": 3, "once": 1}


@pytest.mark.azurite
def test_azure_storage_counts_a_dequeue(
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    queue = function_queues["orders"]
    path = azure_manifest(tmp_path, queue)
    short = {"JOBRUNNER_AZURE_QUEUE__VISIBILITY_TIMEOUT_SECONDS": "3"}
    asyncio.run(send(azure_storage, queue, b64json({"id": "again"})))
    first = azure_start(local_dispatchers, path, azure_storage, **short, **KILL_BEFORE_CREATE)
    assert first.wait(timeout=60) == -signal.SIGKILL

    azure_start(local_dispatchers, path, azure_storage, **short)
    jobs = local_dispatchers.state / "jobs" / "default"
    wait_until(lambda: len(list(jobs.glob("*"))) == 1, timeout=60)
    asyncio.run(send(azure_storage, queue, b64json({"id": "once"})))
    wait_until(lambda: len(list(jobs.glob("*"))) == 2, timeout=60)
    counts = {}
    for job_dir in jobs.glob("*"):
        job = JobDir(job_dir).job() or {}
        [container] = job["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        counts[json.loads(env["JOBRUNNER_MESSAGE"])["id"]] = int(env["JOBRUNNER_DELIVERY_COUNT"])
    assert counts == {"again": 2, "once": 1}, local_dispatchers.logs()
