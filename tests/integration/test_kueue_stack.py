"""Proof that the stack's Kueue (deploy/local/kueue.sh) is the real thing on the real API
server: its webhook suspends a Job that names a LocalQueue, its scheduler admits Jobs up
to the ClusterQueue's quota and holds the rest as Pending until quota frees, and a Job
without the queue-name label never meets it (the webhooks' objectSelector)."""

from __future__ import annotations

import datetime
import uuid

from kubernetes import client

from tests.helpers import wait_until
from tests.integration.kueue import PRIORITY_CLASS_LABEL, QUEUE_NAME_LABEL, Kueue, conditions
from tests.integration.test_stack_smoke import wait_for_default_service_account

RUN_DURATION = "kwok.jobrunner.dev/run-duration"
"""KWOK keeps a Job's pod Running this long (deploy/local/kwok/job-pod-stages.yaml)."""

ADMISSION_TIMEOUT = 60
FINISH_TIMEOUT = 120


def make_job(
    name: str, *, queue: str | None, run_for: str, priority: str | None = None
) -> client.V1Job:
    """A one-pod Job asking for 1 CPU (Kueue counts requests), created unsuspended."""
    labels = {QUEUE_NAME_LABEL: queue} if queue else {}
    if priority:
        labels[PRIORITY_CLASS_LABEL] = priority
    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
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


def complete(batch: client.BatchV1Api, job: client.V1Job) -> client.V1Job | None:
    current = batch.read_namespaced_job(job.metadata.name, job.metadata.namespace)
    done = any(c.type == "Complete" and c.status == "True" for c in current.status.conditions or [])
    return current if done else None


def admitted(kueue: Kueue, batch: client.BatchV1Api, job: client.V1Job) -> client.V1Job | None:
    """The Job once Kueue admitted its Workload and unsuspended it."""
    if conditions(kueue.workload_of(job)).get("Admitted", ("",))[0] != "True":
        return None
    current = batch.read_namespaced_job(job.metadata.name, job.metadata.namespace)
    return current if current.spec.suspend is False else None


def transition_time(kueue: Kueue, job: client.V1Job, kind: str) -> datetime.datetime:
    workload = kueue.workload_of(job)
    assert workload is not None
    (found,) = [c for c in workload["status"]["conditions"] if c["type"] == kind]
    return datetime.datetime.fromisoformat(found["lastTransitionTime"].replace("Z", "+00:00"))


def test_quota_for_one_admits_one_job_and_holds_the_next_pending_until_it_finishes(
    kube_api: client.ApiClient, namespace: str, kueue: Kueue
) -> None:
    batch = client.BatchV1Api(kube_api)
    wait_for_default_service_account(client.CoreV1Api(kube_api), namespace)
    suffix = uuid.uuid4().hex[:8]
    kueue.cluster_queue(f"cq-{suffix}", cpu="1", memory="1Gi")
    kueue.local_queue(namespace, f"lq-{suffix}", cluster_queue=f"cq-{suffix}")

    # Created with suspend: false; Kueue's mutating webhook answers suspend: true.
    first = batch.create_namespaced_job(
        namespace, make_job("first", queue=f"lq-{suffix}", run_for="30s")
    )
    assert first.spec.suspend is True
    running = wait_until(lambda: admitted(kueue, batch, first), timeout=ADMISSION_TIMEOUT)
    # The flavor's node label, injected at admission: the pod goes to the KWOK node.
    assert running.spec.template.spec.node_selector == {"type": "kwok"}

    second = batch.create_namespaced_job(
        namespace, make_job("second", queue=f"lq-{suffix}", run_for="0s")
    )
    assert second.spec.suspend is True
    pending = wait_until(
        lambda: conditions(kueue.workload_of(second)).get("QuotaReserved"),
        timeout=ADMISSION_TIMEOUT,
    )
    assert pending == ("False", "Pending")
    assert complete(batch, first) is None, "the first Job finished before the check"
    assert batch.read_namespaced_job("second", namespace).spec.suspend is True

    finished = wait_until(lambda: complete(batch, first), timeout=FINISH_TIMEOUT)
    wait_until(lambda: admitted(kueue, batch, second), timeout=ADMISSION_TIMEOUT)
    # Admitted only once the first had finished (times are to the second).
    assert transition_time(kueue, second, "Admitted") >= finished.status.completion_time
    wait_until(lambda: complete(batch, second), timeout=FINISH_TIMEOUT)
    wait_until(
        lambda: conditions(kueue.workload_of(second)).get("Finished", ("",))[0] == "True",
        timeout=ADMISSION_TIMEOUT,
    )


def test_higher_priority_job_preempts_a_running_lower_priority_one(
    kube_api: client.ApiClient, namespace: str, kueue: Kueue
) -> None:
    batch = client.BatchV1Api(kube_api)
    wait_for_default_service_account(client.CoreV1Api(kube_api), namespace)
    suffix = uuid.uuid4().hex[:8]
    kueue.cluster_queue(f"cq-{suffix}", cpu="1", memory="1Gi")
    kueue.local_queue(namespace, f"lq-{suffix}", cluster_queue=f"cq-{suffix}")
    kueue.priority_class(f"low-{suffix}", value=10)
    kueue.priority_class(f"high-{suffix}", value=1000)

    low = batch.create_namespaced_job(
        namespace, make_job("low", queue=f"lq-{suffix}", run_for="600s", priority=f"low-{suffix}")
    )
    wait_until(lambda: admitted(kueue, batch, low), timeout=ADMISSION_TIMEOUT)
    high = batch.create_namespaced_job(
        namespace, make_job("high", queue=f"lq-{suffix}", run_for="0s", priority=f"high-{suffix}")
    )

    evicted = wait_until(
        lambda: conditions(kueue.workload_of(low)).get("Evicted"), timeout=ADMISSION_TIMEOUT
    )
    assert evicted == ("True", "Preempted")
    # Preemption suspends the Job again (its pod is deleted) and requeues its Workload;
    # it cannot be admitted again before the higher one has finished.
    wait_until(
        lambda: batch.read_namespaced_job("low", namespace).spec.suspend is True,
        timeout=ADMISSION_TIMEOUT,
    )
    wait_until(lambda: admitted(kueue, batch, high), timeout=ADMISSION_TIMEOUT)
    wait_until(lambda: complete(batch, high), timeout=FINISH_TIMEOUT)


def test_job_without_queue_name_is_not_touched_by_kueue(
    kube_api: client.ApiClient, namespace: str, kueue: Kueue
) -> None:
    batch = client.BatchV1Api(kube_api)
    wait_for_default_service_account(client.CoreV1Api(kube_api), namespace)
    job = batch.create_namespaced_job(namespace, make_job("plain", queue=None, run_for="0s"))
    assert job.spec.suspend is False
    done = wait_until(lambda: complete(batch, job), timeout=FINISH_TIMEOUT)
    assert done.spec.suspend is False
    assert kueue.workload_of(job) is None
    assert not done.spec.template.spec.node_selector


def test_kueue_webhooks_call_localhost_and_see_only_labelled_jobs(
    kube_api: client.ApiClient, kueue: Kueue
) -> None:
    # What keeps the rest of the suite clear of Kueue, even while Kueue is down.
    admission = client.AdmissionregistrationV1Api(kube_api)
    configs = [
        admission.read_mutating_webhook_configuration("kueue-mutating-webhook-configuration"),
        admission.read_validating_webhook_configuration("kueue-validating-webhook-configuration"),
    ]
    webhooks = [w for config in configs for w in config.webhooks]
    job_webhooks = [w for w in webhooks if any("jobs" in r.resources for r in w.rules)]
    assert {w.name for w in job_webhooks} == {"mjob.kb.io", "vjob.kb.io"}
    for webhook in job_webhooks:
        (requirement,) = webhook.object_selector.match_expressions
        assert (requirement.key, requirement.operator) == (QUEUE_NAME_LABEL, "Exists")
    for webhook in webhooks:
        assert webhook.client_config.url.startswith("https://127.0.0.1:")
        assert webhook.client_config.service is None
    groups = {g for w in webhooks for r in w.rules for g in r.api_groups}
    assert groups == {"batch", "kueue.x-k8s.io"}
