"""jobrunner through MultiKueue (the stack's two clusters: the first the manager, the
second its worker): a ScaledJob whose LocalQueue dispatches by MultiKueue has each
message's Job run on the worker while jobrunner tracks it on the manager (``spec.managedBy``
as Kueue's webhook sets it), and the promise holds across clusters: one Job per message,
settled once, nothing lost when the worker's API server restarts mid-run. A Job whose pod
needs its message Secret (which MultiKueue does not copy) is dead-lettered at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import Dispatcher, drain_queue, finished, jobs_of, publish
from tests.integration.multikueue import MANAGED_BY, MultiKueue
from tests.integration.test_kueue import JobWatch, job_watch, queued_job, queued_manifest
from tests.integration.worker import WORKER_TIMEOUT, restart_worker_apiserver

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.worker]
__all__ = ["job_watch"]  # a fixture shared with test_kueue


async def record_mirrors(
    kube_api: client.ApiClient,
    namespace: str,
    multikueue: MultiKueue,
    seen: dict[str, client.V1Job],
) -> None:
    """Until cancelled: every mirror Job seen on the worker, by name (MultiKueue removes a
    mirror once its Job has finished, so it is looked for all along; a read that fails
    while the worker's API server is down is tried again)."""
    while True:
        try:
            jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
            for job in jobs:
                if job.metadata.name not in seen:
                    found = await asyncio.to_thread(multikueue.mirror, namespace, job.metadata.name)
                    if found is not None:
                        seen[job.metadata.name] = found
        except Exception:  # the worker restarting: look again
            pass
        await asyncio.sleep(0.3)


async def all_complete(
    kube_api: client.ApiClient, namespace: str, count: int
) -> list[client.V1Job]:
    async def done() -> list[client.V1Job] | None:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        complete = [j for j in jobs if finished(j) == "Complete"]
        return complete if len(complete) >= count else None

    return await eventually(done, within=2 * WORKER_TIMEOUT, interval=0.5)


async def test_messages_run_on_the_worker_and_settle_once_across_a_worker_outage(
    kube_api: client.ApiClient,
    worker_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    multikueue: MultiKueue,
    job_watch: Callable[..., JobWatch],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    lq = await asyncio.to_thread(multikueue.queues, namespace, cpu="2")
    watching = job_watch(namespace)
    dispatcher = dispatchers(
        queued_manifest(
            tmp_path, namespace, queue, rabbitmq_url, queued_job(lq), maxPendingAdmission=4
        )
    )
    mirrors: dict[str, client.V1Job] = {}
    recorder = asyncio.create_task(record_mirrors(kube_api, namespace, multikueue, mirrors))
    for i in range(3):
        await publish(rabbitmq_url, queue, json.dumps({"seconds": 12}).encode(), message_id=f"w{i}")

    async def mirrored() -> bool:
        return len(mirrors) >= 1

    await eventually(mirrored, within=WORKER_TIMEOUT, interval=0.5)
    await asyncio.to_thread(restart_worker_apiserver)  # mid-run: the worker's API goes away
    for i in range(3, 5):
        await publish(rabbitmq_url, queue, json.dumps({"seconds": 2}).encode(), message_id=f"w{i}")

    try:
        jobs = await all_complete(kube_api, namespace, 5)
    finally:
        recorder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recorder
    await dispatcher.settled("ack", 5, within=60)
    assert dispatcher.settlements("dead-letter") == 0
    assert len(jobs_of(kube_api, namespace, "work")) == 5, "one Job per message"
    assert watching.duplicates() == [], "no Job made twice on the manager"
    assert {j.spec.managed_by for j in jobs} == {MANAGED_BY}, "as Kueue's webhook set it"
    assert set(mirrors) == {j.metadata.name for j in jobs}, "every Job ran on the worker"
    pods = client.CoreV1Api(kube_api).list_namespaced_pod(namespace).items
    assert pods == [], "no pod on the manager: the worker ran them"
    for job in jobs:
        env = {
            e.name: e.value for e in mirrors[job.metadata.name].spec.template.spec.containers[0].env
        }
        sent = job.metadata.annotations["jobrunner.dev/message-id"]
        assert json.loads(env["JOBRUNNER_MESSAGE"])["seconds"] == (12 if sent < "w3" else 2)


async def test_a_job_whose_pod_needs_its_message_secret_is_dead_lettered_not_sent(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    multikueue: MultiKueue,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    lq = await asyncio.to_thread(multikueue.queues, namespace, cpu="2")
    dispatcher = dispatchers(
        queued_manifest(
            tmp_path,
            namespace,
            queue,
            rabbitmq_url,
            queued_job(lq, seconds="1"),
            messageDelivery={"mode": "file"},
        )
    )
    await publish(rabbitmq_url, queue, b'{"task": "by file"}', message_id="filed")

    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=WORKER_TIMEOUT)
    assert dead.message_id == "filed"
    assert dead.headers["x-jobrunner-reason"] == "MultiKueueSecret"
    assert "does not get its message Secret" in str(dead.headers["x-jobrunner-detail"])

    async def gone() -> bool:
        return not await asyncio.to_thread(jobs_of, kube_api, namespace, "work")

    await eventually(gone, within=60, interval=0.5)
    assert dispatcher.settlements("dead-letter") == 1
