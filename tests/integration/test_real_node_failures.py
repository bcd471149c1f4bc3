"""How Jobs end on a real kubelet, and what jobrunner makes of it.

Real exit codes, a deadline that a container outlives by ignoring SIGTERM (the kubelet's
grace, then SIGKILL), ``backoffLimit`` and ``podFailurePolicy`` decided by those exit
codes, Indexed completions, a container killed by its memory limit (``OOMKilled``), and
the logs as ``jobrunner logs`` and the dead letter's detail read them through the API
server from the kubelet. Each case runs real containers on ``jobrunner-node-0``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from kubernetes import client

from jobrunner.core import deadletters
from tests.helpers import eventually
from tests.integration.harness import ROOT, Dispatcher, drain_queue, finished, jobs_of, publish
from tests.integration.realnode import (
    MAX_REPLICAS,
    RealNode,
    on_real_node,
    pod_log,
    pods_of_job,
    recording_pods,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.real_node]


def _manifest(
    tmp_path: Path, namespace: str, queue: str, url: str, job: dict[str, Any], **spec: Any
) -> Path:
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work", "namespace": namespace},
        "spec": {
            "maxReplicaCount": MAX_REPLICAS,
            "jobTargetRef": job,
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
            **spec,
        },
    }
    path = tmp_path / "work.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _job_of(kube_api: client.ApiClient, namespace: str, message_id: str) -> Any | None:
    for job in jobs_of(kube_api, namespace, "work"):
        if job.metadata.annotations.get("jobrunner.dev/message-id") == message_id:
            return job
    return None


async def _dead_letters(url: str, queue: str, count: int) -> dict[str, dict[str, str]]:
    """Message id -> its dead letter's x-jobrunner headers, once ``count`` arrived."""
    got: dict[str, dict[str, str]] = {}

    async def enough() -> bool:
        try:
            arrived = await drain_queue(url, f"{queue}.dead-letter", wait=1)
        except aio_pika.exceptions.ChannelNotFoundEntity:  # the dispatcher is starting
            return False
        for message in arrived:
            got[str(message.message_id)] = {
                k: str(v) for k, v in (message.headers or {}).items() if k.startswith("x-jobrunner")
            }
        return len(got) >= count

    await eventually(enough, within=180, interval=0.5)
    return got


async def test_exit_codes_decide_backoff_and_pod_failure_policy_on_a_real_kubelet(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    real_node: RealNode,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    # Each attempt says which it is (its pod's name) and exits with the code asked for.
    script = 'echo "attempt $HOSTNAME exits {{ message.json.code }}"; exit {{ message.json.code }}'
    job = on_real_node(
        real_node,
        [{"name": "work", "image": "busybox", "command": ["sh", "-c", script]}],
        backoff_limit=1,
        podFailurePolicy={
            "rules": [
                {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
    )
    dispatcher = dispatchers(_manifest(tmp_path, namespace, queue, rabbitmq_url, job))
    for message_id, code in (("ok", 0), ("retried", 3), ("fatal", 42)):
        await publish(
            rabbitmq_url, queue, json.dumps({"code": code}).encode(), message_id=message_id
        )

    dead = await _dead_letters(rabbitmq_url, queue, 2)
    await dispatcher.settled("ack", 1, within=120)
    assert sorted(dead) == ["fatal", "retried"]

    retried = _job_of(kube_api, namespace, "retried")
    fatal = _job_of(kube_api, namespace, "fatal")
    ok = _job_of(kube_api, namespace, "ok")
    assert finished(ok) == "Complete"
    # backoffLimit 1: two attempts, both exit 3; the Job fails BackoffLimitExceeded.
    assert (retried.status.failed, _reason(retried)) == (2, "BackoffLimitExceeded")
    # Exit 42 matches the FailJob rule: one attempt, whatever the backoffLimit.
    assert (fatal.status.failed, _reason(fatal)) == (1, "PodFailurePolicy")

    # The dead letter says why, with the real exit code and the last attempt's own words
    # (its pod's log, read through the API server from the kubelet).
    detail = dead["retried"][deadletters.DETAIL]
    assert dead["retried"][deadletters.REASON] == "BackoffLimitExceeded", dead["retried"]
    assert "exited 3 (Error)" in detail, detail
    assert "attempt 2 " in detail, detail
    last = max(
        pods_of_job(kube_api, namespace, retried.metadata.name),
        key=lambda p: p.metadata.creation_timestamp,
    )
    assert f"attempt {last.metadata.name} exits 3" in detail, detail
    assert dead["fatal"][deadletters.REASON] == "PodFailurePolicy", dead["fatal"]
    assert "exited 42" in dead["fatal"][deadletters.DETAIL]


def _reason(job: Any) -> str:
    for c in job.status.conditions or []:
        if c.type == "Failed" and c.status == "True":
            return str(c.reason)
    return ""


async def test_a_deadline_outlived_by_ignoring_sigterm_ends_in_sigkill_after_the_grace(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    real_node: RealNode,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    grace = 3
    # PID 1 with a TERM handler that carries on: only SIGKILL ends it.
    script = (
        "trap 'echo got TERM, carrying on' TERM; echo started; while :; do sleep 1 & wait $!; done"
    )
    job = on_real_node(
        real_node,
        [{"name": "work", "image": "busybox", "command": ["sh", "-c", script]}],
        activeDeadlineSeconds=5,
        pod_spec={"terminationGracePeriodSeconds": grace},
    )
    dispatcher = dispatchers(_manifest(tmp_path, namespace, queue, rabbitmq_url, job))
    with recording_pods(kube_api, namespace) as pods:
        await publish(rabbitmq_url, queue, b"{}", message_id="stubborn")
        dead = await _dead_letters(rabbitmq_url, queue, 1)
        assert dead["stubborn"][deadletters.REASON] == "DeadlineExceeded", dead
        assert dispatcher.settlements("ack") == 0

        async def pod_ended() -> str | None:
            names = [n for n in pods.states if pods.terminated(n, "work")]
            return names[0] if names else None

        pod = await eventually(pod_ended, within=60, interval=0.3)
    ended = pods.terminated(pod, "work")
    assert ended is not None
    # SIGKILL: 128 + 9. The grace was served between the deletion and the kill.
    assert ended["exitCode"] == 137, ended
    # The API server's deletionTimestamp is when the grace ends (the deletion's time plus
    # the grace); the kubelet's finishedAt is when the container ended. A container that
    # SIGTERM had ended would have finished `grace` seconds before it (one-second
    # resolution both).
    grace_ends = next(s["_deletion_timestamp"] for s in pods.states[pod] if s["_deleting"])
    finished_at = datetime.fromisoformat(str(ended["finishedAt"]).replace("Z", "+00:00"))
    assert finished_at.timestamp() >= grace_ends - 1.5, (finished_at, grace_ends, ended)


async def test_a_container_killed_by_its_memory_limit_is_dead_lettered_oomkilled(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    real_node: RealNode,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    # dd's 64 MiB buffer, filled from /dev/zero, inside a 16 MiB limit.
    job = on_real_node(
        real_node,
        [
            {
                "name": "work",
                "image": "busybox",
                "command": [
                    "sh",
                    "-c",
                    "echo filling; dd if=/dev/zero of=/dev/null bs=64M count=4",
                ],
                "resources": {"limits": {"memory": "16Mi"}, "requests": {"memory": "16Mi"}},
            }
        ],
    )
    dispatchers(_manifest(tmp_path, namespace, queue, rabbitmq_url, job))
    await publish(rabbitmq_url, queue, b"{}", message_id="greedy")
    dead = await _dead_letters(rabbitmq_url, queue, 1)
    assert dead["greedy"][deadletters.REASON] == "BackoffLimitExceeded", dead
    assert "exited 137 (OOMKilled)" in dead["greedy"][deadletters.DETAIL], dead


async def test_indexed_completions_each_get_the_message(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    real_node: RealNode,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    script = 'echo "index $JOB_COMPLETION_INDEX of message $JOBRUNNER_MESSAGE"'
    job = on_real_node(
        real_node,
        [{"name": "work", "image": "busybox", "command": ["sh", "-c", script]}],
        completions=3,
        parallelism=3,
        completionMode="Indexed",
    )
    dispatcher = dispatchers(
        _manifest(tmp_path, namespace, queue, rabbitmq_url, job, messageDelivery={"mode": "env"})
    )
    await publish(rabbitmq_url, queue, b"shared-work", message_id="split")
    await dispatcher.settled("ack", 1, within=120)
    done = _job_of(kube_api, namespace, "split")
    assert done.status.succeeded == 3
    lines = sorted(
        [
            (await pod_log(kube_api, namespace, p.metadata.name, "work")).strip()
            for p in pods_of_job(kube_api, namespace, done.metadata.name)
        ]
    )
    assert lines == [f"index {i} of message shared-work" for i in range(3)]


async def test_jobrunner_logs_reads_and_follows_a_real_pod_through_the_api_server(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    real_node: RealNode,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    script = "for i in 1 2 3 4 5; do echo line $i; sleep 1; done; echo done; exit 3"
    job = on_real_node(
        real_node, [{"name": "work", "image": "busybox", "command": ["sh", "-c", script]}]
    )
    dispatchers(_manifest(tmp_path, namespace, queue, rabbitmq_url, job))
    await publish(rabbitmq_url, queue, b"{}", message_id="chatty")

    async def running() -> Any | None:
        j = await asyncio.to_thread(_job_of, kube_api, namespace, "chatty")
        if j is None:
            return None
        p = await asyncio.to_thread(pods_of_job, kube_api, namespace, j.metadata.name)
        return j if p and p[0].status.phase == "Running" else None

    job_obj = await eventually(running, within=120, interval=0.3)
    name = job_obj.metadata.name
    cli = [sys.executable, "-m", "jobrunner.cli", "--kubeconfig", str(kubeconfig)]
    env = {**os.environ, "NO_COLOR": "1"}
    # -f follows the pod as it writes and returns when the Job has ended.
    follow = await asyncio.to_thread(
        subprocess.run,
        [*cli, "logs", name, "-n", namespace, "-f"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert [f"line {i}" for i in range(1, 6)] + ["done"] == [
        line for line in follow.stdout.splitlines() if line.startswith(("line ", "done"))
    ], follow.stdout + follow.stderr

    async def failed() -> bool:
        j = await asyncio.to_thread(_job_of, kube_api, namespace, "chatty")
        return j is not None and finished(j) == "Failed"

    await eventually(failed, within=60, interval=0.3)
    # Afterwards: every attempt, with its exit code.
    after = await asyncio.to_thread(
        subprocess.run,
        [*cli, "logs", name, "-n", namespace],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    shown = after.stdout + after.stderr
    assert "line 5\ndone" in after.stdout, shown
    # Each attempt's header says how it ended, with the real exit code.
    assert re.search(r"==> attempt 1 \(pod [^)]+\), container work: [^\n]*\b3\b", shown), shown
    assert "BackoffLimitExceeded" in follow.stdout, follow.stdout
    dead = await _dead_letters(rabbitmq_url, queue, 1)
    assert "exited 3 (Error)" in dead["chatty"][deadletters.DETAIL]
    assert "line 5 | done" in dead["chatty"][deadletters.DETAIL], dead
