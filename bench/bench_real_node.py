"""Publish → a real container running with its message, on the stack's real node.

Every figure is measured in this run beside its physical limit measured in the same run:

* jobrunner: a message published to RabbitMQ becomes a Job (a dispatcher process, a
  ScaledJob whose pods run on ``jobrunner-node-0``), the Job controller makes its pod, the
  scheduler binds it, the kubelet starts it, and its container prints the message id;
* bare Job: the same pod template in a Job created directly by one API call (what the
  Job controller adds is in both this and jobrunner's figure);
* bare pod: the same image and command, the pod created directly by one API call (the
  node's own start-up: the physical limit).

The moment a container ran is the timestamp containerd gave its first log line (the
kubelet's log API with ``timestamps=true``, nanoseconds, the host's clock, the same
clock as the publish). The two are interleaved one at a time, so neither waits for the
other and all see the same machine load; the ratios of the medians are jobrunner's
share (the message and the Job) over a bare Job, and over the node's own pod start-up.

    python bench/bench_real_node.py [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from benchlib import declare_queue, delete_queue, env_file, pct, start_dispatcher, wait_log
from kubernetes import client, config

from jobrunner.core.models import FINALIZER
from jobrunner.core.naming import job_name, message_identity

TAINT = "jobrunner.dev/real-node"


def pod_spec(image: str, say: str) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "nodeSelector": {TAINT: "true"},
        "tolerations": [{"key": TAINT, "operator": "Exists", "effect": "NoSchedule"}],
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "work",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", f'echo "running {say}"'],
            }
        ],
    }


def first_line_at(core: client.CoreV1Api, namespace: str, selector: str, timeout: float) -> float:
    """When the first log line of the pod matching ``selector`` was written (epoch s)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        for pod in pods:
            statuses = pod.status.container_statuses or []
            if not statuses or not (statuses[0].state.running or statuses[0].state.terminated):
                continue
            try:
                text = core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container="work", timestamps=True
                )
            except client.ApiException:
                continue
            for line in text.splitlines():
                stamp, _, rest = line.partition(" ")
                if rest.startswith("running "):
                    return parse_rfc3339(stamp)
        time.sleep(0.05)
    raise SystemExit(f"no container of {selector} in {namespace} ran within {timeout:.0f}s")


def parse_rfc3339(stamp: str) -> float:
    """``2026-12-07T17:59:01.123456789Z`` -> epoch seconds (nanoseconds cut to micro)."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head + "+00:00").timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="messages, and as many bare pods")
    args = parser.parse_args()
    env = env_file()
    kubeconfig = env["JOBRUNNER_TEST_KUBECONFIG"]
    url = env["JOBRUNNER_TEST_RABBITMQ_URL"]
    image = env.get("JOBRUNNER_TEST_BUSYBOX_IMAGE")
    if not image or not env.get("JOBRUNNER_TEST_REAL_NODE"):
        raise SystemExit("the stack has no real node (make stack-up starts one)")
    api = config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    namespace = f"kbench-real-{uuid.uuid4().hex[:6]}"
    queue = f"{namespace}-q"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    asyncio.run(declare_queue(url, queue))
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "real", "namespace": namespace},
        "spec": {
            "maxReplicaCount": 4,
            "messageDelivery": {"mode": "env"},
            "jobTargetRef": {
                "backoffLimit": 0,
                "template": {"spec": pod_spec(image, "$(JOBRUNNER_MESSAGE_ID)")},
            },
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
        },
    }
    work = Path(tempfile.mkdtemp(prefix="bench-real-node-"))
    manifest = work / "scaledjob.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    log = work / "dispatcher.log"
    dispatcher = start_dispatcher(manifest, kubeconfig, log)
    jobrunner_s: list[float] = []
    bare_job_s: list[float] = []
    bare_s: list[float] = []
    try:
        wait_log(log, "dispatching real from queue", 60)
        # One of each first, not counted: the first container start warms the node's
        # caches (image snapshot, cgroups) for both.
        for i in range(-1, args.runs):
            mid = f"m{i + 1}"
            sent = time.time()
            asyncio.run(publish_one(url, queue, mid))
            # The Job's name is the message's (jobrunner.core.naming); its pods carry it.
            job = job_name("real", message_identity(mid, b"{}", {}))
            at = first_line_at(core, namespace, f"batch.kubernetes.io/job-name={job}", 120)
            if i >= 0:
                jobrunner_s.append(at - sent)
            name = f"job-{i + 1}"
            created = time.time()
            batch.create_namespaced_job(
                namespace,
                {
                    "metadata": {"name": name},
                    "spec": {"backoffLimit": 0, "template": {"spec": pod_spec(image, name)}},
                },
            )
            at = first_line_at(core, namespace, f"batch.kubernetes.io/job-name={name}", 120)
            if i >= 0:
                bare_job_s.append(at - created)
            name = f"bare-{i + 1}"
            body = {
                "metadata": {"name": name, "labels": {"bench": name}},
                "spec": pod_spec(image, name),
            }
            created = time.time()
            core.create_namespaced_pod(namespace, body)
            at = first_line_at(core, namespace, f"bench={name}", 120)
            if i >= 0:
                bare_s.append(at - created)
    finally:
        dispatcher.terminate()
        dispatcher.wait(60)
        asyncio.run(delete_queue(url, queue))
        for job in batch.list_namespaced_job(namespace).items:
            if FINALIZER in (job.metadata.finalizers or []):
                batch.patch_namespaced_job(
                    job.metadata.name, namespace, {"metadata": {"finalizers": None}}
                )
        core.delete_namespace(namespace, propagation_policy="Background")

    def row(what: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"  {what:<34} p50 {pct(ms, 50):7.0f} ms   p95 {pct(ms, 95):7.0f} ms   "
            f"mean {statistics.mean(ms):7.0f} ms   (n={len(ms)})"
        )

    print(f"real node ({env['JOBRUNNER_TEST_REAL_NODE']}), {args.runs} of each, interleaved:")
    print(row("publish -> container running (jr)", jobrunner_s))
    print(row("Job create -> container running", bare_job_s))
    print(row("pod create -> container running", bare_s))
    ratio = pct(jobrunner_s, 50) / pct(bare_s, 50)
    job_ratio = pct(jobrunner_s, 50) / pct(bare_job_s, 50)
    print(
        f"  jobrunner / bare Job (p50): {job_ratio:.2f}x; jobrunner / bare pod (p50): {ratio:.2f}x"
    )
    print(
        json.dumps(
            {
                "jobrunner_p50_s": pct(jobrunner_s, 50),
                "bare_p50_s": pct(bare_s, 50),
                "jobrunner_p95_s": pct(jobrunner_s, 95),
                "bare_p95_s": pct(bare_s, 95),
                "ratio_p50": ratio,
            }
        )
    )
    return 0


async def publish_one(url: str, queue: str, mid: str) -> None:
    import aio_pika

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id=mid), routing_key=queue
        )


if __name__ == "__main__":
    sys.exit(main())
