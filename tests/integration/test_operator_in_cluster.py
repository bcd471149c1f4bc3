"""The operator as the Helm chart runs it: two replicas on the real node, in-cluster.

A user's `helm install` of deploy/helm/jobrunner in a namespace of its own (only the
image, pull policy, node placement and the watched namespace given as values), two
replicas on the stack's kubelet node, Ready by their own probes, talking to the API server
through the `kubernetes` Service with the chart's ServiceAccount token (nothing mounted by
the test). A tenant applies a Secret, a TriggerAuthentication and a ScaledJob with
`kubectl apply -f`; its Jobs run busybox on the same node and print their message.

Then the two ways a replica goes away on a real node: its container SIGKILLed through the
CRI (`ctr tasks kill`), with the takeover measured (kill -> the first message published
after it has its Job), and `kubectl drain` of the operator pods with the chart's
PodDisruptionBudget: one replica is evicted, the second eviction is refused while the
first's replacement cannot schedule on the cordoned node, and messages keep being served.
Every message gets exactly one Job and one ack.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from kubernetes import client

from jobrunner.core.models import ANNOTATION_MESSAGE_ID, ANNOTATION_SETTLED
from tests import services
from tests.helm import CHART, helm
from tests.helpers import eventually
from tests.integration.harness import finished, jobs_of, publish
from tests.integration.operator_harness import ScaledJobs
from tests.integration.realnode import MAX_REPLICAS, RealNode, on_real_node, pod_log, pods_of_job

pytestmark = [
    pytest.mark.kube,
    pytest.mark.rabbitmq,
    pytest.mark.real_node,
    pytest.mark.usefixtures("jobrunner_crds"),
]

SCALEDJOB = "printer"
# Each Job prints its message and stays a few seconds, so that some are running when a
# replica is killed (their redeliveries must adopt them, not make a second Job).
PRINT = 'echo "got id=$JOBRUNNER_MESSAGE_ID body=$JOBRUNNER_MESSAGE"; sleep 4'


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/name=jobrunner,app.kubernetes.io/instance={self.name}"

    @property
    def service_account(self) -> str:
        return f"{self.name}-jobrunner"


def kubectl(
    kubeconfig: Path, *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    binary = services.setting("JOBRUNNER_TEST_KUBECTL") or "kubectl"
    result = subprocess.run(
        [binary, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr}")  # fmt: skip
    return result


def operator_pods(kube_api: client.ApiClient, release: Release) -> list[Any]:
    return list(
        client.CoreV1Api(kube_api)
        .list_namespaced_pod(release.namespace, label_selector=release.selector)
        .items
    )


def ready(pod: Any) -> bool:
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or [])
    )


def management(method: str, path: str) -> Any:
    url = services.setting("JOBRUNNER_TEST_RABBITMQ_MANAGEMENT_URL")
    if not url:
        services.missing("RabbitMQ's management API", "JOBRUNNER_TEST_RABBITMQ_MANAGEMENT_URL")
    parsed = urllib.parse.urlsplit(str(url))
    base = f"{parsed.scheme}://{parsed.hostname}:{parsed.port}"
    request = urllib.request.Request(f"{base}{path}", method=method)
    auth = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
    request.add_header("authorization", f"Basic {auth}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


async def acked_and_empty(queue: str, count: int, *, within: float = 120) -> None:
    """The queue holds nothing (ready or unacknowledged) and the broker counted exactly
    ``count`` acks on it: each message acked once (its statistics lag a few seconds)."""
    path = f"/api/queues/%2F/{urllib.parse.quote(queue, safe='')}"

    async def check() -> dict[str, Any] | None:
        q = await asyncio.to_thread(management, "GET", path)
        acks = (q.get("message_stats") or {}).get("ack", 0)
        return q if q.get("messages") == 0 and acks >= count else None

    q = await eventually(check, within=within, interval=1)
    assert q["message_stats"]["ack"] == count, q["message_stats"]


def jobs_by_message(kube_api: client.ApiClient, namespace: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for job in jobs_of(kube_api, namespace, SCALEDJOB):
        out.setdefault(job.metadata.annotations.get(ANNOTATION_MESSAGE_ID, ""), []).append(job)
    return out


async def jobs_for(
    kube_api: client.ApiClient, namespace: str, ids: list[str], *, within: float
) -> dict[str, list[Any]]:
    async def check() -> dict[str, list[Any]] | None:
        found = await asyncio.to_thread(jobs_by_message, kube_api, namespace)
        return found if all(i in found for i in ids) else None

    found: dict[str, list[Any]] = await eventually(check, within=within, interval=0.2)
    return found


async def printed(
    kube_api: client.ApiClient, namespace: str, bodies: dict[str, str], *, within: float = 180
) -> None:
    """Each message's one Job completed, settled, and its container printed that message."""

    async def done() -> dict[str, list[Any]] | None:
        found = await asyncio.to_thread(jobs_by_message, kube_api, namespace)
        ok = all(
            any(finished(j) == "Complete" and ANNOTATION_SETTLED in j.metadata.annotations
                for j in found.get(i, []))
            for i in bodies
        )  # fmt: skip
        return found if ok else None

    found = await eventually(done, within=within, interval=0.5)
    for message_id, body in bodies.items():
        jobs = found[message_id]
        assert len(jobs) == 1, f"{message_id}: {[j.metadata.name for j in jobs]}"
        pods = await asyncio.to_thread(pods_of_job, kube_api, namespace, jobs[0].metadata.name)
        logs = [await pod_log(kube_api, namespace, p.metadata.name, "work") for p in pods]
        assert f"got id={message_id} body={body}\n" in logs, (message_id, logs)


async def publish_all(url: str, queue: str, ids: list[str]) -> dict[str, str]:
    bodies = {i: f"hello from {i}" for i in ids}
    for message_id, body in bodies.items():
        await publish(url, queue, body.encode(), message_id=message_id)
    return bodies


def owner_of(status: dict[str, Any]) -> str:
    return str(status.get("owner") or "")


def tenant_objects(namespace: str, queue: str, pod_url: str, node: RealNode) -> list[Any]:
    """What a tenant applies: the broker's URL (with its credentials) in a Secret of their
    namespace, a TriggerAuthentication naming it, and the ScaledJob."""
    job = on_real_node(node, [{"name": "work", "image": "busybox", "command": ["sh", "-c", PRINT]}])
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "broker", "namespace": namespace},
            "stringData": {"host": pod_url},
        },
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "broker", "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "host", "name": "broker", "key": "host"}]},
        },
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": SCALEDJOB, "namespace": namespace},
            "spec": {
                "maxReplicaCount": MAX_REPLICAS,
                "jobTargetRef": job,
                "triggers": [
                    {
                        "type": "rabbitmq",
                        "metadata": {"queueName": queue},
                        "authenticationRef": {"name": "broker"},
                    }
                ],
            },
        },
    ]


@pytest.fixture
async def broker_queue(rabbitmq_url: str) -> AsyncIterator[str]:
    name = f"incluster-{uuid.uuid4().hex[:10]}"
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)
    yield name
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
        await channel.queue_delete(f"{name}.dead-letter")


@pytest.fixture
def release(
    kube_api: client.ApiClient, kubeconfig: Path, namespace: str, real_node: RealNode,
    tmp_path: Path, request: pytest.FixtureRequest,
) -> Any:  # fmt: skip
    """The chart installed as a user would, serving the test's namespace, its two
    replicas on the real node; uninstalled (and the node uncordoned) afterwards."""
    core = client.CoreV1Api(kube_api)
    name = f"jr{uuid.uuid4().hex[:8]}"
    home = f"{name}-system"
    image = real_node.images["jobrunner"]
    repository, _, tag = image.rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "replicaCount": 2,
        "watchNamespaces": [namespace],
        "nodeSelector": {real_node.taint: "true"},
        "tolerations": [{"key": real_node.taint, "operator": "Exists", "effect": "NoSchedule"}],
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    try:
        helm(
            "install", name, str(CHART), "--kubeconfig", str(kubeconfig), "-n", home,
            "-f", str(path), "--wait=false",
        )  # fmt: skip
        yield Release(name, home)
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:  # what each replica said, current and previous
            for pod in operator_pods(kube_api, Release(name, home)):
                for previous in ("--previous=false", "--previous=true"):
                    logs = kubectl(kubeconfig, "logs", "-n", home, pod.metadata.name, previous,
                                   check=False).stdout  # fmt: skip
                    print(f"----- {pod.metadata.name} {previous} -----\n{logs[-20000:]}")
        # Other tests need the node: never leave it cordoned, whatever happened.
        kubectl(kubeconfig, "uncordon", real_node.name, check=False)
        helm("uninstall", name, "--kubeconfig", str(kubeconfig), "-n", home, "--wait",
             "--timeout", "120s", check=False, timeout=180)  # fmt: skip
        core.delete_namespace(home, propagation_policy="Background")


async def both_replicas_ready(
    kube_api: client.ApiClient, release: Release, node: RealNode, *, within: float = 240
) -> list[Any]:
    async def check() -> list[Any] | None:
        pods = await asyncio.to_thread(operator_pods, kube_api, release)
        up = [p for p in pods if ready(p)]
        return up if len(up) == 2 else None

    pods: list[Any] = await eventually(check, within=within, interval=0.5)
    for pod in pods:
        assert pod.spec.node_name == node.name
        assert pod.spec.service_account_name == release.service_account
        container = pod.spec.containers[0]
        assert not [e for e in container.env or [] if e.name == "KUBECONFIG"]
        # Only the chart's own volumes: its /tmp and the ServiceAccount token the kubelet
        # projects (in-cluster config reads it); no kubeconfig, no token of the test's.
        assert {v.name for v in pod.spec.volumes} - {"tmp"} <= {
            v.name for v in pod.spec.volumes if v.name.startswith("kube-api-access-")
        }, [v.name for v in pod.spec.volumes]
    return pods


async def test_operator_installed_by_the_chart_serves_on_the_real_node_through_a_kill_and_a_drain(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    rabbitmq_url: str,
    real_node: RealNode,
    release: Release,
    broker_queue: str,
    tmp_path: Path,
) -> None:
    pod_url = services.setting("JOBRUNNER_TEST_RABBITMQ_POD_URL")
    if not pod_url:
        services.missing("RabbitMQ from pods", "JOBRUNNER_TEST_RABBITMQ_POD_URL is unset")
    assert pod_url is not None
    sock = services.setting("JOBRUNNER_TEST_CONTAINERD_SOCK")
    if not sock:
        services.missing("the real node's containerd", "JOBRUNNER_TEST_CONTAINERD_SOCK is unset")
    assert sock is not None
    scaledjobs = ScaledJobs(kube_api, namespace)

    # 1. Installed as a user would: both replicas Ready by their own probes, each a
    # member of the lease group as itself (in-cluster config, the chart's token).
    pods = await both_replicas_ready(kube_api, release, real_node)
    coordination = client.CoordinationV1Api(kube_api)

    async def members() -> set[str] | None:
        leases = await asyncio.to_thread(
            coordination.list_namespaced_lease, release.namespace,
            label_selector=f"jobrunner.dev/lease-group={release.service_account}",
        )  # fmt: skip
        holders = {lease.spec.holder_identity or "" for lease in leases.items}
        names = {p.metadata.name for p in pods}
        joined = {n for n in names if any(h.startswith(f"{n}-") for h in holders)}
        return joined if joined == names else None

    await eventually(members, within=60, interval=0.5)

    # 2. The tenant's objects, applied with kubectl.
    manifest = tmp_path / "tenant.yaml"
    manifest.write_text(
        yaml.safe_dump_all(tenant_objects(namespace, broker_queue, pod_url, real_node))
    )
    await asyncio.to_thread(kubectl, kubeconfig, "apply", "-f", str(manifest))
    await scaledjobs.wait_condition(SCALEDJOB, "Ready", "True", within=120)
    first = await publish_all(rabbitmq_url, broker_queue, [f"first-{i}" for i in range(4)])
    await printed(kube_api, namespace, first)
    await acked_and_empty(broker_queue, len(first))
    total = len(first)

    # 3. The serving replica's container SIGKILLed through the CRI, with Jobs running.
    owner = owner_of(await scaledjobs.status(SCALEDJOB))
    (victim,) = [p for p in pods if owner.startswith(f"{p.metadata.name}-")]
    survivor = next(p.metadata.name for p in pods if p is not victim)
    running = await publish_all(rabbitmq_url, broker_queue, [f"running-{i}" for i in range(3)])
    await jobs_for(kube_api, namespace, list(running), within=60)
    (status,) = victim.status.container_statuses
    container_id = status.container_id.removeprefix("containerd://")
    kill = await asyncio.create_subprocess_exec(
        "ctr", "--address", sock, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL",
        container_id, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(kill.communicate(), timeout=30)
    assert kill.returncode == 0, err
    killed_at = time.monotonic()
    after = await publish_all(rabbitmq_url, broker_queue, [f"after-kill-{i}" for i in range(3)])
    await jobs_for(kube_api, namespace, [next(iter(after))], within=120)
    takeover = time.monotonic() - killed_at

    async def owned_anew() -> str:
        now = owner_of(await scaledjobs.status(SCALEDJOB))
        return now if now and now != owner else ""

    # The status names its new owner at its next write (at most the status interval).
    new_owner = await eventually(owned_anew, within=60, interval=0.3)
    print(
        f"takeover after SIGKILL (ctr tasks kill) of {owner}: {takeover:.1f} s until the "
        f"first message published after it had its Job; status owner {new_owner} after "
        f"{time.monotonic() - killed_at:.1f} s (survivor {survivor}; the killed container "
        "restarts in its pod with a new identity)"
    )
    await printed(kube_api, namespace, {**running, **after})
    total += len(running) + len(after)
    await acked_and_empty(broker_queue, total)

    # 4. A drain of the operator pods with the PDB in place: one eviction goes through,
    # the second is refused while the first's replacement cannot schedule (the node is
    # cordoned, and no other node is allowed), and the remaining replica serves.
    await both_replicas_ready(kube_api, release, real_node)
    try:
        drain = await asyncio.create_subprocess_exec(
            services.setting("JOBRUNNER_TEST_KUBECTL") or "kubectl",
            "--kubeconfig", str(kubeconfig), "drain", real_node.name,
            f"--pod-selector={release.selector}", "--ignore-daemonsets",
            "--delete-emptydir-data", "--timeout=40s",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

        async def evicted() -> bool:
            now = await asyncio.to_thread(operator_pods, kube_api, release)
            return any(p.metadata.deletion_timestamp for p in now) or len(now) > 2

        await eventually(evicted, within=60, interval=0.3)
        evicted_at = time.monotonic()
        during = await publish_all(rabbitmq_url, broker_queue, [f"drain-{i}" for i in range(3)])
        # Served while cordoned: their Jobs are made; their pods wait for the node.
        await jobs_for(kube_api, namespace, list(during), within=90)
        served = time.monotonic() - evicted_at
        output, _ = await asyncio.wait_for(drain.communicate(), timeout=120)
        text = output.decode(errors="replace")
        assert drain.returncode != 0, text
        assert "disruption budget" in text, text
        left = await asyncio.to_thread(operator_pods, kube_api, release)
        serving = [p for p in left if ready(p)]
        assert len(serving) == 1, [(p.metadata.name, p.status.phase) for p in left]
        assert [p for p in left if p.status.phase == "Pending"], "no replacement waiting"
        refusals = text.count("violate the pod's disruption budget")
        print(
            f"drain: one replica evicted, {serving[0].metadata.name} kept (the PDB refused "
            f"the second eviction {refusals} times in 40 s); the 3 messages published after "
            f"the eviction had their Jobs {served:.1f} s after it"
        )
    finally:
        await asyncio.to_thread(kubectl, kubeconfig, "uncordon", real_node.name, check=False)
    await printed(kube_api, namespace, during)
    total += len(during)
    await acked_and_empty(broker_queue, total)
    found = await asyncio.to_thread(jobs_by_message, kube_api, namespace)
    assert sorted(found) == sorted([*first, *running, *after, *during])
    assert all(len(jobs) == 1 for jobs in found.values()), found
