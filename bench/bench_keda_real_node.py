"""jobrunner and KEDA side by side on the real node (``make bench-keda``, after the KWOK
table; about 3 minutes).

The same workload for both, one system at a time: 20 messages published at 1 per second
to RabbitMQ, ``maxReplicaCount`` 4, one Job template whose container runs on the stack's
real node (``jobrunner-node-0``) from the same image (the jobrunner image: Python and
aio-pika). What differs is what each system is:

* jobrunner's Job carries its message: the container prints the id it was given;
* KEDA's Job must fetch one: the container connects to RabbitMQ (at the bridge's host
  address, as a pod reaches the stack's broker), takes one message (``basic.get``),
  prints its id and acks it; a container that finds the queue empty prints so.

Measured per message: publish → the container running with that message in hand (the
timestamp containerd gave the line that names it, read through the kubelet's log API),
p50/p95, beside the same image's bare pod created directly on the same node in the same
run (the physical limit). Also: the Jobs each system created, and KEDA's Jobs that found
no message.

    python bench/bench_keda_real_node.py [--systems jr,k1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench_keda import (
    DEPLOY,
    JobrunnerSide,
    KedaSide,
    Process,
    create_namespace,
    delete_namespace,
    release_finalizers,
)
from bench_real_node import first_line_at, parse_rfc3339, pod_spec
from benchlib import declare_queue, delete_queue, env_file, pct, publish_many
from kubernetes import client, config

MESSAGES, RATE, MAX_REPLICAS = 20, 1.0, 4
BARE = 5

FETCH = """
import asyncio, os, aio_pika
async def main():
    connection = await aio_pika.connect(os.environ["AMQP_URL"])
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(os.environ["QUEUE"], ensure=False)
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            print("found no message", flush=True)
            return
        print("running", message.message_id, flush=True)
        await message.ack()
asyncio.run(main())
"""
CARRIED = "import os; print('running', os.environ['JOBRUNNER_MESSAGE_ID'], flush=True)"


def scaledjob(
    system: str, namespace: str, queue: str, host_url: str, pod_url: str, image: str
) -> dict[str, Any]:
    spec = pod_spec(image, "")
    container = spec["containers"][0]
    if system == "jr":
        container["command"] = ["python3", "-c", CARRIED]
    else:
        container["command"] = ["python3", "-c", FETCH]
        container["env"] = [
            {"name": "AMQP_URL", "value": pod_url},
            {"name": "QUEUE", "value": queue},
        ]
    doc: dict[str, Any] = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "real", "namespace": namespace},
        "spec": {
            "jobTargetRef": {"backoffLimit": 0, "template": {"spec": spec}},
            "maxReplicaCount": MAX_REPLICAS,
            "pollingInterval": 1,
            "triggers": [
                {
                    "type": "rabbitmq",
                    "metadata": {
                        "queueName": queue,
                        "host": host_url,
                        "mode": "QueueLength",
                        "value": "1",
                    },
                }
            ],
        },
    }
    if system == "jr":
        doc["spec"]["messageDelivery"] = {"mode": "env"}
    return doc


def collect(
    core: client.CoreV1Api, namespace: str, want: set[str], timeout: float
) -> tuple[dict[str, float], int, int]:
    """Message id -> when a container printed it; and the pods that found no message, and
    all pods seen. Reads each ended pod's log once."""
    got: dict[str, float] = {}
    empty: set[str] = set()
    read: set[str] = set()
    deadline = time.time() + timeout
    pods: list[Any] = []
    while time.time() < deadline and not want <= set(got):
        pods = core.list_namespaced_pod(namespace).items
        for pod in pods:
            name = pod.metadata.name
            if name in read or pod.status.phase not in ("Succeeded", "Failed"):
                continue
            try:
                text = core.read_namespaced_pod_log(
                    name, namespace, container="work", timestamps=True
                )
            except client.ApiException:
                continue
            read.add(name)
            for line in text.splitlines():
                stamp, _, rest = line.partition(" ")
                if rest.startswith("running "):
                    got.setdefault(rest.split()[1], parse_rfc3339(stamp))
                elif rest.startswith("found no message"):
                    empty.add(name)
        time.sleep(0.3)
    return got, len(empty), len({p.metadata.name for p in pods} | read)


def wait_finished(api: client.ApiClient, namespace: str, timeout: float) -> int:
    """Waits until every Job of the namespace has ended (and so its message was settled);
    returns how many Jobs there are."""
    batch = client.BatchV1Api(api)
    deadline = time.time() + timeout
    while True:
        jobs = batch.list_namespaced_job(namespace).items
        done = [
            j
            for j in jobs
            if any(
                c.type in ("Complete", "Failed") and c.status == "True"
                for c in j.status.conditions or []
            )
        ]
        if len(done) == len(jobs) or time.time() > deadline:
            return len(jobs)
        time.sleep(0.5)


def run(
    system: str, api: client.ApiClient, env: dict[str, str], image: str, work: Path
) -> dict[str, Any]:
    core = client.CoreV1Api(api)
    namespace = f"kbench-real-{uuid.uuid4().hex[:6]}-{system}"
    queue = f"{namespace}-q"
    url = env["JOBRUNNER_TEST_RABBITMQ_URL"]
    create_namespace(core, namespace)
    asyncio.run(declare_queue(url, queue))
    doc = scaledjob(system, namespace, queue, url, env["JOBRUNNER_TEST_RABBITMQ_POD_URL"], image)
    keda: Process | None = None
    try:
        if system == "jr":
            jr_doc = {**doc, "apiVersion": "jobrunner.dev/v1alpha1"}
            side: Any = JobrunnerSide(env["JOBRUNNER_TEST_KUBECONFIG"], work)
            side.start(jr_doc)
        else:
            keda = Process(
                "keda-operator", ["bash", str(DEPLOY / "keda-run.sh"), namespace], work / "keda.log"
            )
            keda.wait_for(
                lambda text: any(
                    "Starting workers" in ln and "scaledjob" in ln for ln in text.splitlines()
                ),
                120,
                "its ScaledJob controller starting",
            )
            side = KedaSide(api, namespace)
            side.start(doc)
        ids = [f"m{i}" for i in range(MESSAGES)]
        sent = asyncio.run(publish_many(url, queue, ids, RATE))
        got, empty, pods = collect(core, namespace, set(ids), 240)
        jobs = wait_finished(api, namespace, 120)
        side.stop()
    finally:
        # jobrunner's finalizer is released once a message's settlement is durable; one
        # still held after the wait above would be jobrunner's to explain.
        held = release_finalizers(api, namespace)
        if held:
            print(f"  {system}: {held} Job(s) still carried jobrunner's finalizer at the end")
        delete_namespace(core, namespace, timeout=120)
        if keda is not None:
            keda.stop()
            release_finalizers(api, namespace)
        asyncio.run(delete_queue(url, queue))
    latencies = [got[m] - sent[m] for m in ids if m in got]
    return {
        "latency": latencies,
        "missing": len(ids) - len(latencies),
        "jobs": jobs,
        "empty": empty,
        "pods": pods,
    }


def bare(api: client.ApiClient, image: str) -> list[float]:
    core = client.CoreV1Api(api)
    namespace = f"kbench-real-{uuid.uuid4().hex[:6]}-bare"
    create_namespace(core, namespace)
    out = []
    try:
        for i in range(BARE + 1):
            spec = pod_spec(image, "")
            spec["containers"][0]["command"] = [
                "python3",
                "-c",
                "print('running bare', flush=True)",
            ]
            name = f"bare-{i}"
            created = time.time()
            core.create_namespaced_pod(
                namespace, {"metadata": {"name": name, "labels": {"bench": name}}, "spec": spec}
            )
            at = first_line_at(core, namespace, f"bench={name}", 120)
            if i:  # the first warms the node for this image
                out.append(at - created)
    finally:
        delete_namespace(core, namespace, timeout=120)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--systems", default="jr,k1", help="jr (jobrunner), k1 (KEDA, pollingInterval 1)"
    )
    args = parser.parse_args()
    env = env_file()
    image = env.get("JOBRUNNER_TEST_JOBRUNNER_IMAGE")
    if not image or not env.get("JOBRUNNER_TEST_RABBITMQ_POD_URL"):
        raise SystemExit("the stack has no real node (make stack-up starts one)")
    api = config.new_client_from_config(config_file=env["JOBRUNNER_TEST_KUBECONFIG"])
    work = Path(tempfile.mkdtemp(prefix="jobrunner-bench-keda-real-"))
    base = bare(api, image)
    results = {s: run(s, api, env, image, work) for s in args.systems.split(",")}
    base += bare(api, image)
    titles = {"jr": "jobrunner", "k1": "KEDA poll 1"}

    def ms(values: list[float], p: float) -> str:
        return f"{pct(values, p) * 1000:.0f} ms" if values else "—"

    print(
        f"\nreal node: {MESSAGES} messages at {RATE:.0f}/s, maxReplicaCount {MAX_REPLICAS}, image {image}"
    )
    print(
        f"  bare pod of the same image (create -> running), before and after: p50 {ms(base, 50)}, p95 {ms(base, 95)}"
    )
    for key, r in results.items():
        lat = r["latency"]
        ratio = f"{pct(lat, 50) / pct(base, 50):.2f}x the bare pod" if lat else "—"
        print(
            f"  {titles.get(key, key):<12} publish -> running with its message p50 {ms(lat, 50)}, "
            f"p95 {ms(lat, 95)} ({ratio}); messages never seen {r['missing']}; Jobs {r['jobs']}; "
            f"pods that found no message {r['empty']}"
        )
    print(f"  logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
