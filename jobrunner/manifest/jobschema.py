"""The batch/v1 Job schema, as the API server publishes it, applied before a Job exists.

Three uses, one walker:

* ``check_template``: a Job template as written (``jobTargetRef`` or a template file),
  where any scalar may still be a Jinja2 expression. Unknown fields (with a
  did-you-mean), wrong types, values outside an enum, a list where an object belongs:
  ``validate`` and ``run`` refuse them at start, naming the field and its line.
* ``coerce``: a rendered Job. Text that a template produced lands in the type its field
  has (``"60"`` becomes 60 in an integer field, ``"true"`` a boolean, digits an
  int-or-string's integer), then the Job is checked strictly; a value that cannot land
  (``"1m"`` for seconds) is the message's ``TemplateError``, naming the field.
* ``check_object``: any Job, strictly, as the API server would (the local executor's
  422 at create).

Values no container can carry (a NUL byte in any string: it ends a C string in every
environment, argument and path) are refused everywhere, as is a label value the API
server would refuse.

The schema lives in ``schemas/batch-v1-job.json``, generated from a real API server's
``/openapi/v3/apis/batch/v1`` by ``deploy/local/gen-job-schema.py``; a test on the local
stack regenerates it and fails on any difference, so it cannot drift from the server the
project runs against. Formats and rules come from there; the label rule from
apimachinery's ``IsValidLabelValue``.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from jobrunner.core.limits import LABEL_VALUE_MAX, is_label_value

JOB = "io.k8s.api.batch.v1.Job"
JOB_SPEC = "io.k8s.api.batch.v1.JobSpec"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
JOB_RESTART_POLICIES = ("OnFailure", "Never")
"""The restart policies a Job's pod template may have (batch/v1 Job validation)."""

_TEMPLATE_MARKERS = ("{{", "{%", "{#")
_INTEGER = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# resource.Quantity's grammar (k8s.io/apimachinery/pkg/api/resource): a signed decimal
# number, then a binary-SI, decimal-SI or decimal-exponent suffix.
_QUANTITY = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?\d+)?")

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class SchemaProblem:
    """One way an object differs from the schema. ``path`` is relative to what was
    checked (``("template", "spec", "containers", 0, "comand")``)."""

    path: Path
    text: str

    def field(self, prefix: str = "") -> str:
        return field_path(self.path, prefix)


def field_path(path: Path, prefix: str = "") -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@cache
def _schema() -> dict[str, Any]:
    text = resources.files("jobrunner").joinpath("schemas/batch-v1-job.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _type(name: str) -> Mapping[str, Any]:
    found: Mapping[str, Any] = _schema()["types"][name]
    return found


def is_templated(value: Any) -> bool:
    return isinstance(value, str) and any(m in value for m in _TEMPLATE_MARKERS)


_EXPECTED = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "int-or-string": "an integer or a string",
    "quantity": "a quantity such as 500m, 2 or 1Gi",
    "array": "a list",
    "map": "a mapping",
    "object": "a mapping",
}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    return f"{type(value).__name__} {value!r}"


class _Walker:
    """Walks a value against a property; ``templates``: Jinja expressions stand for any
    scalar; ``coerce``: strings are converted to their field's type in place."""

    def __init__(self, *, templates: bool, coerce: bool) -> None:
        self.templates = templates
        self.coerce = coerce
        self.problems: list[SchemaProblem] = []

    def problem(self, path: Path, text: str) -> None:
        self.problems.append(SchemaProblem(path, text))

    def value(self, value: Any, prop: Mapping[str, Any], path: Path) -> Any:
        kind = prop.get("type", "any")
        if value is None:
            return value  # JSON null: the field is unset, as the API server reads it
        if kind == "any":
            self.no_nul(value, path)
            return value
        if self.templates and is_templated(value):
            if kind in ("array", "map", "object"):
                self.problem(
                    path,
                    f"expected {_EXPECTED[kind]}, got a template string: a template fills a "
                    "value, it cannot make a list or a mapping",
                )
            return value
        if kind == "object":
            if not isinstance(value, dict):
                self.problem(path, f"expected {_EXPECTED[kind]}, got {_describe(value)}")
                return value
            return self.object(value, prop["ref"], path)
        if kind == "array":
            if not isinstance(value, list):
                hint = " (write it as a YAML list: one `- item` per line)"
                self.problem(path, f"expected {_EXPECTED[kind]}, got {_describe(value)}{hint}")
                return value
            for i, item in enumerate(value):
                if item is None:
                    self.problem((*path, i), "expected a value, got null (remove the item)")
                    continue
                value[i] = self.value(item, prop["items"], (*path, i))
            return value
        if kind == "map":
            if not isinstance(value, dict):
                self.problem(path, f"expected {_EXPECTED[kind]}, got {_describe(value)}")
                return value
            for key in list(value):
                if value[key] is None:
                    self.problem((*path, key), "expected a value, got null")
                    continue
                value[key] = self.value(value[key], prop["values"], (*path, key))
            return value
        return self.scalar(value, prop, path)

    def scalar(self, value: Any, prop: Mapping[str, Any], path: Path) -> Any:
        kind = prop["type"]
        if isinstance(value, dict | list) or value is None:
            self.problem(path, f"expected {_EXPECTED.get(kind, kind)}, got {_describe(value)}")
            return value
        converted = _convert(value, kind) if self.coerce else value
        if not _fits(converted, kind):
            hint = ""
            if kind == "string":
                hint = "; quote it"
            elif kind in ("integer", "number") and isinstance(value, str):
                hint = " (seconds and counts are plain numbers: 60, not 1m)"
            self.problem(
                path, f"expected {_EXPECTED.get(kind, kind)}, got {_describe(value)}{hint}"
            )
            return value
        enum = prop.get("enum")
        if enum and converted not in enum:
            close = difflib.get_close_matches(str(converted), [str(e) for e in enum], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.problem(
                path, f"must be one of {', '.join(map(str, enum))}, got {converted!r}{hint}"
            )
        self.no_nul(converted, path)
        return converted

    def no_nul(self, value: Any, path: Path) -> None:
        for where, text in _strings(value, path):
            if "\x00" in text:
                self.problem(
                    where,
                    "contains a NUL byte, which no environment variable, argument or file "
                    "name can carry",
                )

    def object(self, value: dict[str, Any], type_name: str, path: Path) -> dict[str, Any]:
        spec = _type(type_name)
        properties: Mapping[str, Any] = spec.get("properties") or {}
        for key in list(value):
            prop = properties.get(key)
            if prop is None:
                self.problem((*path, key), _unknown_field(key, properties))
                continue
            value[key] = self.value(value[key], prop, (*path, key))
        for key in spec.get("required") or []:
            if value.get(key) is None:
                self.problem((*path, key), "required; add it")
        if type_name == OBJECT_META:
            self.labels(value.get("labels"), (*path, "labels"))
        if type_name == JOB_SPEC:
            self.job_pod_rules(value, path)
            self.job_field_rules(value, path)
        return value

    def known(self, value: Any) -> bool:
        """Whether a value is set and known now (not a Jinja2 expression to render)."""
        return value is not None and not (self.templates and is_templated(value))

    def job_field_rules(self, spec: dict[str, Any], path: Path) -> None:
        """The rules between a JobSpec's fields that the API server checks beyond its
        schema (k8s.io/api batch/v1 JobSpec validation rules, pkg/apis/batch/validation):
        Indexed needs completions; backoffLimitPerIndex, maxFailedIndexes and
        successPolicy need Indexed; with a podFailurePolicy the pods restart Never and
        are replaced only once Failed, a FailIndex rule needs backoffLimitPerIndex, and
        an onExitCodes containerName names a container of the pod."""
        self._completion_mode_rules(spec, path)
        policy = spec.get("podFailurePolicy")
        if isinstance(policy, dict):
            self._pod_failure_policy_rules(spec, policy, path)

    def _completion_mode_rules(self, spec: dict[str, Any], path: Path) -> None:
        """Indexed needs completions; the per-index fields need Indexed."""
        mode = spec.get("completionMode")
        indexed = mode == "Indexed"
        if indexed and spec.get("completions") is None:
            self.problem(
                (*path, "completions"),
                "required when completionMode is Indexed (the API server refuses an Indexed "
                "Job without it)",
            )
        if self.known(mode) and not indexed:
            for field in ("backoffLimitPerIndex", "maxFailedIndexes", "successPolicy"):
                if spec.get(field) is not None:
                    self.problem(
                        (*path, field),
                        "requires completionMode: Indexed, as the API server does",
                    )

    def _pod_failure_policy_rules(
        self, spec: dict[str, Any], policy: dict[str, Any], path: Path
    ) -> None:
        """With a podFailurePolicy: pods restart Never, are replaced once Failed, and
        each rule holds (``_failure_rule_rules``)."""
        template = spec.get("template")
        pod = template.get("spec") if isinstance(template, dict) else None
        pod = pod if isinstance(pod, dict) else {}
        restart = pod.get("restartPolicy")
        if self.known(restart) and restart != "Never":
            where = (*path, "template", "spec", "restartPolicy")
            if all(p.path != where for p in self.problems):
                self.problem(
                    where,
                    f"only Never is supported when podFailurePolicy is specified, got "
                    f"{restart!r} (as the API server says)",
                )
        replacement = spec.get("podReplacementPolicy")
        if self.known(replacement) and replacement != "Failed":
            self.problem(
                (*path, "podReplacementPolicy"),
                f"must be Failed when podFailurePolicy is used, got {replacement!r} (as the "
                "API server says); leave it out",
            )
        names = {
            c.get("name")
            for key in ("containers", "initContainers")
            for c in (pod.get(key) or [] if isinstance(pod.get(key), list) else [])
            if isinstance(c, dict)
        }
        rules = policy.get("rules")
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            if isinstance(rule, dict):
                self._failure_rule_rules(
                    rule, spec=spec, names=names, at=(*path, "podFailurePolicy", "rules", i)
                )

    def _failure_rule_rules(
        self, rule: dict[str, Any], *, spec: dict[str, Any], names: set[Any], at: Path
    ) -> None:
        """One podFailurePolicy rule: FailIndex needs backoffLimitPerIndex; onExitCodes
        or onPodConditions; a containerName of the pod's (``names``)."""
        if rule.get("action") == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            self.problem((*at, "action"), "FailIndex requires backoffLimitPerIndex to be set")
        if rule.get("onExitCodes") is not None and rule.get("onPodConditions") is not None:
            self.problem(at, "give onExitCodes or onPodConditions, not both")
        codes = rule.get("onExitCodes")
        wanted = codes.get("containerName") if isinstance(codes, dict) else None
        if self.known(wanted) and not any(is_templated(n) for n in names) and wanted not in names:
            self.problem(
                (*at, "onExitCodes", "containerName"),
                f"{wanted!r} is not a container of the pod template (it has "
                f"{', '.join(sorted(str(n) for n in names))})",
            )

    def job_pod_rules(self, spec: dict[str, Any], path: Path) -> None:
        """What the API server's Job validation adds to the PodSpec schema
        (k8s.io/kubernetes pkg/apis/batch/validation: a Job's pods restart ``OnFailure``
        or ``Never``; ``Always``, a PodSpec's default, is refused for a Job)."""
        template = spec.get("template")
        pod = template.get("spec") if isinstance(template, dict) else None
        policy = pod.get("restartPolicy") if isinstance(pod, dict) else None
        if not isinstance(policy, str) or (self.templates and is_templated(policy)):
            return
        where = (*path, "template", "spec", "restartPolicy")
        if policy not in JOB_RESTART_POLICIES and all(p.path != where for p in self.problems):
            self.problem(
                where,
                f"a Job's pods must have restartPolicy OnFailure or Never, got {policy!r} "
                "(the API server refuses Always for a Job); leave it out for Never",
            )

    def labels(self, labels: Any, path: Path) -> None:
        if not isinstance(labels, dict):
            return
        for key, text in labels.items():
            if not isinstance(text, str) or (self.templates and is_templated(text)):
                continue
            if not is_label_value(text):
                self.problem(
                    (*path, key),
                    f"{_describe(text)} is not a valid label value: at most "
                    f"{LABEL_VALUE_MAX} characters, letters, digits, '-', '_' or '.', "
                    "starting and ending with a letter or digit",
                )


def _unknown_field(key: str, properties: Mapping[str, Any]) -> str:
    # KEDA users sometimes put ScaledJob fields inside the JobSpec.
    scaledjob_fields = {
        "maxReplicaCount",
        "minReplicaCount",
        "pollingInterval",
        "successfulJobsHistoryLimit",
        "failedJobsHistoryLimit",
        "triggers",
        "scalingStrategy",
        "rollout",
        "rolloutStrategy",
        "envSourceContainerName",
        "messageDelivery",
        "ackPolicy",
        "deadLetter",
    }
    if key in scaledjob_fields and key not in properties:
        return (
            "unknown field here: it is a ScaledJob field; move it out of the Job template "
            "to the ScaledJob's spec"
        )
    close = difflib.get_close_matches(key, list(properties), n=1, cutoff=0.7)
    if close:
        return f"unknown field; did you mean {close[0]!r}?"
    return "unknown field; remove it (see `kubectl explain job.spec`)"


def _strings(value: Any, path: Path) -> Iterator[tuple[Path, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*path, i))


def _convert(value: Any, kind: str) -> Any:
    """``value`` in the type ``kind`` when it is text that spells one; else unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind == "integer" and _INTEGER.fullmatch(text):
        return int(text)
    if kind == "number" and _NUMBER.fullmatch(text):
        return float(text)
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind == "int-or-string" and _INTEGER.fullmatch(text):
        return int(text)
    return value


def _fits(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "int-or-string":
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    if kind == "quantity":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True
        return isinstance(value, str) and bool(_QUANTITY.fullmatch(value))
    return True


def check_template(spec: Any, type_name: str = JOB_SPEC) -> list[SchemaProblem]:
    """Problems of a Job template as written, where scalars may be Jinja2 expressions.
    ``spec`` is left unchanged."""
    walker = _Walker(templates=True, coerce=False)
    walker.value(copy.deepcopy(spec), {"type": "object", "ref": type_name}, ())
    return walker.problems


def coerce(job: dict[str, Any], type_name: str = JOB) -> list[SchemaProblem]:
    """Convert, in place, text in ``job`` to the types of its fields, then report what
    still does not fit (an empty list: the API server's schema accepts it)."""
    walker = _Walker(templates=False, coerce=True)
    walker.value(job, {"type": "object", "ref": type_name}, ())
    return walker.problems


def check_object(obj: Any, type_name: str = JOB) -> list[SchemaProblem]:
    """Problems of a finished object (no templates, no conversion); ``obj`` unchanged."""
    walker = _Walker(templates=False, coerce=False)
    walker.value(copy.deepcopy(obj), {"type": "object", "ref": type_name}, ())
    return walker.problems


def schema_source() -> str:
    """Where the schema was read from (server version and path)."""
    return str(_schema().get("source", "?"))
