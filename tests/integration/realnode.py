"""Helpers for the tests that run real containers on the stack's real node.

The local stack has two kinds of node (deploy/local/node.sh): KWOK's ``kwok-node-0``, where
no container runs, for scale; and ``jobrunner-node-0``, a kubelet with containerd and runc,
tainted ``jobrunner.dev/real-node=true:NoSchedule`` so only pods that ask for it land there.
Tests marked ``real_node`` use the second; a Job template made by :func:`on_real_node`
tolerates the taint and selects the node. Its images come from the stack
(``build-node-images.sh``), never from a registry: ``imagePullPolicy: Never``.

The node runs at most ``REAL_NODE_MAX_PODS`` (12) pods; each test keeps its ScaledJob's
``maxReplicaCount`` at 4 or less, so a test never waits for another's pods to go.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, watch

from tests import services

MAX_REPLICAS = 4
"""The most pods one real-node test runs at a time (the node holds 12)."""


@dataclass(frozen=True)
class RealNode:
    name: str
    taint: str
    images: Mapping[str, str]
    """``busybox``, ``python``, ``jobrunner``, ``pause``: names containerd has."""
    node_ip: str
    """The host's end of the pod bridge: where pods reach the stack's brokers."""


def real_node(kube_api: client.ApiClient) -> RealNode:
    """The stack's real node, Ready; missing() (a failure with CI=true) otherwise."""
    name = services.setting("JOBRUNNER_TEST_REAL_NODE")
    if not name:
        services.missing("the real node", "JOBRUNNER_TEST_REAL_NODE is unset (make stack-up)")
    assert name is not None
    try:
        node = client.CoreV1Api(kube_api).read_node(name)
    except client.ApiException as exc:
        services.missing("the real node", f"node {name}: {exc.status} {exc.reason}")
        raise
    ready = any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))
    if not ready:
        services.missing("the real node", f"node {name} is not Ready (see the kubelet's log)")
    images = {}
    for key in ("busybox", "python", "jobrunner", "pause"):
        value = services.setting(f"JOBRUNNER_TEST_{key.upper()}_IMAGE")
        if not value:
            services.missing("the real node", f"JOBRUNNER_TEST_{key.upper()}_IMAGE is unset")
        images[key] = str(value)
    return RealNode(
        name=name,
        taint=services.setting("JOBRUNNER_TEST_REAL_NODE_TAINT") or "jobrunner.dev/real-node",
        images=images,
        node_ip=services.setting("JOBRUNNER_TEST_NODE_IP") or "10.88.0.1",
    )


def on_real_node(
    node: RealNode,
    containers: list[dict[str, Any]],
    *,
    backoff_limit: int = 0,
    pod_spec: Mapping[str, Any] | None = None,
    **job_spec: Any,
) -> dict[str, Any]:
    """A ``jobTargetRef`` whose pods run on the real node: the taint tolerated, the node
    selected, each container's image pulled never (``image`` may name a stack image:
    ``busybox``, ``python``, ``jobrunner``)."""
    for container in containers:
        container["image"] = node.images.get(container.get("image", "busybox"), container["image"])
        container.setdefault("imagePullPolicy", "Never")
    return {
        "backoffLimit": backoff_limit,
        **job_spec,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {node.taint: "true"},
                "tolerations": [{"key": node.taint, "operator": "Exists", "effect": "NoSchedule"}],
                "terminationGracePeriodSeconds": 5,
                "containers": containers,
                **(pod_spec or {}),
            }
        },
    }


def pods_of_job(kube_api: client.ApiClient, namespace: str, job: str) -> list[Any]:
    return list(
        client.CoreV1Api(kube_api)
        .list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}")
        .items
    )


async def pod_log(kube_api: client.ApiClient, namespace: str, pod: str, container: str) -> str:
    """A container's log through the API server (the kubelet's serving API, as kubectl
    logs reads it)."""
    return str(
        await asyncio.to_thread(
            client.CoreV1Api(kube_api).read_namespaced_pod_log,
            pod,
            namespace,
            container=container,
        )
    )


@dataclass
class PodRecorder:
    """Every state a namespace's pods went through, from a watch: a pod deleted at its
    Job's deadline is gone before a test can read it, its watch events are not."""

    states: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seen_at: dict[str, list[float]] = field(default_factory=dict)

    def container_states(self, pod: str, container: str) -> list[dict[str, Any]]:
        return [s[container] for s in self.states.get(pod, []) if container in s]

    def terminated(self, pod: str, container: str) -> dict[str, Any] | None:
        for state in reversed(self.container_states(pod, container)):
            if state.get("terminated"):
                return dict(state["terminated"])
        return None


@contextmanager
def recording_pods(kube_api: client.ApiClient, namespace: str) -> Iterator[PodRecorder]:
    recorder = PodRecorder()
    stop = threading.Event()
    core = client.CoreV1Api(kube_api)

    def run() -> None:
        while not stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(core.list_namespaced_pod, namespace, timeout_seconds=5):
                    pod = event["object"]
                    statuses = {
                        s.name: client.ApiClient().sanitize_for_serialization(s.state)
                        for s in (pod.status.container_statuses or [])
                    }
                    deletion = pod.metadata.deletion_timestamp
                    meta = {
                        "_deleting": deletion is not None,
                        # When the grace ends: the deletion's request time plus the grace.
                        "_deletion_timestamp": deletion.timestamp() if deletion else None,
                    }
                    recorder.states.setdefault(pod.metadata.name, []).append({**statuses, **meta})
                    recorder.seen_at.setdefault(pod.metadata.name, []).append(time.monotonic())
                    if stop.is_set():
                        break
            except Exception:  # a watch cut by the API server: start another
                time.sleep(0.2)
            finally:
                w.stop()

    thread = threading.Thread(target=run, name=f"pod-recorder-{namespace}", daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        stop.set()
        thread.join(10)
