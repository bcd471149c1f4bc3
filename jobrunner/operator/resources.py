"""From custom resources to what a replica wants to serve.

A ScaledJob object becomes a ``Wanted``: the parsed ScaledJob (or why it cannot be used,
naming the field), whether it is paused, and its *essence* — everything whose change
needs a new dispatch unit (the trigger, the template, delivery, the referenced
TriggerAuthentication's version). Limits (``maxReplicaCount``, history limits) and KEDA
fields that mean nothing to a push dispatcher are outside the essence: they change live.

What a tenant's ScaledJob may use of the operator's own process (its environment
variables, the embedded queue's files, its cloud identity) is the ``Reach`` the operator
was started with: what asks for more than it gives is refused here, before anything is
built or read (``InvalidSpec``, no retry: only a new spec or new operator settings change
the answer), and again when the trigger is resolved.

Pause: KEDA's annotation ``autoscaling.keda.sh/paused`` (its rule: the value is read as
a Go bool, and a value that is not one counts as paused) or jobrunner's spelling
``jobrunner.dev/paused`` (same rule). For a KEDA object taken over by jobrunner, KEDA's
annotation pauses KEDA — which the takeover requires — so only jobrunner's pauses the
dispatcher there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobrunner.manifest.loader import parse_scaledjob, parse_trigger_authentication
from jobrunner.manifest.scaledjob import (
    KEDA_API_VERSION,
    ManifestError,
    ScaledJob,
    TriggerAuthentication,
)
from jobrunner.manifest.triggers import Reach, tenant_problems

Key = tuple[str, str]
"""(namespace, name) of a ScaledJob."""

KEDA_PAUSED = "autoscaling.keda.sh/paused"
PAUSED = "jobrunner.dev/paused"
TAKEOVER = "jobrunner.dev/takeover"
"""On a keda.sh ScaledJob: "true" asks jobrunner to serve it (with KEDA paused on it)."""

LIVE_FIELDS = frozenset(
    {
        "maxReplicaCount",
        "maxPendingAdmission",
        "inadmissibleTimeoutSeconds",
        "successfulJobsHistoryLimit",
        "failedJobsHistoryLimit",
        # KEDA's, meaningless to a push dispatcher: a change needs nothing.
        "pollingInterval",
        "minReplicaCount",
        "rollout",
        "rolloutStrategy",
        "scalingStrategy",
        "envSourceContainerName",
    }
)
"""Spec fields applied without replacing the unit."""

_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
_USER_METADATA = ("name", "namespace", "labels", "annotations", "uid", "generation")


def go_bool_paused(value: str | None) -> bool:
    """KEDA's reading of its paused annotation: absent is not paused; a Go bool is
    itself; anything else counts as paused."""
    return value is not None and value not in _GO_FALSE


def paused_by(annotations: Mapping[str, str], *, keda: bool = False) -> str | None:
    """The annotation that pauses an object with these annotations, None when none does
    (the module's rule; ``keda``: a keda.sh object taken over, where KEDA's annotation
    pauses KEDA only). Operator mode and file mode (jobrunner.filemode) both read it."""
    if go_bool_paused(annotations.get(PAUSED)):
        return PAUSED
    if not keda and go_bool_paused(annotations.get(KEDA_PAUSED)):
        return KEDA_PAUSED
    return None


@dataclass(frozen=True)
class Wanted:
    """One ScaledJob as this replica sees it, whatever its state."""

    key: Key
    generation: int
    uid: str
    keda: bool = False
    """A keda.sh ScaledJob taken over (no status written on it: KEDA owns its status)."""
    scaledjob: ScaledJob | None = None
    invalid: str | None = None
    """Why the object cannot be served (the fields named); None when it can."""
    paused: str | None = None
    """Which annotation pauses it; None when not paused."""
    essence: str = ""
    authentications: Mapping[str, TriggerAuthentication] = field(default_factory=dict)

    @property
    def runnable(self) -> bool:
        return self.scaledjob is not None and self.paused is None

    @property
    def triggers(self) -> str:
        spec = (self.scaledjob.spec.triggers if self.scaledjob else []) or []
        return ",".join(t.type for t in spec)


def bucket_of(key: Key, buckets: int) -> int:
    """The bucket of a ScaledJob: a stable hash of namespace/name (every replica, every
    Python process computes the same one)."""
    digest = hashlib.sha256(f"{key[0]}/{key[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def essence(scaledjob: ScaledJob, auth_versions: Mapping[str, str]) -> str:
    """A digest of what needs a new unit when it changes."""
    spec = scaledjob.spec.model_dump(mode="json", exclude=set(LIVE_FIELDS))
    text = json.dumps({"spec": spec, "auth": dict(sorted(auth_versions.items()))}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_authentication(obj: Mapping[str, Any]) -> TriggerAuthentication | str:
    """A TriggerAuthentication object from the cluster, or why it cannot be used (its
    fields named; the ScaledJob that refers to it then says so). A keda.sh object has
    no schema for its Secret names: this check is what keeps them names."""
    body = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata", "spec")}
    body.setdefault("spec", {})
    try:
        return parse_trigger_authentication(body, where="TriggerAuthentication")
    except ManifestError as exc:
        return _one_line(str(exc), "TriggerAuthentication")


def wanted_from(
    obj: Mapping[str, Any],
    *,
    keda: bool = False,
    authentications: Mapping[str, Mapping[str, Any]] | None = None,
    reach: Reach | None = None,
) -> Wanted:
    """What ``obj`` (a ScaledJob object read from the API server) asks for.
    ``authentications``: the TriggerAuthentication objects of its namespace, by name;
    ``reach``: what the operator lets tenants use of its own process (default: nothing,
    ``Reach()``)."""
    meta = obj.get("metadata") or {}
    key = (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
    annotations = meta.get("annotations") or {}
    generation = int(meta.get("generation") or 0)
    uid = str(meta.get("uid") or "")

    def make(**fields: Any) -> Wanted:
        return Wanted(key=key, generation=generation, uid=uid, keda=keda, **fields)

    paused = paused_by(annotations, keda=keda)
    where = f"ScaledJob {key[0]}/{key[1]}"
    try:
        scaledjob = parse_scaledjob(_user_body(obj, keda=keda), where=where)
    except ManifestError as exc:
        return make(invalid=_one_line(str(exc), where), paused=paused)
    try:
        refs = _authentication_refs(scaledjob)
        found, versions = _referenced_authentications(
            refs, authentications or {}, namespace=key[0], keda=keda
        )
        _refuse_for_tenants(scaledjob, found, reach if reach is not None else Reach())
    except _Invalid as exc:
        return make(invalid=str(exc), paused=paused)
    return make(
        scaledjob=scaledjob,
        paused=paused,
        essence=essence(scaledjob, versions),
        authentications=found,
    )


class _Invalid(Exception):
    """A ScaledJob the operator cannot serve; the text is its condition's message."""


def _user_body(obj: Mapping[str, Any], *, keda: bool) -> dict[str, Any]:
    """Only what the user wrote: a status write (resourceVersion, managedFields) must not
    make the object look changed."""
    meta = obj.get("metadata") or {}
    body = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "spec")}
    body["metadata"] = {k: v for k, v in meta.items() if k in _USER_METADATA}
    if keda:
        body["apiVersion"] = KEDA_API_VERSION
    return body


def _authentication_refs(scaledjob: ScaledJob) -> set[str]:
    """The TriggerAuthentications the triggers and the function's output destinations
    (resolved like triggers) name; _Invalid for a ClusterTriggerAuthentication."""
    function = scaledjob.spec.function
    destinations = [
        *(
            (f"spec.triggers[{i}]", t.authenticationRef)
            for i, t in enumerate(scaledjob.spec.triggers)
        ),
        *(
            (f"spec.function.outputs[{i}]", o.authenticationRef)
            for i, o in enumerate(function.outputs if function is not None else [])
        ),
    ]
    for path, ref in destinations:
        if ref is not None and ref.kind == "ClusterTriggerAuthentication":
            raise _Invalid(
                f"field {path}.authenticationRef.kind: "
                "ClusterTriggerAuthentication is not supported by the operator; use a "
                "TriggerAuthentication in the ScaledJob's namespace"
            )
    return {ref.name for _, ref in destinations if ref is not None}


def _referenced_authentications(
    refs: set[str],
    authentications: Mapping[str, Mapping[str, Any]],
    *,
    namespace: str,
    keda: bool,
) -> tuple[dict[str, TriggerAuthentication], dict[str, str]]:
    """The TriggerAuthentications named, parsed, and their resourceVersions (a change
    replaces the unit); _Invalid for one missing or unusable."""
    found: dict[str, TriggerAuthentication] = {}
    versions: dict[str, str] = {}
    for name in sorted(refs):
        raw = authentications.get(name)
        auth = parse_authentication(raw) if raw is not None else None
        if not isinstance(auth, TriggerAuthentication):
            kind = "keda.sh" if keda else "jobrunner.dev"
            what = f"TriggerAuthentication {name!r} ({kind})"
            problem = (
                f"{what} not found in namespace {namespace}; create it"
                if auth is None
                else f"{what} in namespace {namespace} cannot be used: {auth}"
            )
            raise _Invalid(f"field spec.triggers[].authenticationRef.name: {problem}")
        found[name] = auth
        versions[name] = str((raw or {}).get("metadata", {}).get("resourceVersion", ""))
    return found, versions


def _refuse_for_tenants(
    scaledjob: ScaledJob, found: Mapping[str, TriggerAuthentication], reach: Reach
) -> None:
    """_Invalid when the ScaledJob asks for more of the operator's process than ``reach``
    lets tenants use."""
    refused = tenant_problems(scaledjob, found, reach)
    if refused:
        raise _Invalid("; ".join(f"field {p.field}: {p.text}" for p in refused))


def _one_line(text: str, where: str) -> str:
    """A ManifestError's text as a condition message: its lines joined, the object's
    name (which the condition's object says already) dropped."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith(where):
        head = lines[0][len(where) :].lstrip(": ")
        lines = lines[1:] if head in ("invalid manifest", "invalid trigger") else [head, *lines[1:]]
    return "; ".join(lines)


def takeover_requested(obj: Mapping[str, Any]) -> bool:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(TAKEOVER, "")).lower() == "true"


def keda_paused(obj: Mapping[str, Any]) -> bool:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return go_bool_paused(annotations.get(KEDA_PAUSED))
