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
import re
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
(``WorkloadInadmissible``, apis/kueue/v1beta2/workload_types.go); jobrunner ends a Job
for it only when the queue is missing (see ``never_admitted_text``)."""
REASON_SECRET_NOT_SENT = "MultiKueueSecret"
"""jobrunner's reason when a Job MultiKueue dispatches needs its message Secret in its
pod: the worker cluster will never have it, so the pod could never start there."""
REASON_NEVER_FITS = "NeverFits"
"""jobrunner's reason when Kueue says no flavor of the ClusterQueue can ever hold the
Job (requests above what it could ever lend, a resource it does not cover, ...)."""
REASON_NO_WORKLOAD = "NoWorkload"
"""jobrunner's reason when Kueue made no Workload for a queued, suspended Job: Kueue then
says why only in its own log (a WorkloadPriorityClass the Job names that does not exist,
``kueue.x-k8s.io/priority-class``), and would hold the Job for ever."""
REASON_DEACTIVATED = "Deactivated"
"""Kueue's reason when a Workload was deactivated (``spec.active: false``, set by a person
or by Kueue once ``waitForPodsReady``'s requeuing limit is exceeded): it is not admitted
again until someone activates it."""
NOT_ADMITTED_REASONS = frozenset(
    {
        REASON_INADMISSIBLE,
        REASON_NEVER_FITS,
        REASON_DEACTIVATED,
        REASON_NO_WORKLOAD,
        REASON_SECRET_NOT_SENT,
    }
)
"""The only reasons the annotation may give: anything else reads as ``JobDeleted``."""

# What Kueue v0.17 says of a Workload that only a change to the queues can admit: a
# LocalQueue or ClusterQueue that does not exist (pkg/controller/core/workload_controller.go;
# "stopped" and "inactive" are an administrator's pause or a queue being set up, and
# wait), and, for a flavor (pkg/scheduler/flavorassigner/flavorassigner.go), requests above
# what the ClusterQueue and its cohort could ever lend, a resource it does not cover, a
# flavor that does not exist, a taint it does not tolerate, a node affinity it cannot meet.
_QUEUE_MISSING = ("doesn't exist",)
_FLAVOR_NEVER = (
    "> maximum capacity",
    "unavailable in ClusterQueue",
    "not found",
    "untolerated taint",
    "doesn't match node affinity",
)
# ...and anything that says the Workload could fit once something frees up (quota in use,
# a topology domain in use, a workload ahead of it). A message with one of these waits,
# whatever else it says; a message with neither kind waits too (a Kueue that words things
# differently must never make waiting Jobs look hopeless).
_FITS_LATER = (
    "insufficient unused quota",
    "topology",
    "allows to fit",
    "no longer fits",
    "Waiting",
)
_UID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def never_admitted_text(reason: str, message: str) -> str | None:
    """jobrunner's reason for a ``QuotaReserved=False`` Workload that only a change to
    the queues can admit (``Inadmissible``, ``NeverFits``), None while it may be admitted
    as it is. See the phrase tables above for the source of each rule."""
    if reason == REASON_INADMISSIBLE:
        return REASON_INADMISSIBLE if any(p in message for p in _QUEUE_MISSING) else None
    if reason != "Pending" or not message.startswith("couldn't assign flavors"):
        return None
    if any(p in message for p in _FITS_LATER):
        return None
    return REASON_NEVER_FITS if any(p in message for p in _FLAVOR_NEVER) else None


def without_uids(text: str) -> str:
    """``text`` with every UUID replaced (Kueue's preemption messages name the preemptor's
    Workload and Job by uid, which may be another tenant's)."""
    return _UID_TEXT.sub("<uid>", text)


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


@dataclass(frozen=True)
class WorkloadView:
    """What jobrunner reads of a Kueue Workload: its conditions by type, whether it is
    active, and which Job controls it."""

    name: str
    conditions: Mapping[str, Condition]
    active: bool = True
    """``spec.active``: False once deactivated (by a person, or Kueue's requeuing limit)."""
    owner_uid: str = ""
    """The uid of its controller owner (the Job it stands for)."""

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
                )
        meta = obj.get("metadata") or {}
        owners = [o for o in meta.get("ownerReferences") or [] if isinstance(o, dict)]
        controller = next((o for o in owners if o.get("controller")), {})
        return cls(
            name=str(meta.get("name", "")),
            conditions=conditions,
            active=(obj.get("spec") or {}).get("active") is not False,
            owner_uid=str(controller.get("uid", "")),
        )

    def never_admitted(self) -> tuple[str, str] | None:
        """(jobrunner's reason, Kueue's message) when Kueue says this Workload cannot be
        admitted until the queues change (``never_admitted_text``) or it was deactivated
        (``spec.active: false``, Kueue's requeuing limit: ``Deactivated``); None while it
        can be (waiting for quota is waiting, however long)."""
        if not self.active:
            evicted = self.conditions.get("Evicted")
            return REASON_DEACTIVATED, evicted.message if evicted else "spec.active is false"
        reserved = self.conditions.get("QuotaReserved")
        if reserved is None or reserved.status != "False":
            return None
        reason = never_admitted_text(reserved.reason, reserved.message)
        return (reason, reserved.message) if reason else None

    def eviction(self) -> str | None:
        """Kueue's reason for the last eviction (``Evicted`` condition: ``Preempted``,
        ``PodsReadyTimeout``, ``AdmissionCheck``, ``Deactivated``...), if any; its message
        is not kept (it names the preemptor, possibly another tenant's)."""
        c = self.conditions.get("Evicted")
        if c is None or not c.reason.isidentifier():
            return None
        return c.reason
