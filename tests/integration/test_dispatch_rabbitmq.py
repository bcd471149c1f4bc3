"""The RabbitMQ path end to end on the real stack: each message becomes exactly one Job,
is tracked to its end and settled in the right way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from tests.helpers import eventually
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


async def test_message_becomes_one_job_with_the_message_and_is_acked_on_success(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = dispatchers(manifest())
    await publish(
        rabbitmq_url,
        queue,
        json.dumps({"task": "resize"}).encode(),
        message_id="msg-1",
        headers={"tenant": "acme"},
    )

    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    labels, annotations = job.metadata.labels, job.metadata.annotations
    assert labels["app.kubernetes.io/managed-by"] == "jobrunner"
    assert labels["jobrunner.dev/scaledjob"] == "work"
    assert labels["jobrunner.dev/source"] == "rabbitmq"
    assert annotations["jobrunner.dev/message-id"] == "msg-1"
    container = job.spec.template.spec.containers[0]
    env = {e.name: e.value for e in container.env}
    assert env["JOBRUNNER_MESSAGE"] == '{"task": "resize"}'
    assert json.loads(env["JOBRUNNER_MESSAGE_HEADERS"]) == {"tenant": "acme"}
    assert container.args == ["resize"]
    # Acked: once the dispatcher lets go, nothing comes back to the queue.
    await dispatcher.settled("ack", 1)
    assert dispatcher.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


async def test_failed_job_dead_letters_with_reason(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(manifest())
    await publish(rabbitmq_url, queue, b'{"task": "t", "fail": "failed"}', message_id="doomed")

    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Failed")
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=20)
    assert dead.body == b'{"task": "t", "fail": "failed"}'
    assert dead.message_id == "doomed"
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert dead.headers["x-jobrunner-job"] == job.metadata.name
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


async def test_redelivered_message_adopts_its_job_instead_of_creating_another(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(manifest())
    await publish(rabbitmq_url, queue, b'{"seconds": 3}', message_id="same")
    await wait_for_jobs(kube_api, namespace, "work", 1)
    await publish(rabbitmq_url, queue, b'{"seconds": 3}', message_id="same")

    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    await eventually(lambda: _queue_empty(rabbitmq_url, queue), within=20)
    assert len(jobs_of(kube_api, namespace, "work")) == 1


async def _queue_empty(url: str, queue: str) -> bool:
    return (await queue_depth(url, queue))[0] == 0


async def test_message_without_id_is_named_by_content(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(manifest())
    await publish(rabbitmq_url, queue, b'{"task": "a"}')
    await publish(rabbitmq_url, queue, b'{"task": "b"}')
    jobs = await wait_for_jobs(kube_api, namespace, "work", 2, state="Complete")
    assert len({j.metadata.name for j in jobs}) == 2


async def test_body_that_is_not_json_is_dead_lettered_with_reason(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = dispatchers(manifest())
    await publish(rabbitmq_url, queue, b"<xml>not json</xml>", message_id="bad")
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=20)
    assert dead.headers["x-jobrunner-reason"] == "InvalidMessage"
    assert "not JSON" in dead.headers["x-jobrunner-detail"]
    assert jobs_of(kube_api, namespace, "work") == []
    # And the dispatcher is still there for the next message.
    await publish(rabbitmq_url, queue, b'{"task": "ok"}', message_id="good")
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    assert dispatcher.process is not None
    assert dispatcher.process.poll() is None


async def test_api_rejection_is_dead_lettered_with_the_servers_message(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    job_spec = {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "containers": [
                    {
                        # Valid for the template, invalid for the API server: a 422.
                        "name": "{{ message.json.name }}",
                        "image": "busybox",
                    }
                ]
            }
        },
    }
    dispatchers(manifest(job_spec=job_spec))
    await publish(rabbitmq_url, queue, b'{"name": "Not_A_DNS_Label"}', message_id="422")
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=20)
    assert dead.headers["x-jobrunner-reason"] == "ApiRejected"
    assert dead.headers["x-jobrunner-detail"].startswith("422")
    assert "Not_A_DNS_Label" in dead.headers["x-jobrunner-detail"]


async def test_large_body_reaches_job_through_an_owned_secret_and_oversized_is_dead_lettered(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(manifest(messageDelivery={"maxEnvBytes": 1024, "maxMessageBytes": 200_000}))
    large = json.dumps({"task": "big", "pad": "x" * 50_000}).encode()
    await publish(rabbitmq_url, queue, large, message_id="large")
    await publish(rabbitmq_url, queue, b'{"pad": "' + b"y" * 300_000 + b'"}', message_id="huge")

    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    core = client.CoreV1Api(kube_api)
    secret = core.read_namespaced_secret(f"{job.metadata.name}-message", namespace)
    import base64

    assert base64.b64decode(secret.data["body"]) == large
    [owner] = secret.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == ("Job", job.metadata.name, job.metadata.uid)
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=20)
    assert dead.headers["x-jobrunner-reason"] == "MessageTooLarge"
    assert dead.message_id == "huge"


async def test_active_jobs_never_exceed_max_replica_count(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(manifest(maxReplicaCount=2))
    for i in range(6):
        await publish(rabbitmq_url, queue, b'{"seconds": 2}', message_id=f"m{i}")
    peak = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        active = [j for j in jobs if finished(j) is None]
        peak = max(peak, len(active))
        if len(jobs) == 6 and not active:
            break
        await asyncio.sleep(0.2)
    assert len(jobs) == 6
    assert all(finished(j) == "Complete" for j in jobs)
    assert peak == 2
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


async def test_job_deleted_by_someone_else_dead_letters_instead_of_hanging(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(manifest())
    await publish(rabbitmq_url, queue, b'{"seconds": 60}', message_id="victim")
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1)
    client.BatchV1Api(kube_api).delete_namespaced_job(
        job.metadata.name, namespace, propagation_policy="Background"
    )
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=20)
    assert dead.headers["x-jobrunner-reason"] == "JobDeleted"
