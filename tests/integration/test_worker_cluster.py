"""The local stack's second cluster, the MultiKueue worker: a Job runs there on its own KWOK
node as on the first cluster, and an outage of its API server alone (the stack's restart
script) loses nothing and leaves the first cluster untouched."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.helpers import wait_until
from tests.integration.worker import (
    WORKER_TIMEOUT,
    answers,
    restart_worker_apiserver,
    stack_pid,
    worker_node,
)

pytestmark = [pytest.mark.kube, pytest.mark.worker]

RUN_DURATION = "30s"
"""How long the restart test's pod runs (KWOK's stage): long enough to restart the worker's
API server (about 13 s) before the Job ends."""


def make_job(name: str, *, run_duration: str | None = None) -> client.V1Job:
    annotations = {"kwok.jobrunner.dev/run-duration": run_duration} if run_duration else {}
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(annotations=annotations),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[client.V1Container(name="work", image="busybox:1.36")],
                ),
            ),
        ),
    )


def true_conditions(batch: client.BatchV1Api, namespace: str, name: str) -> dict[str, str]:
    job = batch.read_namespaced_job(name, namespace)
    return {c.type: c.reason for c in (job.status.conditions or []) if c.status == "True"}


def test_job_on_worker_runs_on_its_kwok_node_and_completes(
    worker_api: client.ApiClient, worker_namespace: str
) -> None:
    batch, core = client.BatchV1Api(worker_api), client.CoreV1Api(worker_api)
    batch.create_namespaced_job(worker_namespace, make_job("completes"))

    reached = wait_until(
        lambda: true_conditions(batch, worker_namespace, "completes").get("Complete"),
        timeout=WORKER_TIMEOUT,
    )

    assert reached == "CompletionsReached"
    pods = core.list_namespaced_pod(worker_namespace, label_selector="job-name=completes").items
    assert [(p.spec.node_name, p.status.phase) for p in pods] == [(worker_node(), "Succeeded")]


def test_worker_apiserver_restart_keeps_the_running_job_and_spares_the_first_cluster(
    worker_api: client.ApiClient, worker_namespace: str
) -> None:
    batch, core = client.BatchV1Api(worker_api), client.CoreV1Api(worker_api)
    created = batch.create_namespaced_job(
        worker_namespace, make_job("outlives", run_duration=RUN_DURATION)
    )
    wait_until(
        lambda: [
            p
            for p in core.list_namespaced_pod(
                worker_namespace, label_selector="job-name=outlives"
            ).items
            if p.status.phase == "Running"
        ],
        timeout=WORKER_TIMEOUT,
    )
    worker_before, first_before = stack_pid("worker-kube-apiserver"), stack_pid("kube-apiserver")

    restart_worker_apiserver()

    assert answers(worker_api)
    assert stack_pid("worker-kube-apiserver") != worker_before
    assert stack_pid("kube-apiserver") == first_before
    job = batch.read_namespaced_job("outlives", worker_namespace)
    assert job.metadata.uid == created.metadata.uid
    assert "Complete" not in true_conditions(batch, worker_namespace, "outlives")
    reached = wait_until(
        lambda: true_conditions(batch, worker_namespace, "outlives").get("Complete"),
        timeout=WORKER_TIMEOUT,
    )
    assert reached == "CompletionsReached"
