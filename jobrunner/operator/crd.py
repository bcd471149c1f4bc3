"""The CustomResourceDefinitions of operator mode, generated from the pydantic models
that load the same objects from manifest files (``config.ScaledJobSpec``,
``config.TriggerAuthenticationSpec``) and from the status model below, so the API
server and ``jobrunner run -f`` can never disagree on a field. ``deploy/crds/generate.py``
writes them to ``deploy/crds/`` and into the Helm chart; a test fails when the files
differ from what this module renders.

Structural, and small: the schema validates jobrunner's own fields (types, enums, bounds,
patterns, and with a CEL rule that exactly one of ``jobTargetRef``/``jobTemplate`` is
given) but keeps ``jobTargetRef`` as an object whose unknown fields are preserved —
jobrunner checks the Job template against the API server's own batch/v1 schema when it
builds the dispatcher, and says so in ``Ready``. The whole ScaledJob CRD stays a few KB,
so a client-side ``kubectl apply`` works (KEDA's, with the full PodSpec inlined, is about
667 KB and needs ``--server-side``).
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from jobrunner.manifest.scaledjob import ScaledJobSpec, TriggerAuthenticationSpec
from jobrunner.operator.api import GROUP, VERSION

PRESERVED = {"jobTargetRef", "rollout", "scalingStrategy"}
"""Fields kept as free-form objects (jobrunner checks jobTargetRef itself)."""


class Condition(BaseModel):
    """metav1.Condition."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    type: str = Field(max_length=316)
    """Ready, Active or Paused."""
    status: Literal["True", "False", "Unknown"]
    observedGeneration: int | None = Field(default=None, ge=0)
    """The .metadata.generation the condition was set from."""
    lastTransitionTime: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    """When the status last changed (always written by the operator; absent only in
    the ``NoOperator`` condition the API server fills in for a ScaledJob no replica
    has written)."""
    reason: str = Field(
        max_length=1024, min_length=1, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    """CamelCase: why (e.g. InvalidSpec, SourceUnavailable, DispatcherReady)."""
    message: str = Field(max_length=32768)
    """For a person: for InvalidSpec, the fields at fault."""


class LastError(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)
    message: str
    time: str = Field(json_schema_extra={"format": "date-time"})


class AdmissionStatus(BaseModel):
    """Of ``activeJobs``, those Kueue manages (``kueue.x-k8s.io/queue-name``)."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")
    pending: int
    """Waiting for admission (suspended): not admitted yet, or evicted and requeued."""
    admitted: int
    """Admitted by Kueue, no pod started yet."""
    running: int
    """Admitted and started."""
    evicted: int
    """Kueue evictions of its Jobs (those still kept by the history limits)."""


class ScaledJobStatus(BaseModel):
    """What the operator reports. Written by the replica serving the ScaledJob."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")
    observedGeneration: int | None = None
    """The generation the dispatcher serves (limits applied live, or the unit replaced)."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Active and Paused (KEDA's condition types), as metav1.Conditions."""
    activeJobs: int | None = None
    """Jobs holding a maxReplicaCount slot now."""
    admission: AdmissionStatus | None = None
    """Jobs queued by Kueue, by stage (only once the ScaledJob has had one)."""
    lastMessageTime: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    """When the last message arrived."""
    lastError: LastError | None = None
    """The most recent problem, kept after recovery (Ready tells the present)."""
    triggersTypes: str | None = None
    """The trigger types, comma-separated (as KEDA's, for the printer column)."""
    owner: str | None = None
    """The operator replica serving this ScaledJob."""


NO_OPERATOR = "NoOperator"
UNCLAIMED = {
    "type": "Ready",
    "status": "Unknown",
    "reason": NO_OPERATOR,
    "message": "no jobrunner operator serves this ScaledJob: none watches its namespace or "
    "matches its labels, or none is running (see the operator's --watch-namespace and -l)",
}
"""The Ready condition the API server shows until a replica writes one."""


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema as a Kubernetes structural schema: references inlined,
    Optional as ``nullable``, bounds in OpenAPI 3.0 form, titles and defaults dropped
    (pydantic applies the defaults; the stored object stays as the user wrote it)."""
    return _convert(schema, schema.get("$defs", {}), "")


_KEPT = (
    "description",
    "type",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "format",
)
"""The keywords a structural schema takes as pydantic writes them."""


def _convert(node: dict[str, Any], defs: dict[str, Any], name: str) -> dict[str, Any]:
    """One node of the schema (``name``: where it is, for errors), its references
    looked up in ``defs``."""
    if "$ref" in node:
        target = _convert(defs[node["$ref"].rsplit("/", 1)[-1]], defs, name)
        return {**target, **_keep(node, ("description",))}
    if node.get("anyOf") is not None:
        return _nullable(node, defs, name)
    out: dict[str, Any] = _keep(node, _KEPT)
    _bounds(node, out)
    if node.get("type") == "array":
        out["items"] = _convert(node.get("items") or {}, defs, f"{name}[]")
    if node.get("type") == "object" or "properties" in node:
        _object(node, out, defs, name)
    if "type" not in out and "enum" not in out:
        raise ValueError(f"{name}: no type")
    return out


def _nullable(node: dict[str, Any], defs: dict[str, Any], name: str) -> dict[str, Any]:
    """An ``anyOf`` of one type and null (pydantic's Optional) as that type, nullable."""
    kinds = [n for n in node["anyOf"] if n.get("type") != "null"]
    if len(kinds) != 1:
        raise ValueError(f"{name}: a union jobrunner cannot express structurally")
    inner = _convert(kinds[0], defs, name)
    inner.update(_keep(node, ("description",)))
    inner["nullable"] = True
    return inner


def _bounds(node: dict[str, Any], out: dict[str, Any]) -> None:
    """``const`` as a one-value enum, exclusive bounds in OpenAPI 3.0 form (a number and
    a flag), into ``out``."""
    if "const" in node:
        out["enum"] = [node["const"]]
        out.setdefault("type", "string")
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True


def _object(node: dict[str, Any], out: dict[str, Any], defs: dict[str, Any], name: str) -> None:
    """An object into ``out``: its properties (those in ``PRESERVED`` kept as they are),
    a map's values, or unknown fields preserved."""
    out["type"] = "object"
    props = node.get("properties")
    if props:
        out["properties"] = {
            key: (_preserved(value) if key in PRESERVED else _convert(value, defs, f"{name}.{key}"))
            for key, value in props.items()
        }
        if node.get("required"):
            out["required"] = list(node["required"])
        if node.get("additionalProperties") not in (None, False):
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"], defs, name)
    else:
        out["x-kubernetes-preserve-unknown-fields"] = True


def _keep(node: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = {k: node[k] for k in keys if k in node}
    if "description" in out:
        out["description"] = _text(out["description"])
    return out


def _text(docstring: str) -> str:
    """A docstring as one line of plain text (``kubectl explain`` wraps it)."""
    return " ".join(docstring.replace("``", "`").split())


def _preserved(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    description = node.get("description") or next(
        (n.get("description") for n in node.get("anyOf", []) if n.get("description")), None
    )
    if description:
        out["description"] = _text(description)
    if "anyOf" in node:
        out["nullable"] = True
    return out


def _crd(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    spec_schema: dict[str, Any],
    status_schema: dict[str, Any] | None,
    columns: list[dict[str, Any]],
    description: str,
) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": spec_schema,
    }
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": description,
                "required": ["spec"],
                "properties": properties,
            }
        },
    }
    if status_schema is not None:
        properties["status"] = status_schema
        version["subresources"] = {"status": {}}
    if columns:
        version["additionalPrinterColumns"] = columns
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "jobrunner"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["jobrunner"],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


def _condition_column(name: str, kind: str, priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{kind}")].status',
    }
    if priority:
        column["priority"] = priority
    return column


def scaledjob_crd() -> dict[str, Any]:
    spec = structural(ScaledJobSpec.model_json_schema())
    spec["description"] = (
        "KEDA's ScaledJob fields (those with no meaning for a push dispatcher are accepted "
        "and ignored) and jobrunner's own; the same object `jobrunner run -f` loads."
    )
    spec["x-kubernetes-validations"] = [
        {
            "rule": "has(self.jobTargetRef) != has(self.jobTemplate)",
            "message": "give exactly one of spec.jobTargetRef (the Job template inline) or "
            "spec.jobTemplate (a template file)",
            "fieldPath": ".jobTargetRef",
        }
    ]
    status = structural(ScaledJobStatus.model_json_schema())
    # A ScaledJob no replica serves (none watches its namespace, none matches its labels,
    # none runs) would show every column blank: the API server fills in Ready=Unknown
    # NoOperator instead, on every read of an object whose status has no conditions
    # (structural defaulting, applied when reading from etcd). The operator replaces the
    # list when it writes; removing it (a clean stop) brings the default back.
    status["default"] = {}
    status["properties"]["conditions"]["default"] = [UNCLAIMED]
    columns = [
        {"name": "Max", "type": "integer", "jsonPath": ".spec.maxReplicaCount"},
        {"name": "Active", "type": "integer", "jsonPath": ".status.activeJobs"},
        _condition_column("Ready", "Ready"),
        _condition_column("Paused", "Paused"),
        {"name": "Triggers", "type": "string", "jsonPath": ".status.triggersTypes"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {
            "name": "Reason",
            "type": "string",
            "priority": 1,
            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        },
        {"name": "Owner", "type": "string", "priority": 1, "jsonPath": ".status.owner"},
    ]
    return _crd(
        kind="ScaledJob",
        plural="scaledjobs",
        short_names=["jsj"],
        spec_schema=spec,
        status_schema=status,
        columns=columns,
        description="A ScaledJob served by jobrunner: each message of its trigger becomes one "
        "Job rendered from jobTargetRef.",
    )


def trigger_authentication_crd() -> dict[str, Any]:
    spec = structural(TriggerAuthenticationSpec.model_json_schema())
    spec["description"] = (
        "KEDA's TriggerAuthentication: parameters from Secrets of the same namespace "
        "(secretTargetRef), or from variables of the operator's environment (env) that "
        "its owner allow-lists (tenantEnvAllowList). Other KEDA fields are kept; "
        "podIdentity is honoured or refused by the SQS and Azure triggers."
    )
    return _crd(
        kind="TriggerAuthentication",
        plural="triggerauthentications",
        short_names=["jta"],
        spec_schema=spec,
        status_schema=None,
        columns=[{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
        description="Credentials for the triggers of ScaledJobs in the same namespace.",
    )


HEADER = (
    "# Generated by deploy/crds/generate.py from jobrunner's pydantic models "
    "(jobrunner/operator/crd.py); do not edit.\n"
)


def render() -> dict[str, str]:
    """File name -> YAML text of each CRD."""
    out = {}
    for crd in (scaledjob_crd(), trigger_authentication_crd()):
        text = yaml.safe_dump(crd, sort_keys=False, width=100)
        # Each file opens its document with `---`: `helm show crds` concatenates the
        # chart's crds/ files as they are, and without it `kubectl apply -f -` would read
        # one document with every key twice (the last CRD winning).
        out[f"{crd['metadata']['name']}.yaml"] = HEADER + "---\n" + text
    return out
