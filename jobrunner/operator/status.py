"""What a ScaledJob's ``status`` says, and Kubernetes Events about it.

Conditions have metav1.Condition's shape (``type``, ``status``, ``observedGeneration``,
``lastTransitionTime``, ``reason``, ``message``), with KEDA's three types:

* ``Ready``: True when the dispatcher consumes and its Job watch is in sync (reason
  ``DispatcherReady``), or when the ScaledJob is valid and paused (``ScaledJobPaused``);
  False with ``InvalidSpec`` (the message names the field), ``Starting`` (a state, not
  a problem: no ``lastError``), ``SourceUnavailable`` (the source's words, which are
  jobrunner's), ``JobWatchNotSynced``, ``DispatcherFailed`` or ``JobsRejected`` (the API
  server refused ``REJECTED_NOT_READY`` Jobs in a row: its status, reason and fields);
  Unknown when no replica serves it (``unserved_status``): ``NoOperator`` (the CRD's
  default, and what a replica that stops cleanly writes) or ``OwnerGone`` (its replica
  stopped renewing its Lease; written by the survivors until one takes it over).
* ``Active``: True while Jobs of it run (``JobsActive``; counted from the Job watch
  when no dispatcher runs, e.g. paused), else ``NoJobsActive``; Unknown with ``Ready``.
* ``Paused``: ``ScaledJobPaused`` / ``ScaledJobUnpaused`` (KEDA's reasons), naming the
  annotation.

Besides: ``observedGeneration``, ``activeJobs``, ``lastMessageTime``, ``lastError``
(the most recent problem and when; kept after recovery, ``Ready`` says the present),
``triggersTypes`` (as KEDA's, for the printer column) and ``owner`` (the replica serving
it). A status is written only when it differs from what the object shows; the counters
(``activeJobs``, ``lastMessageTime``) at most every ``volatile_interval`` seconds, so a
busy ScaledJob costs one write per interval and an idle one none.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from jobrunner.core.protocols import ApiRejected, TransientError
from jobrunner.core.redaction import redact
from jobrunner.core.timestamps import now_rfc3339
from jobrunner.operator import api
from jobrunner.operator.api import ObjectClient
from jobrunner.operator.registry import Phase, Slot
from jobrunner.operator.resources import Key, Wanted
from jobrunner.runner import STARTING, DispatchUnit

logger = logging.getLogger(__name__)

VOLATILE = ("activeJobs", "lastMessageTime")
REJECTED_NOT_READY = 3
"""Job creates refused in a row (with none accepted in between) after which a consuming
ScaledJob is ``Ready=False JobsRejected``: one refusal may be a message's own (its
rendered name, a value from its body); three in a row is the template or the namespace
(an admission policy, a quota, RBAC)."""
RECORDED_MAX = 256
"""Events kept in memory by ``EventRecorder.recorded`` (the newest; for tests and
debugging): a replica serving thousands of ScaledJobs for months must not grow with
every Event it writes."""


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    kind: str,
    status: str,
    reason: str,
    message: str,
    *,
    generation: int,
    previous: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    before = previous.get(kind) or {}
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    return {
        "type": kind,
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": since or now_rfc3339(),
        "reason": reason,
        # The net under jobrunner.core.redaction's rule: no credential in what a tenant reads.
        "message": redact(message)[:32768],
    }


def rejection_summary(rejection: ApiRejected) -> str:
    """An API server's refusal of a Job in jobrunner's words: its status, reason and the
    fields it names (``details.causes``), never its free text (SECURITY.md: a server's
    answer is not copied into status or Events)."""
    fields = ", ".join(f"{field} ({why})" for field, why in rejection.causes)
    return f"{rejection.status} {rejection.reason}" + (f": {fields}" if fields else "")


def rejected_problem(unit: Any) -> str | None:
    """Why a consuming unit is not Ready although it consumes: the API server refused
    its last ``REJECTED_NOT_READY`` or more Job creates; None otherwise."""
    lifecycle = unit.dispatcher.lifecycle
    count = int(getattr(lifecycle, "rejected_in_row", 0) or 0)
    rejection = getattr(lifecycle, "last_rejection", None)
    if count < REJECTED_NOT_READY or not isinstance(rejection, ApiRejected):
        return None
    # No count here: the condition (and lastError) must not change with every refusal;
    # the JobsRejected Events count them.
    return (
        f"the API server refuses this ScaledJob's Jobs ({rejection_summary(rejection)}; "
        f"{REJECTED_NOT_READY} or more in a row) and their messages are dead-lettered: fix "
        "the Job template"
    )


def desired_status(
    wanted: Wanted,
    slot: Slot | None,
    *,
    current: Mapping[str, Any],
    owner: str,
    active_jobs: int | None = None,
) -> dict[str, Any]:
    """The status ``wanted`` should show, given its slot here and the status it shows
    now (``current``: transition times are kept when a condition's status is unchanged,
    ``lastError`` and ``lastMessageTime`` are carried over). ``active_jobs``: its Jobs
    not finished, counted from the Job watch, for when no dispatcher runs (paused,
    failing): running Jobs go on then, and the status says so."""
    previous = {c.get("type", ""): c for c in current.get("conditions") or []}
    generation = slot.observed if slot is not None and slot.observed else wanted.generation
    unit = slot.unit if slot is not None else None
    ready, problem = _ready(slot)
    active = len(unit.dispatcher.limiter) if unit is not None else active_jobs
    spec_max = wanted.scaledjob.spec.maxReplicaCount if wanted.scaledjob else 0
    active_c = _active(active, spec_max)
    paused_c = _paused(wanted)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [
            _condition(k, *v, generation=generation, previous=previous)
            for k, v in (("Ready", ready), ("Active", active_c), ("Paused", paused_c))
        ],
        "triggersTypes": wanted.triggers or None,
        "owner": owner,
        "activeJobs": active,
        "lastMessageTime": current.get("lastMessageTime"),
        "lastError": current.get("lastError"),
    }
    counts = unit.dispatcher.admission.counts() if unit is not None else None
    if counts is not None:
        status["admission"] = dataclasses.asdict(counts)
    if unit is not None and unit.dispatcher.last_message_at is not None:
        status["lastMessageTime"] = _rfc3339(unit.dispatcher.last_message_at)
    if problem and (current.get("lastError") or {}).get("message") != problem:
        status["lastError"] = {"message": redact(problem)[:4096], "time": now_rfc3339()}
    return status


Condition = tuple[str, str, str]
"""A condition's (status, reason, message)."""


def _ready(slot: Slot | None) -> tuple[Condition, str | None]:
    """The Ready condition for what the slot holds, and the problem to keep as
    ``lastError`` (None: nothing to report; a state such as starting is no problem)."""
    unit = slot.unit if slot is not None else None
    phase = slot.phase if slot is not None else Phase.STARTING
    problem = slot.problem if slot is not None else None
    if phase is Phase.INVALID:
        return ("False", "InvalidSpec", problem or ""), problem
    if phase is Phase.FAILED:
        return (
            "False",
            (slot.reason if slot else "") or "DispatcherFailed",
            problem or "",
        ), problem
    if phase is Phase.PAUSED:
        return ("True", "ScaledJobPaused", "valid; paused, so no messages are consumed"), problem
    if unit is not None and phase is Phase.RUNNING:
        return _running_ready(unit, problem)
    return ("False", "Starting", "starting the dispatcher"), problem


def _running_ready(unit: DispatchUnit, problem: str | None) -> tuple[Condition, str | None]:
    """Ready of a running unit: consuming, its Jobs refused, starting, its Job watch not
    synced yet, or its source unavailable."""
    why = unit.readiness()
    rejected = rejected_problem(unit) if why is None else None
    if rejected is not None:
        return ("False", "JobsRejected", rejected), rejected
    if why is None:
        where = f"{unit.kind.destination} {unit.destination}"
        return ("True", "DispatcherReady", f"consuming from {where}"), None
    if unit.problem == STARTING:
        # A state, not a problem: lastError keeps the last real one (a restart of the
        # operator must not overwrite it with "starting").
        where = f"{unit.kind.destination} {unit.destination}"
        return ("False", "Starting", f"connecting to {where}"), problem
    if not unit.tracker.synced.is_set() and unit.problem is None:
        return ("False", "JobWatchNotSynced", why), problem
    return ("False", "SourceUnavailable", why), why


def _active(active: int | None, spec_max: int) -> Condition:
    if active:
        return ("True", "JobsActive", f"{active} Job(s) active of at most {spec_max}")
    return ("False", "NoJobsActive", "no Job of this ScaledJob is active")


def _paused(wanted: Wanted) -> Condition:
    if wanted.paused:
        return ("True", "ScaledJobPaused", f"paused by the annotation {wanted.paused}")
    return ("False", "ScaledJobUnpaused", "not paused")


def unserved_status(current: Mapping[str, Any], *, reason: str, message: str) -> dict[str, Any]:
    """The status of a ScaledJob that no replica serves now, from what it shows
    (``current``): ``Ready`` and ``Active`` Unknown with ``reason`` (nobody consumes
    or counts its Jobs now), ``Paused`` and ``lastError`` kept, no ``owner`` and no
    ``activeJobs`` — rather than the last owner's ``Ready=True``, which would outlive it.
    Written by a replica that stops cleanly (``NoOperator``) and by the survivors that
    see an owner stop renewing its Lease (``OwnerGone``)."""
    previous = {c.get("type", ""): c for c in current.get("conditions") or []}
    generation = int(current.get("observedGeneration") or 0)
    kept = [c for c in current.get("conditions") or [] if c.get("type") not in ("Ready", "Active")]
    conditions = [
        _condition("Ready", "Unknown", reason, message, generation=generation, previous=previous),
        _condition(
            "Active",
            "Unknown",
            reason,
            "no replica counts its Jobs now; running Jobs go on",
            generation=generation,
            previous=previous,
        ),
        *kept,
    ]
    return {
        "observedGeneration": current.get("observedGeneration"),
        "conditions": conditions,
        "triggersTypes": current.get("triggersTypes"),
        "owner": None,
        "activeJobs": None,
        "lastMessageTime": current.get("lastMessageTime"),
        "lastError": current.get("lastError"),
    }


def _comparable(status: Mapping[str, Any], *, volatile: bool) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if v is not None}
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"}
        for c in status.get("conditions") or []
    ]
    if not volatile:
        for name in VOLATILE:
            out.pop(name, None)
    return out


class StatusWriter:
    """Writes ScaledJob status through the ``/status`` subresource, only on change."""

    def __init__(
        self,
        api_client: ObjectClient,
        *,
        volatile_interval: float = 10.0,
        clock: Any = time.monotonic,
    ) -> None:
        self._api = api_client
        self._volatile_interval = volatile_interval
        self._clock = clock
        self._written_at: dict[Key, float] = {}
        self._last: dict[Key, dict[str, Any]] = {}
        self._version: dict[Key, int] = {}
        """The object's resourceVersion our last write made."""
        self.writes = 0

    def forget(self, key: Key) -> None:
        self._written_at.pop(key, None)
        self._last.pop(key, None)
        self._version.pop(key, None)

    def retain(self, keys: Iterable[Key]) -> None:
        """Forget every ScaledJob but ``keys`` (those still served or reported here), so
        what is remembered stays as large as what is served, however many come and go."""
        keep = set(keys)
        for key in [k for k in self._last if k not in keep]:
            self.forget(key)
        for key in [k for k in self._written_at if k not in keep]:
            self._written_at.pop(key, None)
        for key in [k for k in self._version if k not in keep]:
            self._version.pop(key, None)

    async def sync(
        self,
        wanted: Wanted,
        status: dict[str, Any],
        current: Mapping[str, Any],
        *,
        version: int = 0,
    ) -> bool:
        """Write ``status`` when it differs from ``current`` (the object's, at
        resourceVersion ``version``), or from what we wrote last when the object seen is
        not newer than our write (a watch lagging behind it). A newer object counts: a
        status another replica wrote meanwhile (``OwnerGone``, ``NoOperator``) is
        written over when it is not what this replica has to say. True when written."""
        key = wanted.key
        last = self._last.get(key)
        seen = last if last is not None and version <= self._version.get(key, 0) else current
        if _comparable(status, volatile=False) == _comparable(seen, volatile=False):
            if _comparable(status, volatile=True) == _comparable(seen, volatile=True):
                return False
            since = self._clock() - self._written_at.get(key, float("-inf"))
            if since < self._volatile_interval:
                return False
        logger.debug(
            "status of %s/%s: writing %s",
            *key,
            sorted(
                k
                for k in set(status) | set(seen)
                if _comparable(status, volatile=True).get(k)
                != _comparable(seen, volatile=True).get(k)
            ),
        )
        path = api.item(api.scaledjobs(key[0]), key[1], "status", what="ScaledJob name")
        # Fields we no longer report are removed (None is a merge patch's null).
        patch: dict[str, Any] = {"status": dict(status)}
        if wanted.uid:  # a precondition: never write on a namesake created meanwhile
            patch["metadata"] = {"uid": wanted.uid}
        try:
            written = await self._api.patch(path, patch)
        except ApiRejected as exc:
            if exc.status in (404, 409, 422):
                self.forget(key)
                return False  # deleted (or recreated) meanwhile
            raise
        self.writes += 1
        try:
            self._version[key] = int((written.get("metadata") or {}).get("resourceVersion") or 0)
        except (ValueError, AttributeError):
            self._version[key] = 0
        self._written_at[key] = self._clock()
        self._last[key] = {k: v for k, v in status.items() if v is not None}
        return True


class EventRecorder:
    """Kubernetes Events on ScaledJobs (core/v1, as ``kubectl describe`` shows them).
    Best effort: an Event that cannot be written is logged, never in the way. Messages
    are redacted (jobrunner.core.redaction) and cut to 1024 characters; ``recorded`` keeps the
    newest ``RECORDED_MAX`` (key, type, reason, message), for tests and debugging."""

    def __init__(
        self, api_client: ObjectClient, *, instance: str, keep: int = RECORDED_MAX
    ) -> None:
        self._api = api_client
        self._instance = instance
        self.recorded: collections.deque[tuple[Key, str, str, str]] = collections.deque(maxlen=keep)

    async def record(self, wanted: Wanted, kind: str, reason: str, message: str) -> None:
        namespace, name = wanted.key
        now = now_rfc3339()
        message = redact(message)[:1024]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{api.KEDA_GROUP}/{api.KEDA_VERSION}"
                if wanted.keda
                else f"{api.GROUP}/{api.VERSION}",
                "kind": "ScaledJob",
                "name": name,
                "namespace": namespace,
                **({"uid": wanted.uid} if wanted.uid else {}),
            },
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": "jobrunner-operator"},
            "reportingComponent": "jobrunner.dev/operator",
            "reportingInstance": self._instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.recorded.append((wanted.key, kind, reason, message))
        try:
            await self._api.create(api.events(namespace), event)
        except (ApiRejected, TransientError) as exc:
            logger.info(
                "could not record %s event on ScaledJob %s/%s: %s", reason, *wanted.key, exc
            )
