"""Kueue's admission, as jobrunner reads it: which Jobs are queued, whether a queued Job
is admitted, and when Kueue says a Workload can never be admitted.

Kueue (sigs.k8s.io/kueue) manages a batch/v1 Job that carries the label
``kueue.x-k8s.io/queue-name`` (the LocalQueue of its namespace): its mutating webhook
creates the Job with ``spec.suspend: true``; admission (quota reserved in the
LocalQueue's ClusterQueue, admission checks passed) sets ``spec.suspend: false``; an
eviction (preemption, a lost admission check, ``waitForPodsReady``) deletes the pods and
suspends the Job again, and requeues its Workload. So for a queued Job, ``spec.suspend``
*is* its admission state, visible in the Job watch jobrunner already has; the Workload
(one per Job, labelled ``kueue.x-k8s.io/job-uid``) is read only for Kueue's reasons.

Pure values and rules; imports nothing but the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LABEL_QUEUE_NAME = "kueue.x-k8s.io/queue-name"
"""The LocalQueue a Job is submitted to (Kueue's documented label)."""
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
"""The WorkloadPriorityClass of a Job (Kueue's documented label)."""
KUEUE_JOB_LABELS = (LABEL_QUEUE_NAME, LABEL_PRIORITY_CLASS)
"""The Kueue labels jobrunner copies from a pod template to its Job, as KEDA copies every
pod-template label to the Jobs of a ScaledJob (KEDA writes them there)."""
LABEL_WORKLOAD_JOB_UID = "kueue.x-k8s.io/job-uid"
"""The label Kueue puts on a Job's Workload: the Job's uid."""

MANAGED_BY_MULTIKUEUE = "kueue.x-k8s.io/multikueue"
"""``spec.managedBy`` of a Job Kueue dispatches to a worker cluster: its webhook sets it
when the LocalQueue's ClusterQueue has a MultiKueue AdmissionCheck
(jobframework.ApplyDefaultForManagedBy). MultiKueue copies the Job (metadata labels and
annotations, spec) to the worker that admits it, and its status back; nothing else of
the namespace (no Secret) goes with it."""

ANNOTATION_NOT_ADMITTED = "jobrunner.dev/not-admitted"
"""Written on a queued Job that jobrunner ends because Kueue can never admit it, just
before deleting it: JSON ``{"reason": ..., "detail": ...}``. The Job (held by jobrunner's
finalizer) then reads as failed for that reason, durably, whichever dispatcher settles
its message (see ``tracking.tracker.outcome_of``)."""

ANNOTATION_EVICTIONS = "jobrunner.dev/evictions"
"""How many times Kueue evicted the Job (a count jobrunner keeps on it, so status and a
later dispatcher see it)."""


def evictions_of(job: Mapping[str, Any]) -> int:
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_EVICTIONS, "")
    return int(raw) if isinstance(raw, str) and raw.isdigit() and len(raw) < 7 else 0


REASON_INADMISSIBLE = "Inadmissible"
"""Kueue's reason when the LocalQueue or ClusterQueue is missing, stopped or inactive
(``WorkloadInadmissible``, apis/kueue/v1beta2/workload_types.go)."""
REASON_SECRET_NOT_SENT = "MultiKueueSecret"
"""jobrunner's reason when a Job MultiKueue dispatches needs its message Secret in its
pod: the worker cluster will never have it, so the pod could never start there."""
REASON_NEVER_FITS = "NeverFits"
"""jobrunner's reason when Kueue says no flavor of the ClusterQueue can ever hold the
Job's requests (its message has no "insufficient unused quota", only limits)."""
NOT_ADMITTED_REASONS = frozenset({REASON_INADMISSIBLE, REASON_NEVER_FITS, REASON_SECRET_NOT_SENT})
"""The only reasons the annotation may give: anything else reads as ``JobDeleted``."""

# Kueue's scheduler words a flavor that could fit once quota frees up as "insufficient
# unused quota for <resource> in flavor <f>, <n> more needed"; every other reason it gives
# for a flavor (request > maximum capacity, flavor not found, untolerated taint, node
# affinity, a resource the ClusterQueue does not cover) holds until an administrator
# changes the queue (pkg/scheduler/flavorassigner/flavorassigner.go, v0.17).
_CAN_FIT_LATER = "insufficient unused quota"


def is_queued(job: Mapping[str, Any]) -> bool:
    """True when Kueue manages the Job (it names a LocalQueue)."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(LABEL_QUEUE_NAME))


def is_suspended(job: Mapping[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


def dispatched_by_multikueue(job: Mapping[str, Any]) -> bool:
    return (job.get("spec") or {}).get("managedBy") == MANAGED_BY_MULTIKUEUE


def pod_uses_secret(job: Mapping[str, Any], secret: str) -> bool:
    """True when the Job's pod template names Secret ``secret`` anywhere (a volume's
    ``secretName``, a projected source, ``secretKeyRef`` or ``secretRef``)."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    stack: list[Any] = [pod]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("secretName") == secret:
                return True
            for key in ("secretKeyRef", "secretRef", "secret"):
                ref = node.get(key)
                if isinstance(ref, dict) and ref.get("name") == secret:
                    return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def not_admitted_outcome(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) from ``ANNOTATION_NOT_ADMITTED``, or None when absent or not one
    of ``NOT_ADMITTED_REASONS`` (a Job's annotations are writable by its namespace's
    users; a forged reason only names another failure of their own Job)."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(ANNOTATION_NOT_ADMITTED)
    if not raw:
        return None
    try:
        told = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(told, dict) or told.get("reason") not in NOT_ADMITTED_REASONS:
        return None
    return str(told["reason"]), str(told.get("detail", ""))[:4000]


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str = ""
    message: str = ""
    since: str = ""
    """``lastTransitionTime`` (RFC 3339)."""


@dataclass(frozen=True)
class WorkloadView:
    """What jobrunner reads of a Kueue Workload: its name and conditions by type."""

    name: str
    conditions: Mapping[str, Condition]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> WorkloadView:
        conditions = {}
        for c in (obj.get("status") or {}).get("conditions") or []:
            if isinstance(c, dict) and c.get("type"):
                conditions[str(c["type"])] = Condition(
                    type=str(c["type"]),
                    status=str(c.get("status", "")),
                    reason=str(c.get("reason") or ""),
                    message=str(c.get("message") or ""),
                    since=str(c.get("lastTransitionTime") or ""),
                )
        return cls(name=str((obj.get("metadata") or {}).get("name", "")), conditions=conditions)

    @property
    def admitted(self) -> bool:
        c = self.conditions.get("Admitted")
        return c is not None and c.status == "True"

    def never_admitted(self) -> tuple[str, str, str] | None:
        """(reason, Kueue's message, since when) when Kueue says this Workload cannot be
        admitted until the queues change; None while it can (waiting for quota is
        waiting, however long)."""
        reserved = self.conditions.get("QuotaReserved")
        if reserved is None or reserved.status != "False":
            return None
        if reserved.reason == REASON_INADMISSIBLE:
            return REASON_INADMISSIBLE, reserved.message, reserved.since
        flavors = reserved.message.startswith("couldn't assign flavors")
        if reserved.reason == "Pending" and flavors and _CAN_FIT_LATER not in reserved.message:
            return REASON_NEVER_FITS, reserved.message, reserved.since
        return None

    def eviction(self) -> tuple[str, str] | None:
        """(reason, message) of the last eviction (``Evicted`` condition), if any:
        ``Preempted``, ``PodsReadyTimeout``, ``AdmissionCheck``, ``Deactivated``..."""
        c = self.conditions.get("Evicted")
        if c is None:
            return None
        return c.reason, c.message
