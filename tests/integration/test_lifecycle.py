"""Cleanup, graceful shutdown, the queue's own dead-letter exchange, and a KEDA manifest
brought unchanged: each on the real stack."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aio_pika
import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import (
    Dispatcher,
    busybox_job,
    drain_queue,
    finished,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]


async def test_history_limits_delete_oldest_finished_jobs_and_their_secrets(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(
        manifest(
            successfulJobsHistoryLimit=2, failedJobsHistoryLimit=1, messageDelivery={"mode": "file"}
        )
    )

    async def finished_job(message_id: str) -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return any(
            j.metadata.annotations["jobrunner.dev/message-id"] == message_id and finished(j)
            for j in jobs
        )

    # One at a time, each published once the previous has finished and a second has
    # passed (completion times have one-second resolution), so "oldest" is well defined
    # however slowly the machine runs.
    for message_id, body in [(f"ok-{i}", b'{"task": "ok"}') for i in range(5)] + [
        (f"bad-{i}", b'{"fail": "failed"}') for i in range(3)
    ]:
        await publish(rabbitmq_url, queue, body, message_id=message_id)
        await eventually(lambda m=message_id: finished_job(m), within=60, interval=0.3)
        await asyncio.sleep(1.1)

    async def trimmed() -> list[str] | None:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        ids = sorted(j.metadata.annotations["jobrunner.dev/message-id"] for j in jobs)
        return ids if ids == ["bad-2", "ok-3", "ok-4"] else None

    await eventually(trimmed, within=60, interval=0.5)
    # Secrets of deleted Jobs go with them (owner references, background propagation).
    core = client.CoreV1Api(kube_api)

    async def secrets_trimmed() -> bool:
        secrets = await asyncio.to_thread(
            core.list_namespaced_secret, namespace, label_selector="jobrunner.dev/scaledjob=work"
        )
        return len(secrets.items) == 3

    await eventually(secrets_trimmed, within=60, interval=0.5)
    assert len(await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=5)) == 3


async def test_ttl_seconds_after_finished_is_honoured(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    job_spec = {**busybox_job(), "ttlSecondsAfterFinished": 2}
    dispatcher = dispatchers(manifest(job_spec=job_spec))
    await publish(rabbitmq_url, queue, b'{"task": "x"}', message_id="ttl")
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1)
    assert job.spec.ttl_seconds_after_finished == 2

    async def gone() -> bool:
        return not await asyncio.to_thread(jobs_of, kube_api, namespace, "work")

    await eventually(gone, within=60, interval=0.5)
    assert dispatcher.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


async def test_sigterm_stops_consuming_leaves_jobs_running_and_next_dispatcher_adopts(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest()
    first = dispatchers(path)
    await publish(rabbitmq_url, queue, b'{"seconds": 12}', message_id="survivor")
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1)

    started = time.monotonic()
    assert first.terminate(timeout=40) == 0
    assert time.monotonic() - started < 30
    # The Job runs on; its unsettled message is back in the queue for the next dispatcher.
    [still] = jobs_of(kube_api, namespace, "work")
    assert still.metadata.uid == job.metadata.uid
    assert finished(still) is None
    assert (await queue_depth(rabbitmq_url, queue))[0] == 1

    second = dispatchers(path)
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=40)
    await second.settled("ack", 1)
    assert "adopted its existing Job" in second.logs()
    assert len(jobs_of(kube_api, namespace, "work")) == 1


@pytest.fixture
async def queue_with_dlx(rabbitmq_url: str) -> AsyncIterator[tuple[str, str]]:
    """A queue whose own arguments name a dead-letter exchange, and the queue bound to it."""
    name = f"q-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        dlx = await channel.declare_exchange(
            f"{name}.dlx", aio_pika.ExchangeType.FANOUT, durable=True
        )
        parked = await channel.declare_queue(f"{name}.parked", durable=True)
        await parked.bind(dlx)
        await channel.declare_queue(
            name, durable=True, arguments={"x-dead-letter-exchange": dlx.name}
        )
        yield name, parked.name
        for q in (name, parked.name):
            await channel.queue_delete(q)
        await channel.exchange_delete(dlx.name)


async def test_failure_goes_through_the_queues_own_dead_letter_exchange(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    tmp_path: Path,
    queue_with_dlx: tuple[str, str],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    from tests.integration.harness import write_manifest

    queue, parked = queue_with_dlx
    path = write_manifest(
        tmp_path / "m.yaml", name="work", namespace=namespace, queue=queue, url=rabbitmq_url
    )
    dispatcher = dispatchers(path)
    await publish(rabbitmq_url, queue, b'{"fail": "failed"}', message_id="to-dlx")
    [dead] = await drain_queue(rabbitmq_url, parked, wait=30)
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert f"exchange '{queue}.dlx'" in dispatcher.logs()


KEDA_MANIFEST = """
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata:
  name: rabbitmq-consumer
  namespace: {namespace}
spec:
  jobTargetRef:
    template:
      spec:
        containers:
        - name: rabbitmq-client
          image: ghcr.io/kedacore/rabbitmq-client:v1.0
          imagePullPolicy: Always
          command: ["receive", "amqp://user:PASSWORD@rabbitmq.default.svc.cluster.local:5672"]
        restartPolicy: Never
    backoffLimit: 4
  pollingInterval: 10
  maxReplicaCount: 30
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 2
  scalingStrategy:
    strategy: "custom"
    customScalingQueueLengthDeduction: 1
    customScalingRunningJobPercentage: "0.5"
  triggers:
  - type: rabbitmq
    metadata:
      queueName: {queue}
      queueLength: "5"
    authenticationRef:
      name: rabbitmq-consumer-trigger
---
apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata:
  name: rabbitmq-consumer-trigger
  namespace: {namespace}
spec:
  secretTargetRef:
  - parameter: host
    name: rabbitmq-consumer-secret
    key: RabbitMqHost
"""


async def test_keda_scaledjob_runs_unchanged_with_host_from_a_cluster_secret(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="rabbitmq-consumer-secret"),
            data={"RabbitMqHost": base64.b64encode(rabbitmq_url.encode()).decode()},
        ),
    )
    path = tmp_path / "keda.yaml"
    path.write_text(KEDA_MANIFEST.format(namespace=namespace, queue=queue))
    dispatchers(path)
    await publish(rabbitmq_url, queue, b"hello", message_id="keda-1")

    [job] = await wait_for_jobs(kube_api, namespace, "rabbitmq-consumer", 1, state="Complete")
    container = job.spec.template.spec.containers[0]
    env = {e.name: e.value for e in container.env}
    # The KEDA job gets the message handed to it as well.
    assert env["JOBRUNNER_MESSAGE"] == "hello"
    assert job.metadata.labels["scaledjob.keda.sh/name"] == "rabbitmq-consumer"
    assert job.spec.backoff_limit == 4


async def test_the_last_finished_job_beyond_the_limit_goes_while_the_queue_is_idle(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    # With nothing else finishing after it, the settled Job must still be deleted.
    dispatcher = dispatchers(manifest(successfulJobsHistoryLimit=0))
    await publish(rabbitmq_url, queue, b"{}", message_id="only")
    await dispatcher.settled("ack", 1)

    async def gone() -> bool:
        return not await asyncio.to_thread(jobs_of, kube_api, namespace, "work")

    await eventually(gone, within=60, interval=0.5)
    assert "deleted Job work-" in dispatcher.logs()
