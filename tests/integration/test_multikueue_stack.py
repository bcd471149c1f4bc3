"""MultiKueue across the stack's two clusters: a Job created on the manager (the first
cluster) with a MultiKueue-backed LocalQueue runs on the worker (a mirror Job there, on the
worker's KWOK node) and its status comes back to the manager's Job; an outage of the
worker's API server mid-run neither loses the Job nor ends it twice."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.helpers import wait_until
from tests.integration.kueue import QUEUE_NAME_LABEL
from tests.integration.multikueue import (
    MANAGED_BY,
    MultiKueue,
    job_spec_summary,
    true_conditions,
)
from tests.integration.test_stack_smoke import wait_for_default_service_account
from tests.integration.worker import WORKER_TIMEOUT, restart_worker_apiserver, worker_node

pytestmark = [pytest.mark.kube, pytest.mark.worker]

RUN_DURATION = "kwok.jobrunner.dev/run-duration"
DISPATCH_TIMEOUT = WORKER_TIMEOUT
"""Seconds from creation on the manager to the mirror Job on the worker (admission on the
manager, the Workload copied, admission on the worker), after a restart of the worker's API
server included (see WORKER_TIMEOUT)."""
FINISH_TIMEOUT = WORKER_TIMEOUT
"""Seconds for the Job to end on the manager once it runs on the worker (MultiKueue
reconnects to a restarted worker after 5 s, then 10 s, ...)."""


def make_job(name: str, *, queue: str, run_for: str) -> client.V1Job:
    """A one-pod Job asking for 1 CPU, created unsuspended: Kueue's webhook suspends it
    and hands it to MultiKueue (spec.managedBy)."""
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name, labels={QUEUE_NAME_LABEL: queue}),
        spec=client.V1JobSpec(
            suspend=False,
            backoff_limit=0,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(annotations={RUN_DURATION: run_for}),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[
                        client.V1Container(
                            name="work",
                            image="busybox:1.36",
                            resources=client.V1ResourceRequirements(
                                requests={"cpu": "1", "memory": "64Mi"}
                            ),
                        )
                    ],
                ),
            ),
        ),
    )


def finished(batch: client.BatchV1Api, namespace: str, name: str) -> client.V1Job | None:
    job = batch.read_namespaced_job(name, namespace)
    ended = true_conditions(job).keys() & {"Complete", "Failed"}
    return job if ended else None


def running_pods(api: client.ApiClient, namespace: str, name: str) -> list[client.V1Pod]:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={name}")
    return [p for p in pods.items if p.status.phase == "Running"]


def test_manager_job_runs_on_the_worker_and_its_completion_comes_back(
    kube_api: client.ApiClient, namespace: str, multikueue: MultiKueue
) -> None:
    batch = client.BatchV1Api(kube_api)
    wait_for_default_service_account(client.CoreV1Api(kube_api), namespace)
    queue = multikueue.queues(namespace)

    created = batch.create_namespaced_job(namespace, make_job("remote", queue=queue, run_for="3s"))

    assert job_spec_summary(created) == {"managedBy": MANAGED_BY, "suspend": True, "prebuilt": None}
    mirror = wait_until(lambda: multikueue.mirror(namespace, "remote"), timeout=DISPATCH_TIMEOUT)
    summary = job_spec_summary(mirror)
    assert summary["managedBy"] is None  # the worker's Job controller runs it
    assert summary["prebuilt"], "the mirror names the Workload MultiKueue copied"
    worker_pods = wait_until(
        lambda: (
            client.CoreV1Api(multikueue.worker.api)
            .list_namespaced_pod(namespace, label_selector="job-name=remote")
            .items
        ),
        timeout=DISPATCH_TIMEOUT,
    )
    assert [p.spec.node_name for p in worker_pods] == [worker_node()]
    done = wait_until(lambda: finished(batch, namespace, "remote"), timeout=FINISH_TIMEOUT)
    assert true_conditions(done).get("Complete") == "CompletionsReached"
    assert done.status.succeeded == 1
    # The manager's Job controller made no pod: the Job ran on the worker alone.
    assert client.CoreV1Api(kube_api).list_namespaced_pod(namespace).items == []


def test_worker_apiserver_restart_mid_run_still_ends_the_manager_job_once(
    kube_api: client.ApiClient, namespace: str, multikueue: MultiKueue
) -> None:
    batch = client.BatchV1Api(kube_api)
    wait_for_default_service_account(client.CoreV1Api(kube_api), namespace)
    queue = multikueue.queues(namespace)
    batch.create_namespaced_job(namespace, make_job("outage", queue=queue, run_for="30s"))
    mirror = wait_until(lambda: multikueue.mirror(namespace, "outage"), timeout=DISPATCH_TIMEOUT)
    wait_until(
        lambda: running_pods(multikueue.worker.api, namespace, "outage"), timeout=DISPATCH_TIMEOUT
    )

    restart_worker_apiserver()

    assert finished(batch, namespace, "outage") is None, "ended before the outage was over"
    done = wait_until(lambda: finished(batch, namespace, "outage"), timeout=FINISH_TIMEOUT)
    assert true_conditions(done).get("Complete") == "CompletionsReached"
    assert "Failed" not in true_conditions(done)
    assert (done.status.succeeded, done.status.failed or 0) == (1, 0)
    # One mirror, never made again: still the same Job if MultiKueue has not removed it yet.
    again = multikueue.mirror(namespace, "outage")
    assert again is None or again.metadata.uid == mirror.metadata.uid
