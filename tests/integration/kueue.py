"""Kueue objects for tests on the local stack (deploy/local/kueue.sh runs Kueue there).

Tests make their own ClusterQueues, LocalQueues and WorkloadPriorityClasses through
CustomObjectsApi, named per test so tests run in any order, and delete them with
``Kueue.cleanup()`` (a fixture's finalizer). The stack's ResourceFlavor for the KWOK node
is named by JOBRUNNER_TEST_KUEUE_FLAVOR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
"""Kueue labels each Workload with the uid of the Job it stands for
(pkg/controller/constants.JobUIDLabel)."""


@dataclass
class Kueue:
    """Creates Kueue objects and remembers them, so ``cleanup`` deletes each once."""

    api: client.ApiClient
    flavor: str
    created: list[tuple[str, str | None, str]] = field(default_factory=list)
    """(plural, namespace or None for cluster-scoped, name), in creation order."""

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def cluster_queue(
        self,
        name: str,
        *,
        cpu: str,
        memory: str,
        cohort: str | None = None,
    ) -> dict[str, Any]:
        """A ClusterQueue with a nominal quota of ``cpu`` and ``memory`` on the stack's
        flavor, for Workloads from any namespace; a pending Workload may preempt lower
        priority ones in the same queue."""
        spec: dict[str, Any] = {
            "namespaceSelector": {},
            "queueingStrategy": "BestEffortFIFO",
            "resourceGroups": [
                {
                    "coveredResources": ["cpu", "memory"],
                    "flavors": [
                        {
                            "name": self.flavor,
                            "resources": [
                                {"name": "cpu", "nominalQuota": cpu},
                                {"name": "memory", "nominalQuota": memory},
                            ],
                        }
                    ],
                }
            ],
            "preemption": {"withinClusterQueue": "LowerPriority"},
        }
        if cohort is not None:
            spec["cohortName"] = cohort
        return self._create("clusterqueues", None, name, "ClusterQueue", spec)

    def local_queue(self, namespace: str, name: str, *, cluster_queue: str) -> dict[str, Any]:
        """A LocalQueue (what a Job's ``kueue.x-k8s.io/queue-name`` label names)."""
        spec = {"clusterQueue": cluster_queue}
        return self._create("localqueues", namespace, name, "LocalQueue", spec)

    def priority_class(self, name: str, *, value: int, description: str = "") -> dict[str, Any]:
        """A WorkloadPriorityClass (named by a Job's ``kueue.x-k8s.io/priority-class``)."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": name},
            "value": value,
            "description": description,
        }
        created: dict[str, Any] = self.custom.create_cluster_custom_object(
            GROUP, VERSION, "workloadpriorityclasses", body
        )
        self.created.append(("workloadpriorityclasses", None, name))
        return created

    def _create(
        self, plural: str, namespace: str | None, name: str, kind: str, spec: dict[str, Any]
    ) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
        created: dict[str, Any]
        if namespace is None:
            created = self.custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
        else:
            created = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, body
            )
        self.created.append((plural, namespace, name))
        return created

    def cleanup(self) -> None:
        """Deletes what this helper created, newest first (LocalQueues before their
        ClusterQueue); what is already gone is skipped."""
        while self.created:
            plural, namespace, name = self.created.pop()
            try:
                if namespace is None:
                    self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
                else:
                    self.custom.delete_namespaced_custom_object(
                        GROUP, VERSION, namespace, plural, name
                    )
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def workload_of(self, job: client.V1Job) -> dict[str, Any] | None:
        """The Workload Kueue made for ``job`` (found by its job-uid label), or None."""
        found = self.custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            job.metadata.namespace,
            "workloads",
            label_selector=f"{JOB_UID_LABEL}={job.metadata.uid}",
        )["items"]
        if len(found) > 1:
            raise AssertionError(f"{len(found)} Workloads for Job {job.metadata.name}")
        return found[0] if found else None


def conditions(workload: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """A Workload's conditions as type -> (status, reason); empty for None."""
    if workload is None:
        return {}
    return {
        c["type"]: (c["status"], c.get("reason", ""))
        for c in workload.get("status", {}).get("conditions", [])
    }
