"""Runs the real dispatcher (``python -m jobrunner.cli run``) as a child process against
the real stack, so tests can SIGTERM or SIGKILL it like an operator or a node failure."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aio_pika
import yaml
from kubernetes import client

from jobrunner.core.models import LABEL_SCALEDJOB
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]


def write_manifest(
    path: Path,
    *,
    name: str,
    namespace: str,
    queue: str,
    url: str,
    job_spec: Mapping[str, Any] | None = None,
    **spec: Any,
) -> Path:
    job_spec = job_spec or busybox_job()
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "jobTargetRef": job_spec,
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
            **spec,
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def busybox_job(
    *,
    fail: str = "{{ message.json.get('fail', 'no') }}",
    seconds: str = "{{ message.json.get('seconds', 0) }}",
) -> dict[str, Any]:
    return {
        "backoffLimit": 0,
        "template": {
            "metadata": {
                "annotations": {
                    "kwok.jobrunner.dev/outcome": fail,
                    "kwok.jobrunner.dev/run-duration": f"{seconds}s",
                }
            },
            "spec": {
                "containers": [
                    {
                        "name": "work",
                        "image": "busybox:1.36",
                        "args": ["{{ message.json.get('task', 'none') }}"],
                    }
                ]
            },
        },
    }


class Dispatcher:
    """A dispatcher child process; logs go to a file the test can show on failure."""

    def __init__(
        self, manifest: Path, kubeconfig: Path, log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.manifest, self.kubeconfig, self.log = manifest, kubeconfig, log
        self.env = {**os.environ, "JOBRUNNER_LOG_LEVEL": "DEBUG", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Dispatcher:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobrunner.cli",
                "--kubeconfig",
                str(self.kubeconfig),
                "run",
                "-f",
                str(self.manifest),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 40) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def settlements(self, action: str) -> int:
        """Settlements of ``action`` (ack or dead-letter) this dispatcher has logged."""
        return self.logs().count(SETTLED_LINES[action])

    async def settled(self, action: str, count: int, *, within: float = 60) -> None:
        """Wait until this dispatcher has logged ``count`` settlements of ``action``
        (``ack`` or ``dead-letter``), as the dispatcher words them."""

        async def enough() -> bool:
            return self.settlements(action) >= count

        await eventually(enough, within=within, interval=0.2)


SETTLED_LINES = {"ack": "acked the message (Job ", "dead-letter": "dead-lettered the message ("}
"""What a dispatcher logs when it settles a message, by action."""


def jobs_of(kube_api: client.ApiClient, namespace: str, scaledjob: str) -> list[Any]:
    return (
        client.BatchV1Api(kube_api)
        .list_namespaced_job(namespace, label_selector=f"{LABEL_SCALEDJOB}={scaledjob}")
        .items
    )


def finished(job: Any) -> str | None:
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type
    return None


async def publish(
    url: str,
    queue: str,
    body: bytes,
    *,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )


async def queue_depth(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) as the broker reports on a passive declare."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        result = q.declaration_result
        return result.message_count or 0, result.consumer_count or 0


async def drain_queue(
    url: str, queue: str, *, wait: float = 2.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything in ``queue`` now (acked), waiting up to ``wait`` for the first."""
    out = []
    deadline = asyncio.get_running_loop().time() + wait
    connection = await aio_pika.connect(url)
    async with connection:
        while True:  # the dispatcher declares the dead-letter queue when it starts
            channel = await connection.channel()
            try:
                q = await channel.declare_queue(queue, passive=True)
                break
            except aio_pika.exceptions.ChannelNotFoundEntity:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.3)
        while True:
            message = await q.get(fail=False)
            if message is None:
                if out or asyncio.get_running_loop().time() >= deadline:
                    return out
                await asyncio.sleep(0.2)
                continue
            await message.ack()
            out.append(message)


async def wait_for_jobs(
    kube_api: client.ApiClient,
    namespace: str,
    scaledjob: str,
    count: int,
    *,
    state: str | None = None,
    within: float = 60,
) -> list[Any]:
    async def check() -> list[Any] | None:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, scaledjob)
        if state is not None:
            jobs = [j for j in jobs if finished(j) == state]
        return jobs if len(jobs) >= count else None

    return await eventually(check, within=within, interval=0.3)
