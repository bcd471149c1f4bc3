"""Reading manifests: a YAML file (or a custom resource's object) into the models of
``scaledjob``, each mistake named by file, line and field; YAML and JSON read strictly
(a key given twice is refused).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from jobrunner.core import limits
from jobrunner.manifest.scaledjob import (
    API_GROUP,
    AuthenticationMeta,
    AuthenticationRef,
    DeadLetter,
    EnvRef,
    FunctionSpec,
    InvalidTriggers,
    ManifestError,
    ManifestErrors,
    MessageDelivery,
    ObjectMeta,
    OutputBinding,
    ScaledJob,
    ScaledJobSpec,
    SecretKeyRef,
    Trigger,
    TriggerAuthentication,
    TriggerAuthenticationSpec,
    line_of,
)
from jobrunner.manifest.triggers import check_output, check_spec, check_trigger


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_fields() -> set[str]:
    models: list[type[BaseModel]] = [
        ScaledJob,
        ScaledJobSpec,
        ObjectMeta,
        AuthenticationMeta,
        Trigger,
        AuthenticationRef,
        MessageDelivery,
        DeadLetter,
        TriggerAuthentication,
        TriggerAuthenticationSpec,
        SecretKeyRef,
        EnvRef,
        OutputBinding,
        FunctionSpec,
    ]
    return {name for model in models for name in model.model_fields}


_NAME_RULES = {
    limits.DNS1123_LABEL_PATTERN: limits.dns1123_label_problem,
    limits.DNS1123_SUBDOMAIN_PATTERN: limits.dns1123_subdomain_problem,
}
"""The Kubernetes rule behind each name pattern, to say it in words."""


_BOUND_REASONS = {
    "maxReplicaCount": (
        "every message in hand is held in the dispatcher's memory with its body until it "
        "is settled, and this is how many may be; lower it (KEDA's default is 100)"
    ),
    "successfulJobsHistoryLimit": (
        "every Job kept stays in the API server and in each dispatcher's Job watch; lower it"
    ),
    "failedJobsHistoryLimit": (
        "every Job kept stays in the API server and in each dispatcher's Job watch; lower it"
    ),
}
"""Why a count a ScaledJob gives has its upper bound, said with the refusal."""


def _hint(item: Any) -> str:
    kind = item["type"]
    last = item["loc"][-1] if item["loc"] else ""
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(last), _known_fields(), n=1, cutoff=0.75)
        if close:
            return f"unknown field; did you mean {close[0]!r}?"
        return "unknown field; remove it (see the README's manifest reference)"
    if kind == "missing":
        return "required; add it"
    pattern = item["ctx"].get("pattern") if kind == "string_pattern_mismatch" else None
    rule = _NAME_RULES.get(pattern) if pattern else None
    if rule is not None:
        problem = rule(str(item["input"]), "it")
        return f"{problem}, as Kubernetes requires" if problem else str(item["msg"])
    text = str(item["msg"])
    why = _BOUND_REASONS.get(str(last)) if kind == "less_than_equal" else None
    if why is not None:
        return f"{text} (got {item['input']!r}): {why}"
    if kind == "string_too_long":  # the count says it; a 254-character echo would not
        text += f" (got {len(str(item['input']))})"
    elif "input" in item and not isinstance(item["input"], dict | list):
        text += f" (got {item['input']!r})"
    return text


def _explain(error: ValidationError, where: str, node: yaml.Node | None = None) -> ManifestError:
    lines = [f"{where}: invalid manifest"]
    for item in error.errors():
        loc = tuple(item["loc"])
        line = line_of(node, loc)
        at = f"line {line}, " if line is not None else ""
        lines.append(f"  {at}field {_field_path(loc)}: {_hint(item)}")
    return ManifestError("\n".join(lines))


def parse_scaledjob(
    obj: dict[str, Any],
    *,
    where: str = "<object>",
    node: yaml.Node | None = None,
    origin: str = "",
) -> ScaledJob:
    """A ScaledJob from a plain object (a file's document, or a custom resource), its
    triggers checked without I/O; ManifestError naming each field (and its line, given
    the YAML ``node``)."""
    try:
        scaledjob = ScaledJob.model_validate(obj)
    except ValidationError as exc:
        raise _with_the_rest(exc, obj, where=where, node=node, origin=origin) from None
    scaledjob._node = node
    scaledjob._origin = origin
    problems = []
    for i, trigger in enumerate(scaledjob.spec.triggers):
        for problem in check_trigger(trigger):
            loc: tuple[int | str, ...] = ("spec", "triggers", i, *problem.field.split("."))
            line = line_of(node, loc)
            at = f"line {line}, " if line is not None else ""
            problems.append(f"  {at}field {_field_path(loc)}: {problem.text}")
    function = scaledjob.spec.function
    for i, output in enumerate(function.outputs if function else []):
        for problem in check_output(output):
            loc = ("spec", "function", "outputs", i, *problem.field.split("."))
            line = line_of(node, loc)
            at = f"line {line}, " if line is not None else ""
            problems.append(f"  {at}field {_field_path(loc)}: {problem.text}")
    for problem in check_spec(scaledjob):
        loc = tuple(problem.field.split("."))
        line = line_of(node, loc)
        at = f"line {line}, " if line is not None else ""
        problems.append(f"  {at}field {problem.field}: {problem.text}")
    if problems:
        raise InvalidTriggers(
            "\n".join([f"{where}: invalid trigger", *problems]), scaledjob=scaledjob
        )
    return scaledjob


def _with_the_rest(
    exc: ValidationError, obj: dict[str, Any], *, where: str, node: yaml.Node | None, origin: str
) -> ManifestError:
    """A ScaledJob's field errors, and the mistakes they would otherwise hide: the
    document read again without the fields in error (an unknown field dropped, a bad
    value left to its default) is checked on, so that its triggers' mistakes come in the
    same error, and (InvalidTriggers) its templates can be checked too. A document that
    cannot be read so (a required field missing, a mistake inside a list item) gets its
    field errors only, as before."""
    error = _explain(exc, where, node)
    rest = _without(obj, [tuple(item["loc"]) for item in exc.errors()])
    if rest is None:
        return error
    try:
        partial = parse_scaledjob(rest, where=where, node=node, origin=origin)
    except InvalidTriggers as more:
        problems = str(more).splitlines()[1:]  # under this error's header
        return InvalidTriggers("\n".join([str(error), *problems]), scaledjob=more.scaledjob)
    except ManifestError:
        return error
    return InvalidTriggers(str(error), scaledjob=partial)


def _without(obj: dict[str, Any], locs: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    """A copy of ``obj`` without the mapping keys at ``locs``; None when one is not a key
    of a mapping there (a list item, or a field that is missing)."""
    import copy

    out = copy.deepcopy(obj)
    for loc in locs:
        parent: Any = out
        for part in loc[:-1]:
            try:
                parent = parent[part]
            except (KeyError, IndexError, TypeError):
                return None
        if not isinstance(parent, dict) or loc[-1] not in parent:
            return None
        del parent[loc[-1]]
    return out


def parse_trigger_authentication(
    obj: dict[str, Any], *, where: str = "<object>", node: yaml.Node | None = None
) -> TriggerAuthentication:
    """A TriggerAuthentication from a plain object (a file's document, or a custom
    resource of jobrunner.dev or keda.sh); ManifestError naming each field otherwise."""
    try:
        return TriggerAuthentication.model_validate(obj)
    except ValidationError as exc:
        raise _explain(exc, where, node) from None


def read_text(path: Path) -> str:
    """A manifest or template file as UTF-8 text; ManifestError saying what to do when it
    cannot be read or is not UTF-8."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a directory; give a YAML file") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}: line {line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last one silently). YAML 1.2 (section 3.2.1.1) requires a mapping's keys to be
    unique, and kubectl's strict decoding refuses a duplicate ("mapping key already
    defined"): a manifest jobrunner ran would then not apply, or ran with a value its
    author did not see. A key that only repeats one brought in by a merge (``<<``)
    overrides it, as YAML's merge key allows."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        f"the first {key!r}",
                        earlier.start_mark,
                        f"duplicate key {key!r}: a key may appear once in a mapping (YAML "
                        "1.2; kubectl refuses it too, and PyYAML would keep the last one "
                        "silently); keep one",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def construct_unique(node: yaml.Node) -> Any:
    """A composed YAML node's value, refusing duplicate keys (see UniqueKeyLoader);
    yaml.YAMLError, for ``yaml_error``."""
    return UniqueKeyLoader("").construct_document(node)


def load_json(text: str, path: Path) -> Any:
    """A JSON file's value, refusing a key given twice in one object with both lines
    (RFC 8259 section 4 says names SHOULD be unique, and Python's json keeps the last
    one silently); ManifestError naming the file and line otherwise."""
    duplicate: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen and not duplicate:
                duplicate.append(key)
            seen[key] = value
        return seen

    try:
        value = json.loads(text, object_pairs_hook=pairs)
    except ValueError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if duplicate:
        # JSON's parser knows no lines for a key; YAML's reads JSON and knows them.
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            if node is not None:
                construct_unique(node)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            first = getattr(exc, "context_mark", None)
            if mark is not None and first is not None and "duplicate key" in str(exc):
                raise ManifestError(
                    f"{path}: line {mark.line + 1}: duplicate key {duplicate[0]!r} (the first "
                    f"at line {first.line + 1}): a name may appear once in an object (RFC "
                    "8259; Python's json would keep the last one silently); keep one"
                ) from None
        raise ManifestError(
            f"{path}: duplicate key {duplicate[0]!r} in one object: a name may appear once "
            "(RFC 8259); keep one"
        )
    return value


def _documents(path: Path) -> list[tuple[dict[str, Any], yaml.Node]]:
    """Each document of the file with its YAML node (which knows the lines), parsed once;
    a key given twice in a mapping is refused with both lines."""
    text = read_text(path)
    out: list[tuple[dict[str, Any], yaml.Node]] = []
    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            doc = construct_unique(node) if node is not None else None
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ManifestError(f"{path}: document {len(out) + 1} is not a mapping")
            out.append((doc, node))
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    return out


def yaml_error(path: Path, exc: yaml.YAMLError) -> ManifestError:
    """``path: line L, column C: not valid YAML: <problem> (<context> at line K)``, from
    PyYAML's marks (0-based) rather than its multi-line text about "<unicode string>"."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return ManifestError(f"{path}: not valid YAML: {exc}")
    text = f"{path}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1})"
    return ManifestError(text)


class ManifestSet(BaseModel):
    """Everything one manifest file declares that jobrunner uses."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    path: Path
    scaledjobs: list[ScaledJob]
    authentications: dict[str, TriggerAuthentication]
    secrets: dict[tuple[str, str], dict[str, Any]] = Field(default_factory=dict)
    """Secrets of the file by (namespace, name): used for a TriggerAuthentication when
    the cluster has none of that name (see jobrunner.manifest.triggers.auth)."""
    skipped: list[str] = Field(default_factory=list)
    """Documents of other kinds, left to kubectl: one note each."""


def load_manifest(path: Path) -> ManifestSet:
    """Load ScaledJobs, TriggerAuthentications and Secrets from a YAML file, as a KEDA
    user keeps them for ``kubectl apply -f``; documents of other kinds are skipped with
    a note. Errors name the file, the line and the field."""
    documents = _documents(path)
    read = _read_documents(path, documents)
    if read.problems:
        raise ManifestErrors(read.problems, checkable=[*read.scaledjobs, *read.checkable])
    if not read.scaledjobs:
        raise ManifestError(_no_scaledjob(path, documents))
    _refuse_duplicate_names(path, read.scaledjobs)
    return ManifestSet(
        path=path,
        scaledjobs=read.scaledjobs,
        authentications=read.auths,
        secrets=read.secrets,
        skipped=read.skipped,
    )


@dataclass
class _Read:
    """What a manifest's documents hold, and what is wrong with them."""

    scaledjobs: list[ScaledJob] = field(default_factory=list)
    auths: dict[str, TriggerAuthentication] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checkable: list[ScaledJob] = field(default_factory=list)
    """ScaledJobs whose triggers only are wrong: the rest of them can still be checked."""


def _read_documents(path: Path, documents: list[tuple[dict[str, Any], yaml.Node]]) -> _Read:
    """Each document by its kind. Each document's mistakes are independent of the
    others': all are collected, to be reported at once; a document without a kind is a
    ManifestError at once."""
    read = _Read()
    for index, (doc, node) in enumerate(documents):
        kind = doc.get("kind")
        where = f"{path} (document {index + 1}, {kind or 'no kind'})"
        if kind == "ScaledJob":
            try:
                read.scaledjobs.append(
                    parse_scaledjob(doc, where=where, node=node, origin=str(path))
                )
            except InvalidTriggers as exc:
                read.problems.append(str(exc))
                read.checkable.append(exc.scaledjob)
            except ManifestError as exc:
                read.problems.append(str(exc))
        elif kind in ("TriggerAuthentication", "ClusterTriggerAuthentication"):
            try:
                auth = parse_trigger_authentication(doc, where=where, node=node)
            except ManifestError as exc:
                read.problems.append(str(exc))
                continue
            read.auths[auth.key] = auth
        elif kind == "Secret":
            meta = doc.get("metadata") or {}
            read.secrets[(str(meta.get("namespace") or "default"), str(meta.get("name")))] = doc
        elif not kind:
            raise ManifestError(
                f"{where}: line {node.start_mark.line + 1}, field kind: required; "
                "add kind: ScaledJob"
            )
        else:
            name = (doc.get("metadata") or {}).get("name", "?")
            read.skipped.append(
                f"{kind} {name} (document {index + 1}): not jobrunner's; left to kubectl"
            )
    return read


def _refuse_duplicate_names(path: Path, scaledjobs: list[ScaledJob]) -> None:
    """A ManifestError for a second ScaledJob of one name in one namespace."""
    seen: dict[tuple[str, str], ScaledJob] = {}
    for scaledjob in scaledjobs:
        key = (scaledjob.metadata.namespace, scaledjob.name)
        first = seen.setdefault(key, scaledjob)
        if first is not scaledjob:
            line = scaledjob.line_of(("metadata", "name"))
            earlier = first.line_of(("metadata", "name"))
            raise ManifestError(
                f"{path}: line {line}, field metadata.name: a second ScaledJob {key[1]!r} in "
                f"namespace {key[0]!r} (the first is at line {earlier}); names are unique "
                "per namespace: rename one"
            )


def _no_scaledjob(path: Path, documents: list[tuple[dict[str, Any], yaml.Node]]) -> str:
    """Why a file without a ScaledJob cannot be run, naming what it holds: a user who
    gives a Deployment, or KEDA's ScaledObject (which scales a Deployment; jobrunner, as
    KEDA's ScaledJob, runs one Job per message), learns what to write instead."""
    if not documents:
        return f"{path}: no ScaledJob in this file: it holds no YAML document; write a ScaledJob"
    found = []
    for doc, node in documents:
        name = (doc.get("metadata") or {}).get("name", "?")
        found.append(f"{doc.get('kind')} {name} (line {node.start_mark.line + 1})")
    text = f"{path}: no ScaledJob in this file; it holds {', '.join(found)}"
    kinds = {str(doc.get("kind")) for doc, _ in documents}
    close = difflib.get_close_matches("ScaledJob", kinds, n=1, cutoff=0.8) or [
        k for k in kinds if k.lower() == "scaledjob"
    ]
    if close:
        text += f"; kind: {close[0]} is not kind: ScaledJob (kinds are case-sensitive): fix it"
    elif "ScaledObject" in kinds:
        text += (
            ". A ScaledObject is KEDA's scaler for a Deployment; jobrunner runs ScaledJobs "
            "(kind: ScaledJob, apiVersion keda.sh/v1alpha1): one Job per message, with the "
            "same triggers and a jobTargetRef in place of scaleTargetRef"
        )
    elif "List" in kinds:
        text += (
            ". jobrunner reads each document of the file, not a List's items: write each "
            "ScaledJob as its own document (separated by ---)"
        )
    else:
        text += (
            "; jobrunner runs ScaledJobs (kind: ScaledJob, apiVersion keda.sh/v1alpha1 or "
            f"{API_GROUP}/v1alpha1): add one, or give the file that has it"
        )
    return text
