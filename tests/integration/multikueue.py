"""MultiKueue on the local stack: the first cluster is the manager, the second (the
`worker` part, deploy/local/worker-cluster.sh) its one worker.

The stack makes what every test shares, on the manager: the AdmissionCheck
(JOBRUNNER_TEST_MULTIKUEUE_ADMISSION_CHECK, controller ``kueue.x-k8s.io/multikueue``), its
MultiKueueConfig and the MultiKueueCluster with the worker's kubeconfig Secret. A test
makes its own queues on both sides with ``MultiKueue.queues``: MultiKueue copies a
Workload to the worker into the namespace of the same name, through the LocalQueue of the
same name, so both must exist there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests import services
from tests.helpers import wait_until
from tests.integration.kueue import GROUP, VERSION, Kueue
from tests.integration.worker import WORKER_TIMEOUT, wait_for_default_service_account

MANAGED_BY = "kueue.x-k8s.io/multikueue"
"""What Kueue's Job webhook sets as ``spec.managedBy`` of a Job whose ClusterQueue has a
MultiKueue AdmissionCheck (jobframework.ApplyDefaultForManagedBy): the manager's Job
controller then leaves it to MultiKueue."""
PREBUILT_WORKLOAD_LABEL = "kueue.x-k8s.io/prebuilt-workload-name"
"""The label of the mirror Job on the worker, naming the Workload MultiKueue copied there."""
QUEUE_READY_TIMEOUT = WORKER_TIMEOUT


def active(kueue: Kueue, plural: str, name: str) -> bool:
    """The cluster-scoped Kueue object's ``Active`` condition is True."""
    found = kueue.custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
    return any(
        c["type"] == "Active" and c["status"] == "True"
        for c in found.get("status", {}).get("conditions", [])
    )


@dataclass
class MultiKueue:
    """Queues on the manager and their counterparts on the worker, deleted by ``cleanup``."""

    manager: Kueue
    worker: Kueue
    admission_check: str
    worker_namespaces: list[str] = field(default_factory=list)

    def queues(self, namespace: str, *, cpu: str = "4", memory: str = "4Gi") -> str:
        """A LocalQueue in ``namespace`` on the manager whose ClusterQueue dispatches by
        MultiKueue, and on the worker the same namespace with a LocalQueue of the same
        name and a ClusterQueue of this quota; both ClusterQueues Active. Returns the
        LocalQueue's name (a Job's ``kueue.x-k8s.io/queue-name``)."""
        name = f"mk-{uuid.uuid4().hex[:8]}"
        self._worker_namespace(namespace)
        self.worker.cluster_queue(name, cpu=cpu, memory=memory)
        self.worker.local_queue(namespace, name, cluster_queue=name)
        self.manager.cluster_queue(
            name, cpu=cpu, memory=memory, admission_checks=[self.admission_check]
        )
        self.manager.local_queue(namespace, name, cluster_queue=name)
        # Active on the manager means Kueue's cache knows the AdmissionCheck, so its Job
        # webhook sets managedBy from the first Job on.
        for side in (self.worker, self.manager):
            wait_until(
                lambda kueue=side: active(kueue, "clusterqueues", name),
                timeout=QUEUE_READY_TIMEOUT,
            )
        return name

    def _worker_namespace(self, namespace: str) -> None:
        core = client.CoreV1Api(self.worker.api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        self.worker_namespaces.append(namespace)
        wait_for_default_service_account(core, namespace)

    def mirror(self, namespace: str, name: str) -> client.V1Job | None:
        """The worker's copy of the manager's Job ``name``, or None."""
        try:
            found: client.V1Job = client.BatchV1Api(self.worker.api).read_namespaced_job(
                name, namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def cleanup(self) -> None:
        for kueue in (self.manager, self.worker):
            kueue.cleanup()
        core = client.CoreV1Api(self.worker.api)
        for namespace in self.worker_namespaces:
            core.delete_namespace(namespace, propagation_policy="Background")


@pytest.fixture
def multikueue(kube_api: client.ApiClient, worker_api: client.ApiClient) -> Iterator[MultiKueue]:
    """MultiKueue between the stack's two clusters; skipped (failed with CI=true) when the
    stack has no Kueue on both."""
    services.stack_service("Kueue", "JOBRUNNER_TEST_KUEUE_HEALTH_URL")
    services.stack_service("the worker's Kueue", "JOBRUNNER_TEST_WORKER_KUEUE_HEALTH_URL")
    flavor = services.setting("JOBRUNNER_TEST_KUEUE_FLAVOR")
    check = services.setting("JOBRUNNER_TEST_MULTIKUEUE_ADMISSION_CHECK")
    if not flavor or not check:
        services.missing(
            "MultiKueue",
            "JOBRUNNER_TEST_KUEUE_FLAVOR or JOBRUNNER_TEST_MULTIKUEUE_ADMISSION_CHECK is unset",
        )
    helper = MultiKueue(
        manager=Kueue(api=kube_api, flavor=str(flavor)),
        worker=Kueue(api=worker_api, flavor=str(flavor)),
        admission_check=str(check),
    )
    if not active(helper.manager, "admissionchecks", helper.admission_check):
        services.missing("MultiKueue", f"AdmissionCheck {check} is not Active on the manager")
    try:
        yield helper
    finally:
        helper.cleanup()


def true_conditions(job: client.V1Job) -> dict[str, str]:
    return {c.type: c.reason for c in (job.status.conditions or []) if c.status == "True"}


def job_spec_summary(job: client.V1Job) -> dict[str, Any]:
    """What a test asserts of a Job's place in MultiKueue."""
    return {
        "managedBy": job.spec.managed_by,
        "suspend": job.spec.suspend,
        "prebuilt": (job.metadata.labels or {}).get(PREBUILT_WORKLOAD_LABEL),
    }
