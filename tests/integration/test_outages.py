"""Broker and API-server outages in the middle of a run: the dispatcher retries with
backoff, leaves running Jobs alone, resumes, and loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client

from tests import services
from tests.helpers import eventually
from tests.integration.harness import ROOT, Dispatcher, finished, jobs_of, publish, queue_depth

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]


def stack_state() -> Path:
    state = services.setting("JOBRUNNER_TEST_STACK_STATE")
    if not state:
        services.missing("the local stack's control scripts", "JOBRUNNER_TEST_STACK_STATE is unset")
    return Path(str(state))


async def run(*command: str) -> None:
    await asyncio.to_thread(subprocess.run, command, check=True, capture_output=True, timeout=300)


async def publish_retrying(url: str, queue: str, body: bytes, message_id: str) -> None:
    async def attempt() -> bool:
        try:
            await publish(url, queue, body, message_id=message_id)
        except (ConnectionError, OSError):
            return False
        return True

    await eventually(attempt, within=60, interval=0.5)


async def test_rabbitmq_restart_mid_run_loses_nothing_and_runs_nothing_twice(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    ctl = services.setting("JOBRUNNER_TEST_RABBITMQCTL")
    if not ctl:
        services.missing("rabbitmqctl of the local stack", "JOBRUNNER_TEST_RABBITMQCTL is unset")
    dispatcher = dispatchers(manifest())
    await publish(rabbitmq_url, queue, b'{"seconds": 8}', message_id="before-outage")
    await eventually(lambda: asyncio.to_thread(jobs_of, kube_api, namespace, "work"), within=30)
    [running] = jobs_of(kube_api, namespace, "work")

    await run(str(ctl), "stop_app")
    await run(str(ctl), "start_app")
    await publish_retrying(rabbitmq_url, queue, b'{"task": "after"}', "after-outage")

    await dispatcher.settled("ack", 2, within=90)
    jobs = jobs_of(kube_api, namespace, "work")
    assert sorted(j.metadata.annotations["jobrunner.dev/message-id"] for j in jobs) == [
        "after-outage",
        "before-outage",
    ]
    # The Job that ran through the outage is the same one, never recreated.
    assert running.metadata.uid in {j.metadata.uid for j in jobs}
    assert all(finished(j) == "Complete" for j in jobs)
    assert dispatcher.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


async def test_kube_apiserver_restart_mid_run_retries_and_resumes(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    state = stack_state()
    pid_file = state / "pids" / "kube-apiserver.pid"
    dispatcher = dispatchers(manifest())
    await publish(rabbitmq_url, queue, b'{"seconds": 10}', message_id="running-through")
    await eventually(lambda: asyncio.to_thread(jobs_of, kube_api, namespace, "work"), within=30)
    [running] = jobs_of(kube_api, namespace, "work")

    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    try:
        await asyncio.sleep(2)
        # Arrives while the API server is down: creation must wait, not fail.
        await publish(rabbitmq_url, queue, b'{"task": "during"}', message_id="during-outage")
        await asyncio.sleep(3)
    finally:
        await run("bash", str(ROOT / "deploy/local/stack-up.sh"), "k8s")

    await dispatcher.settled("ack", 2, within=120)
    jobs = jobs_of(kube_api, namespace, "work")
    assert running.metadata.uid in {j.metadata.uid for j in jobs}
    assert "Kubernetes API unavailable" in dispatcher.logs()
    assert dispatcher.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


async def test_a_missing_queue_waits_alone_says_why_and_starts_once_declared(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    import uuid

    import aio_pika
    import yaml

    from tests.integration.harness import busybox_job
    from tests.integration.test_observability import free_port, get

    missing = f"q-missing-{uuid.uuid4().hex[:8]}"
    docs = [
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "jobTargetRef": busybox_job(),
                "triggers": [
                    {"type": "rabbitmq", "metadata": {"queueName": q, "host": rabbitmq_url}}
                ],
            },
        }
        for name, q in (("absent", missing), ("present", queue))
    ]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    port = free_port()
    dispatcher = dispatchers(path, {"JOBRUNNER_TELEMETRY__HTTP_PORT": str(port)})
    base = f"http://127.0.0.1:{port}"
    # The other ScaledJob of the same dispatcher works all the same.
    await publish(rabbitmq_url, queue, b"{}", message_id="present-1")
    await dispatcher.settled("ack", 1)

    async def not_ready_naming_the_queue() -> str | None:
        try:
            status, text = await asyncio.to_thread(get, f"{base}/readyz")
        except OSError:  # not listening yet
            return None
        return text if status == 503 and missing in text else None

    why = await eventually(not_ready_naming_the_queue, within=30)
    assert "vhost '/'" in why
    assert "declare it" in why
    logs = dispatcher.logs()
    assert f"queue '{missing}' does not exist in vhost '/'" in logs
    assert "Traceback" not in logs
    assert "ChannelNotFoundEntity" not in logs
    assert dispatcher.process is not None
    assert dispatcher.process.poll() is None
    # Declared later, it is consumed without a restart.
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(missing, durable=True)
    try:
        await publish(rabbitmq_url, missing, b"{}", message_id="absent-1")
        await dispatcher.settled("ack", 2, within=90)

        async def ready() -> bool:
            return (await asyncio.to_thread(get, f"{base}/readyz"))[0] == 200

        await eventually(ready, within=60)
    finally:
        async with await aio_pika.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(missing)
            await channel.queue_delete(f"{missing}.dead-letter")
