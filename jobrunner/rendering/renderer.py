"""Turns a message into the Job (and, when needed, the Secret) that carries it.

Pure: no I/O after construction, so ``jobrunner render`` shows offline exactly what
would be created.

Safety, in the order it is applied:

* the Job template is parsed first, and only its string *values* are Jinja2 templates,
  each rendered on its own in a ``SandboxedEnvironment`` with ``StrictUndefined``.
  Rendered text is never parsed again, so nothing in a message (YAML, JSON, quotes,
  newlines, ``{{ }}``) can add, remove or reshape a field of the Job;
* the kubelet expands ``$(VAR)`` in a container's ``command``, ``args``, env values and
  ``subPathExpr``. In those fields what an expression outputs is escaped (``$`` ->
  ``$$``, the kubelet's literal dollar), so message text arrives byte-exact and can never
  pull another variable (a Secret's value, say) into itself; the template's own text,
  ``$(VAR)`` included, is left for the kubelet to expand;
* the rendered Job is checked against the batch/v1 schema, text landing in the type
  its field has (see ``jobschema``), and against the platform's limits (``limits``).
  A message that cannot make a valid Job is refused (``TemplateError``,
  ``MessageTooLarge``, ``InvalidMessage``) before any Job exists.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import difflib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml

from jobrunner.core import limits, marks
from jobrunner.core.admission import KUEUE_JOB_LABELS
from jobrunner.core.models import (
    ANNOTATION_ACK_POLICY,
    ANNOTATION_BODY_DIGEST,
    ANNOTATION_MESSAGE_ID,
    ANNOTATION_SOURCE_DETAIL,
    FINALIZER,
    LABEL_KEDA_SCALEDJOB,
    LABEL_MANAGED_BY,
    LABEL_MESSAGE_KEY,
    LABEL_SCALEDJOB,
    LABEL_SOURCE,
    MANAGED_BY,
    Delivery,
)
from jobrunner.core.naming import job_name, message_key, message_secret_name
from jobrunner.core.provenance import Provenance, provenance
from jobrunner.core.settings import DispatcherSettings
from jobrunner.manifest import jobschema
from jobrunner.manifest.scaledjob import DeliveryMode, ManifestError, MessageDelivery, ScaledJob
from jobrunner.rendering.sandbox.pool import RenderPool, RenderPoolError
from jobrunner.rendering.sandbox.templates import (
    TEMPLATE_NAMES,
    MessageView,
    RenderError,
    RenderLimits,
    StringFailure,
    Strings,
    environment,
    literal,
)
from jobrunner.rendering.sandbox.templates import b64 as _b64

logger = logging.getLogger(__name__)

__all__ = [
    "TEMPLATE_NAMES",
    "MessageView",
    "RenderError",
    "RenderedJob",
    "Renderer",
    "literal",
    "original_message",
    "render_pool",
    "template_dirs",
]


def render_pool(settings: DispatcherSettings) -> RenderPool:
    """The render workers of a dispatcher process, with the limits its settings give
    (started on first use; the caller closes the pool)."""
    return RenderPool(
        RenderLimits(
            seconds=settings.render_timeout_seconds,
            output_bytes=settings.render_output_bytes,
            memory_bytes=settings.render_memory_bytes,
        ),
        workers=settings.render_workers,
        per_namespace=settings.render_workers_per_namespace,
        cooldown_max=settings.render_cooldown_max_seconds,
    )


ANNOTATION_ORIGINAL_MESSAGE = "jobrunner.dev/original-message"
# A Job's annotations may total 256 KiB; keep the original message there only when its
# body is in the Job's spec anyway (env, args) and it is well below that, else in the
# per-Job Secret.
ORIGINAL_IN_ANNOTATION_MAX = 96 * 1024
MESSAGE_VOLUME = "jobrunner-message"
ARG_MAX = 2 * 1024 * 1024
"""Linux: argv and environment together, with the 8 MiB stack a container gets by
default (a quarter of RLIMIT_STACK)."""
_CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
TEMPLATE_SOURCE_MAX = 64 * 1024
"""Characters of template text (the templated strings) one Job template may hold.
Parsing costs about 6 s per MiB of expressions, on the dispatcher's own process when a
ScaledJob starts; a Job template ordinarily holds a few hundred."""
RESERVED_PREFIX = "jobrunner.dev/"
RESERVED_KEYS = frozenset({LABEL_MANAGED_BY, LABEL_KEDA_SCALEDJOB})
"""Label and annotation keys a template may not write (besides every ``jobrunner.dev/``
key): jobrunner finds, counts and settles its Jobs by them."""


def kubelet_expands(path: tuple[str | int, ...]) -> bool:
    """Whether the kubelet expands ``$(VAR)`` in the JobSpec field at ``path``: a
    container's command and args items, env values and volumeMounts' subPathExpr (Pod
    spec reference: "Variable references $(VAR_NAME) are expanded using the container's
    environment")."""
    if len(path) < 6 or path[:2] != ("template", "spec") or path[2] not in _CONTAINER_LISTS:
        return False
    rest = path[4:]
    if rest[0] in ("command", "args"):
        return len(rest) == 2 and isinstance(rest[1], int)
    if rest[0] == "env":
        return len(rest) == 3 and rest[2] == "value"
    if rest[0] == "volumeMounts":
        return len(rest) == 3 and rest[2] == "subPathExpr"
    return False


Filler = Callable[[list[str]], Any]
"""Builds one part of the Job from the rendered strings (in ``_Compiler.sources`` order)."""


@dataclass
class _Compiler:
    """Collects every templated string of the Job template, checked at start-up, so a
    syntax error or an unknown name is found then, naming its field (``where`` + path)
    and, for files, its line. The strings are rendered together (in this process or in
    a render worker) and put back by the fillers ``compile`` returns."""

    sources: list[tuple[str, bool]] = field(default_factory=list)
    """Each templated string and whether the kubelet expands its field."""
    wheres: list[str] = field(default_factory=list)
    """The field each came from, for errors."""
    size: int = 0
    """Characters of template text so far (bounded by TEMPLATE_SOURCE_MAX)."""
    problems: list[str] = field(default_factory=list)
    """Each string's syntax error or unknown name, its field named: every one is found
    (they are independent), then raised together (``raise_problems``)."""
    _envs: dict[bool, jinja2.Environment] = field(
        default_factory=lambda: {e: environment(kubelet_expanded=e) for e in (False, True)}
    )

    def compile(
        self,
        node: Any,
        path: tuple[str | int, ...],
        *,
        spec: bool,
        where: Callable[[tuple[str | int, ...]], str],
    ) -> Filler:
        if isinstance(node, dict):
            parts = {
                k: self.compile(v, (*path, k), spec=spec, where=where) for k, v in node.items()
            }
            return lambda values: {k: fn(values) for k, fn in parts.items()}
        if isinstance(node, list):
            items = [
                self.compile(v, (*path, i), spec=spec, where=where) for i, v in enumerate(node)
            ]
            return lambda values: [fn(values) for fn in items]
        if jobschema.is_templated(node):
            index = self._string(node, where(path), escape=spec and kubelet_expands(path))
            return lambda values: values[index]
        return lambda values: copy.deepcopy(node)

    def _string(self, source: str, where: str, *, escape: bool) -> int:
        self.size += len(source)
        if self.size > TEMPLATE_SOURCE_MAX:
            raise ManifestError(
                f"{where}: the templated strings of this Job template pass "
                f"{TEMPLATE_SOURCE_MAX} characters in all, the most jobrunner parses for one "
                "Job template; move large fixed text out of the templated strings (a "
                "ConfigMap, the image)"
            )
        try:
            parsed = self._envs[escape].parse(source)
        except jinja2.TemplateSyntaxError as exc:
            self.problems.append(f"{where}: template syntax error: {exc.message}")
            return -1
        except RecursionError:
            self.problems.append(
                f"{where}: the template nests too deep for Jinja2's parser; flatten it"
            )
            return -1
        unknown = sorted(jinja2.meta.find_undeclared_variables(parsed) - set(TEMPLATE_NAMES))
        if unknown:
            close = difflib.get_close_matches(unknown[0], TEMPLATE_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            self.problems.append(
                f"{where}: unknown name {unknown[0]!r} in the template; {hint}templates see "
                f"{', '.join(TEMPLATE_NAMES)}"
            )
            return -1
        self.sources.append((source, escape))
        self.wheres.append(where)
        return len(self.sources) - 1

    def raise_problems(self) -> None:
        """ManifestError with every problem found (one: as it is; more: one a line)."""
        if len(self.problems) == 1:
            raise ManifestError(self.problems[0])
        if self.problems:
            raise ManifestError(
                "invalid templated strings in the Job template\n"
                + "\n".join(f"  {p}" for p in self.problems)
            )


@dataclass(frozen=True)
class RenderedJob:
    name: str
    job: dict[str, Any]
    secret: dict[str, Any] | None
    """Per-Job Secret holding the message (the file a pod mounts, and the original kept
    for a dead letter), created after the Job and owned by it (see messagesecret)."""


@dataclass(frozen=True)
class JobTemplate:
    """The Job skeleton as written: ``metadata`` (labels, annotations) and a JobSpec, and
    how to name a field of it in an error (``spec.jobTargetRef.backoffLimit``, or
    ``job.yaml line 7, field spec.backoffLimit``)."""

    metadata: dict[str, Any]
    spec: dict[str, Any]
    origin: str
    """Where it was written: the manifest's ``spec.jobTargetRef`` or a template file."""
    spec_prefix: str
    lines: Callable[[tuple[str | int, ...]], int | None] = lambda path: None

    def where(self, path: tuple[str | int, ...], *, in_spec: bool = True) -> str:
        """A field of the template, for errors: file, line and path."""
        name = jobschema.field_path(path, self.spec_prefix if in_spec else "metadata")
        line = self.lines(("spec", *path) if in_spec else ("metadata", *path))
        at = f"line {line}, " if line is not None else ""
        return f"{self.origin}{at}field {name}"


def template_dirs(manifest_path: Path) -> list[Path]:
    """Where a relative ``jobTemplate`` is looked for: beside the manifest, in its
    ``job_templates/``, then in ``job_templates/`` of the working directory."""
    base = manifest_path.resolve().parent
    # Each once: for a manifest in the working directory the last two are one directory,
    # which an error's list of paths tried would otherwise name twice.
    dirs = [base, base / "job_templates", Path.cwd().resolve() / "job_templates"]
    return list(dict.fromkeys(dirs))


def _yaml_lines(node: yaml.Node | None) -> Callable[[tuple[str | int, ...]], int | None]:
    from jobrunner.manifest.scaledjob import line_of

    return lambda path: line_of(node, path)


def load_job_template(scaledjob: ScaledJob, *, base_dirs: list[Path]) -> JobTemplate:
    """The Job skeleton from ``jobTargetRef`` or a template file (a Job or a bare
    JobSpec), checked against the batch/v1 schema; ManifestError naming the field."""
    spec = scaledjob.spec
    if spec.jobTargetRef is not None:
        template = JobTemplate(
            metadata={},
            spec=copy.deepcopy(spec.jobTargetRef),
            origin=scaledjob.origin,
            spec_prefix="spec.jobTargetRef",
            lines=lambda path: scaledjob.line_of(("spec", "jobTargetRef", *path[1:])),
        )
        _check_template(template)
        return template
    assert spec.jobTemplate is not None
    line = scaledjob.line_of(("spec", "jobTemplate"))
    at = f"line {line}, " if line is not None else ""
    if scaledjob.origin:
        # Read from a file: its author owns this filesystem; any path will do.
        wanted = Path(spec.jobTemplate).expanduser()
        candidates = [wanted] if wanted.is_absolute() else [d / wanted for d in base_dirs]
    else:
        # A custom resource: whoever may create ScaledJobs wrote it, so it may name only
        # files in the operator's template directories (no absolute path, no '..', no
        # symlink out), or it could probe the operator's filesystem through its status.
        confined = _confined(spec.jobTemplate, base_dirs)
        if confined is None:
            raise ManifestError(
                f"{at}field spec.jobTemplate: {spec.jobTemplate!r} is outside the "
                f"operator's template directories ({', '.join(map(str, base_dirs))}); give "
                "a path relative to them, or put the Job template in spec.jobTargetRef"
            )
        candidates = confined
    for candidate in candidates:
        if candidate.is_file():
            # The file itself, not the way there: errors then name
            # /repo/job_templates/echo-job.yaml, not /repo/deploy/examples/../../job_templates/….
            template = _read_template_file(candidate.resolve())
            _check_template(template)
            return template
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    where = (
        "beside the manifest, in its job_templates/ and in ./job_templates/"
        if scaledjob.origin
        else "in the operator's template directories"
    )
    raise ManifestError(
        f"{scaledjob.origin}{at}field spec.jobTemplate: file not found: {spec.jobTemplate} "
        f"(tried {tried}); a relative path is looked for {where}"
    )


def _confined(name: str, base_dirs: list[Path]) -> list[Path] | None:
    """``name`` in each of ``base_dirs``, each resolved path checked to stay inside its
    directory; None when ``name`` is absolute, starts with '~' or climbs out with '..'."""
    wanted = Path(name)
    if wanted.is_absolute() or name.startswith("~") or ".." in wanted.parts:
        return None
    inside = []
    for base in base_dirs:
        candidate = (base / wanted).resolve()
        if candidate.is_relative_to(base.resolve()):
            inside.append(candidate)
    return inside


def _read_template_file(path: Path) -> JobTemplate:
    from jobrunner.manifest.loader import construct_unique, read_text

    text = read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = construct_unique(node) if node is not None else None
    except yaml.YAMLError as exc:
        from jobrunner.manifest.loader import yaml_error

        raise yaml_error(path, exc) from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a Job or a JobSpec mapping")
    if doc.get("kind") == "Job":
        meta = doc.get("metadata") or {}
        unused = sorted(set(meta) - {"labels", "annotations", "name", "namespace"})
        if unused:
            raise ManifestError(
                f"{path}: field metadata.{unused[0]}: jobrunner sets a Job's metadata; a "
                "template may give labels and annotations only"
            )
        return JobTemplate(
            metadata={k: meta[k] for k in ("labels", "annotations") if k in meta},
            spec=doc.get("spec") or {},
            origin=f"{path}: ",
            spec_prefix="spec",
            lines=_yaml_lines(node),
        )
    return JobTemplate(
        metadata={},
        spec=doc,
        origin=f"{path}: ",
        spec_prefix="",
        lines=functools.partial(line_of_spec, node),
    )


def line_of_spec(node: yaml.Node | None, path: tuple[str | int, ...]) -> int | None:
    """Lines of a bare JobSpec file: its root is the spec itself."""
    from jobrunner.manifest.scaledjob import line_of

    return line_of(node, path[1:] if path and path[0] == "spec" else path)


def _reserved_keys(template: JobTemplate) -> list[jobschema.SchemaProblem]:
    """Labels and annotations the template may not set: jobrunner's own (see
    RESERVED_KEYS). jobrunner overwrites some of them when it renders, but a template
    that sets one means something it cannot have (its Job counted as another
    ScaledJob's, a message marked settled, a forged kept copy): refused, not ignored."""
    pod_template = template.spec.get("template")
    pod = pod_template.get("metadata") if isinstance(pod_template, dict) else None
    places: list[tuple[tuple[str | int, ...], Any]] = []
    where: list[tuple[tuple[str | int, ...], Any]] = [
        (("metadata",), template.metadata),
        (("template", "metadata"), pod),
    ]
    for at, meta in where:
        if isinstance(meta, dict):  # else the schema check names what it is
            places += [((*at, kind), meta.get(kind)) for kind in ("labels", "annotations")]
    problems = []
    for path, keys in places:
        for key in keys if isinstance(keys, dict) else {}:
            if str(key).startswith(RESERVED_PREFIX) or key in RESERVED_KEYS:
                problems.append(
                    jobschema.SchemaProblem(
                        (*path, key),
                        f"{key!r} is jobrunner's own (it finds, counts and settles its Jobs "
                        f"by it; every {RESERVED_PREFIX} key is); use a key of your own",
                    )
                )
    return problems


def _check_template(template: JobTemplate) -> None:
    problems = jobschema.check_template(template.spec)
    problems += [
        jobschema.SchemaProblem(("metadata", *p.path), p.text)
        for p in jobschema.check_template(template.metadata, jobschema.OBJECT_META)
    ]
    problems += _reserved_keys(template)
    if not problems:
        containers = ((template.spec.get("template") or {}).get("spec") or {}).get("containers")
        if not containers:
            problems.append(
                jobschema.SchemaProblem(
                    ("template", "spec", "containers"), "at least one container is required"
                )
            )
    if problems:
        lines = []
        for problem in problems:
            if problem.path and problem.path[0] == "metadata":
                lines.append(f"  {template.where(problem.path[1:], in_spec=False)}: {problem.text}")
            else:
                lines.append(f"  {template.where(problem.path)}: {problem.text}")
        # The templated strings' mistakes are independent of the schema's: both at once.
        strings = _Compiler()
        _compile_template(strings, template)
        lines += [f"  {p}" for p in strings.problems]
        raise ManifestError("invalid Job template (batch/v1 JobSpec)\n" + "\n".join(lines))


def _compile_template(compiler: _Compiler, template: JobTemplate) -> tuple[Filler, Filler]:
    """Every templated string of ``template`` into ``compiler``: (spec, metadata) fillers."""
    spec = compiler.compile(template.spec, (), spec=True, where=template.where)
    metadata = compiler.compile(
        template.metadata, (), spec=False, where=lambda p: template.where(p, in_spec=False)
    )
    return spec, metadata


@dataclass(frozen=True)
class _Placement:
    """Where the body goes: an env value (text or base64) or a file from the Secret."""

    in_env: bool
    env_value: str | None
    """The value the process sees (before escaping), when in env."""
    encoding: str


def _with_kueue_labels(job_meta: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """``job_meta`` with the Kueue labels (queue name, priority class) of the pod template
    added: KEDA copies a ScaledJob's pod-template labels to its Jobs, so that is where
    KEDA users write ``kueue.x-k8s.io/queue-name``, and Kueue reads it on the Job. The
    Job template's own labels win."""
    pod = (spec.get("template") or {}).get("metadata") or {}
    labels = pod.get("labels") or {}
    found = {k: labels[k] for k in KUEUE_JOB_LABELS if k in labels}
    if not found:
        return dict(job_meta)
    return {**job_meta, "labels": {**found, **(job_meta.get("labels") or {})}}


def _place_body(body: bytes, config: MessageDelivery) -> _Placement:
    """Decide how the body reaches the Job: env when the mode says so and it fits both
    ``maxEnvBytes`` and what Linux passes in one variable, else a file."""
    text = _text(body)
    value = text if text is not None else _b64(body)
    encoding = "utf-8" if text is not None else "base64"
    most = limits.env_value_max(config.envVarName)
    fits = len(body) <= config.maxEnvBytes and len(value.encode()) <= most
    mode = config.mode
    if mode is DeliveryMode.FILE or (mode is DeliveryMode.AUTO and not fits):
        return _Placement(in_env=False, env_value=None, encoding=encoding)
    if not fits:
        raise RenderError(
            "MessageTooLarge",
            f"body is {len(body)} bytes ({len(value.encode())} as {encoding}), over "
            f"messageDelivery.maxEnvBytes ({config.maxEnvBytes}) or the {most} bytes Linux "
            f"passes in one variable, for mode {mode.value}; use mode auto or file",
        )
    return _Placement(in_env=True, env_value=value, encoding=encoding)


def _text(body: bytes) -> str | None:
    """The body as text when it is UTF-8 without NUL (NUL cannot travel in env)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _message_env(
    delivery: Delivery,
    *,
    name: str,
    scaledjob: str,
    placement: _Placement,
    config: MessageDelivery,
    told: Mapping[str, str],
    extra: Mapping[str, str],
) -> list[dict[str, Any]]:
    """The env every message container gets: the message, what made its Job
    (``told``, see jobrunner.core.provenance) and ``extra`` (the trace context).
    Every value is escaped against the kubelet's ``$(VAR)`` expansion: the trigger's
    source, say, may be a topic the publisher chose."""
    env: list[dict[str, Any]] = [
        {"name": "JOBRUNNER_SOURCE", "value": delivery.source},
        {"name": "JOBRUNNER_SCALEDJOB", "value": scaledjob},
        {"name": "JOBRUNNER_JOB_NAME", "value": name},
        {
            "name": "JOBRUNNER_MESSAGE_ID",
            "value": literal(delivery.message_id or delivery.identity),
        },
        {
            "name": "JOBRUNNER_MESSAGE_HEADERS",
            "value": literal(json.dumps(dict(delivery.headers), sort_keys=True)),
        },
        {
            "name": "JOBRUNNER_MESSAGE_METADATA",
            "value": literal(json.dumps(dict(delivery.metadata), sort_keys=True)),
        },
        {"name": "JOBRUNNER_MESSAGE_ENCODING", "value": placement.encoding},
        # Which delivery of the message made this Job (models.Delivery.delivery_count).
        {"name": "JOBRUNNER_DELIVERY_COUNT", "value": str(delivery.delivery_count)},
    ]
    env.extend({"name": k, "value": literal(v)} for k, v in told.items())
    env.extend({"name": k, "value": literal(v)} for k, v in extra.items() if v)
    if placement.in_env:
        assert placement.env_value is not None
        env.append({"name": config.envVarName, "value": literal(placement.env_value)})
    else:
        env.append({"name": "JOBRUNNER_MESSAGE_FILE", "value": f"{config.mountPath}/body"})
    return env


def original_fields(delivery: Delivery) -> dict[str, Any]:
    """The message as its Job keeps it, without the body: ids, headers, content type and
    metadata (where a source puts a reply address: RabbitMQ's ``reply_to`` and
    ``correlation_id``), so a settlement from the copy sees what a live one sees."""
    return {
        "message_id": delivery.message_id,
        "identity": delivery.identity,
        "headers": dict(delivery.headers),
        "content_type": delivery.content_type,
        "metadata": dict(delivery.metadata),
    }


def _original(delivery: Delivery, *, with_body: bool) -> str:
    """The message as received, kept with its Job for a later dead letter."""
    kept = original_fields(delivery)
    if with_body:
        kept["body"] = _b64(delivery.body)
    return json.dumps(kept, sort_keys=True)


def _annotations_size(annotations: Mapping[str, Any]) -> int:
    return sum(len(str(k).encode()) + len(str(v).encode()) for k, v in annotations.items())


class Renderer:
    """Renders Jobs for one ScaledJob; construct once at start (templates are read,
    checked against the batch/v1 schema and parsed then; ManifestError on a mistake).

    The dispatcher renders with ``render_bounded``: the templates run in a render
    worker (``pool``) under its time, output and memory limits, off the event loop.
    ``render`` runs them in this process with only the output limit, for the offline
    commands (``jobrunner render``, ``validate``) and for tests."""

    def __init__(
        self,
        scaledjob: ScaledJob,
        *,
        base_dirs: list[Path] | None = None,
        copy_in_job_only: bool = False,
        pool: RenderPool | None = None,
        new_key: Callable[[], bytes] = marks.new_key,
    ) -> None:
        """``copy_in_job_only``: the dispatcher cannot read message Secrets back
        (``DispatcherSettings.read_message_secrets`` false), so a message whose copy does
        not fit in its Job's annotations is a RenderError ``MessageTooLarge``. ``pool``:
        the render workers ``render_bounded`` uses. ``new_key``: makes each function
        Job's key (random; tests pass their own)."""
        self.scaledjob = scaledjob
        self._new_key = new_key
        self._copy_in_job_only = copy_in_job_only
        self.template = load_job_template(scaledjob, base_dirs=base_dirs or [])
        self._pool = pool
        self.limits = pool.limits if pool is not None else RenderLimits()
        compiler = _Compiler()
        self._spec, self._metadata = _compile_template(compiler, self.template)
        compiler.raise_problems()
        self._sources = compiler.sources
        self._wheres = compiler.wheres
        self._key = hashlib.sha256(json.dumps(self._sources).encode()).hexdigest()
        """Names these templates in the render workers' caches."""
        self._here: Strings | None = None
        self._strikes = 0
        """Renders in a row that passed the time or memory limit (see ``_cool_down``)."""
        self._resume_at = 0.0
        """``time.monotonic()`` before which the next bounded render waits."""

    def render(
        self, delivery: Delivery, *, extra_env: Mapping[str, str] | None = None
    ) -> RenderedJob:
        """The Job for ``delivery``, rendered in this process (no time or memory limit:
        see the class docstring); ``extra_env`` (such as the trace context) is added to
        the same containers as the message. RenderError when the message cannot make a
        Job the API server and the container runtime would take."""
        name, context = self._context(delivery)
        if self._here is None:
            self._here = Strings(self._sources, limits=self.limits)
        try:
            values = self._here.render(
                {
                    "message": MessageView(body=delivery.body, **context["message"]),
                    "scaledjob": context["scaledjob"],
                    "job": context["job"],
                }
            )
        except StringFailure as failure:
            raise self._failed(failure) from None
        return self._assemble(delivery, name, values, extra_env or {})

    async def render_bounded(
        self, delivery: Delivery, *, extra_env: Mapping[str, str] | None = None
    ) -> RenderedJob:
        """As ``render``, the templates run in a render worker under the pool's limits
        (in this process when the Renderer has no pool). RenderError as ``render``, and
        TemplateError naming the limit a render passed; RenderPoolError when no worker
        could be had (not the message's fault)."""
        if self._pool is None:
            return self.render(delivery, extra_env=extra_env)
        name, context = self._context(delivery)
        wait = self._resume_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            values = await self._pool.render(
                tenant=self.scaledjob.namespace,
                scaledjob=self.scaledjob.name,
                key=self._key,
                templates=self._sources,
                context=context,
                body=delivery.body,
            )
        except StringFailure as failure:
            if self.limits.too_slow() in failure.detail or (
                self.limits.too_much_memory() in failure.detail
            ):
                self._cool_down()
            raise self._failed(failure) from None
        self._strikes = 0
        if len(values) != len(self._sources):
            raise RenderPoolError(
                f"a render worker returned {len(values)} strings for {len(self._sources)}"
            )
        return self._assemble(delivery, name, values, extra_env or {})

    def _cool_down(self) -> None:
        """After a render that held a worker to its time or memory limit: the next one
        waits first (the time limit, doubled for each such render in a row, at most the
        pool's ``cooldown_max``), so that this ScaledJob holds a worker only a small share
        of the time however many messages it is sent."""
        assert self._pool is not None
        self._strikes += 1
        pause = min(self._pool.cooldown_max, self.limits.seconds * 2 ** (self._strikes - 1))
        self._resume_at = time.monotonic() + pause
        logger.warning(
            "ScaledJob %s/%s: a render passed its limit (%d in a row); its next render waits "
            "%.0f s before it asks for a render worker",
            self.scaledjob.namespace,
            self.scaledjob.name,
            self._strikes,
            pause,
            extra={"scaledjob": self.scaledjob.name},
        )

    def _failed(self, failure: StringFailure) -> RenderError:
        if failure.index is None or not 0 <= failure.index < len(self._wheres):
            return RenderError(failure.reason, failure.detail)
        return RenderError(failure.reason, f"{self._wheres[failure.index]}: {failure.detail}")

    def _context(self, delivery: Delivery) -> tuple[str, dict[str, Any]]:
        """The Job's name and what the templates see, as plain data (``message``
        without its body): RenderError for a message refused before any template runs."""
        sj = self.scaledjob
        config = sj.spec.messageDelivery
        if delivery.unreadable is not None:
            raise RenderError("InvalidMessage", delivery.unreadable)
        if len(delivery.body) > config.maxMessageBytes:
            raise RenderError(
                "MessageTooLarge",
                f"body is {len(delivery.body)} bytes, over messageDelivery.maxMessageBytes "
                f"({config.maxMessageBytes})",
            )
        name = job_name(sj.name, delivery.identity)
        return name, {
            "message": {
                "id": delivery.message_id,
                "identity": delivery.identity,
                "headers": dict(delivery.headers),
                "metadata": dict(delivery.metadata),
                "source": delivery.source,
                "content_type": delivery.content_type,
            },
            "scaledjob": {"name": sj.name, "namespace": sj.namespace},
            "job": {"name": name},
        }

    def _assemble(
        self, delivery: Delivery, name: str, values: list[str], extra_env: Mapping[str, str]
    ) -> RenderedJob:
        """The Job (and Secret) from the rendered strings, checked."""
        sj = self.scaledjob
        config = sj.spec.messageDelivery
        body = delivery.body
        spec = self._spec(values)
        job_meta = self._metadata(values)
        self._check_rendered(spec, job_meta)
        placement = _place_body(body, config)
        told = self._provenance(delivery, spec, extra_env)
        env = _message_env(
            delivery,
            name=name,
            scaledjob=sj.name,
            placement=placement,
            config=config,
            told=told.env,
            extra=extra_env or {},
        )
        secret_name = message_secret_name(name)
        self._inject(spec, env, placement, secret_name)
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": self._job_metadata(
                delivery, name, _with_kueue_labels(job_meta, spec), told
            ),
            "spec": spec,
        }
        self._check_schema(job)
        # A function's Job always has a Secret, which holds the Job's key (jobrunner.core.marks),
        # and keeps its copy there, where its pod cannot write (unless this dispatcher may
        # not read Secrets back: then in the Job, as any Job's).
        function = sj.spec.function is not None
        keep_in_secret = (function and not self._copy_in_job_only) or self._keep_original(
            job, delivery, placement
        )
        secret = None
        if keep_in_secret or not placement.in_env or function:
            key = {marks.KEY_DATA: self._new_key()} if function else {}
            secret = self._secret(delivery, secret_name, with_original=keep_in_secret, extra=key)
            if function:
                marks.equip(spec, secret, containers=config.containers, key=key[marks.KEY_DATA])
        self._check_limits(job)
        return RenderedJob(name=name, job=job, secret=secret)

    def _job_metadata(
        self, delivery: Delivery, name: str, job_meta: Mapping[str, Any], told: Provenance
    ) -> dict[str, Any]:
        """The Job's metadata: the template's labels and annotations, then jobrunner's
        own (which a template may not write), the provenance's among them."""
        sj = self.scaledjob
        return {
            "name": name,
            "namespace": sj.namespace,
            "labels": {
                **(job_meta.get("labels") or {}),
                **self._labels(delivery),
                **told.labels,
            },
            # Kept until the message's fate is durable (see models.FINALIZER).
            "finalizers": [FINALIZER],
            "annotations": {
                **(job_meta.get("annotations") or {}),
                ANNOTATION_MESSAGE_ID: delivery.identity,
                ANNOTATION_SOURCE_DETAIL: json.dumps(dict(delivery.metadata), sort_keys=True),
                ANNOTATION_ACK_POLICY: sj.spec.ackPolicy.value,
                ANNOTATION_BODY_DIGEST: hashlib.sha256(delivery.body).hexdigest(),
                **told.annotations,
            },
        }

    def _provenance(
        self, delivery: Delivery, spec: Mapping[str, Any], extra_env: Mapping[str, str]
    ) -> Provenance:
        """What the Job is told about what made it (jobrunner.core.provenance): the
        trigger, where the message came from, which delivery it is, the Job's
        ``activeDeadlineSeconds`` as rendered, and the trace it joins."""
        trigger = self.scaledjob.spec.triggers[0]
        deadline = spec.get("activeDeadlineSeconds")
        return provenance(
            delivery,
            trigger_type=trigger.type,
            trigger_name=trigger.name,
            active_deadline_seconds=(
                deadline if isinstance(deadline, int) and not isinstance(deadline, bool) else None
            ),
            traceparent=extra_env.get("TRACEPARENT"),
        )

    def _labels(self, delivery: Delivery) -> dict[str, str]:
        sj = self.scaledjob.name
        return {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_SCALEDJOB: sj,
            LABEL_KEDA_SCALEDJOB: sj,
            LABEL_SOURCE: delivery.source,
            LABEL_MESSAGE_KEY: message_key(sj, delivery.identity),
        }

    def _inject(
        self,
        spec: dict[str, Any],
        env: list[dict[str, Any]],
        placement: _Placement,
        secret_name: str,
    ) -> None:
        """Put the message's env (and volume) into the containers that get it."""
        config = self.scaledjob.spec.messageDelivery
        pod_template = spec.setdefault("template", {})
        pod_meta = pod_template.get("metadata") or {}
        pod_template["metadata"] = pod_meta
        pod_meta["labels"] = {
            **(pod_meta.get("labels") or {}),
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_SCALEDJOB: self.scaledjob.name,
        }
        pod_spec = pod_template["spec"]
        pod_spec.setdefault("restartPolicy", "Never")
        if not placement.in_env:
            volumes = pod_spec.setdefault("volumes", [])
            volumes.append({"name": MESSAGE_VOLUME, "secret": {"secretName": secret_name}})
        targets = config.containers
        for container in pod_spec["containers"]:
            if targets is not None and container.get("name") not in targets:
                continue
            container["env"] = [*copy.deepcopy(env), *(container.get("env") or [])]
            if not placement.in_env:
                mounts = container.setdefault("volumeMounts", [])
                mounts.append(
                    {"name": MESSAGE_VOLUME, "mountPath": config.mountPath, "readOnly": True}
                )
            if config.mode is DeliveryMode.ARGS:
                container["args"] = [*(container.get("args") or []), f"$({config.envVarName})"]

    def _where_rendered(self, path: tuple[str | int, ...]) -> str:
        """A field of the rendered Job, named where the template wrote it."""
        if path and path[0] == "spec":
            return self.template.where(path[1:])
        if len(path) > 1 and path[0] == "metadata":
            return self.template.where(path[1:], in_spec=False)
        return f"field {jobschema.field_path(path)}"

    def _check_rendered(self, spec: dict[str, Any], metadata: dict[str, Any]) -> None:
        """What the template made of the message, before jobrunner adds its own: text
        lands in its field's type, or the message is a TemplateError naming the field as
        the template wrote it (InvalidMessage for what no process can carry)."""
        problems = jobschema.coerce(spec, jobschema.JOB_SPEC)
        problems += [
            jobschema.SchemaProblem(("metadata", *p.path), p.text)
            for p in jobschema.coerce(metadata, jobschema.OBJECT_META)
        ]
        if not problems:
            return
        reason = "InvalidMessage" if "NUL byte" in problems[0].text else "TemplateError"
        detail = "; ".join(
            f"{self._where_rendered(p.path if p.path[:1] == ('metadata',) else ('spec', *p.path))}"
            f": {p.text}"
            for p in problems[:5]
        )
        raise RenderError(reason, detail)

    def _check_schema(self, job: dict[str, Any]) -> None:
        """The whole Job, with what jobrunner added (the message's id and headers in
        env): anything wrong now came with the message itself."""
        problems = jobschema.coerce(job)
        if problems:
            detail = "; ".join(f"field {p.field()}: {p.text}" for p in problems[:5])
            raise RenderError("InvalidMessage", detail)

    def _keep_original(
        self, job: dict[str, Any], delivery: Delivery, placement: _Placement
    ) -> bool:
        """Where the original message is kept for a later dead letter: True for the
        Secret. An annotation only when the body is in the Job's spec already (env or
        args) and it fits well within the annotations' 256 KiB: a body delivered as a
        file stays in the Secret alone, since whoever may ``get jobs`` could read an
        annotation (and the Job's spec too, which is why env is no place for secrets).
        A dispatcher that may not read message Secrets (``copy_in_job_only``) keeps every
        copy in the annotation: the chart's owner traded that for the operator reading no
        Secret of a tenant's (README, Security)."""
        if not placement.in_env and not self._copy_in_job_only:
            return True
        annotations = job["metadata"]["annotations"]
        original = _original(delivery, with_body=True)
        if (
            len(original) > ORIGINAL_IN_ANNOTATION_MAX
            or _annotations_size(annotations) + len(original) > limits.ANNOTATIONS_MAX
        ):
            if self._copy_in_job_only:
                # Refused before any Job exists: a Job that came to own this message (an
                # onJobCreation ack, a hand-over) and failed could not be dead-lettered.
                raise RenderError(
                    "MessageTooLarge",
                    f"the copy of the message a Job keeps is {len(original)} bytes, over the "
                    f"{ORIGINAL_IN_ANNOTATION_MAX} kept in its annotations, and this "
                    "dispatcher may not read message Secrets back "
                    "(JOBRUNNER_DISPATCHER__READ_MESSAGE_SECRETS=false, the chart's "
                    "permissions.operator.restrict.secret); send a large body by "
                    "reference instead, or turn the restriction off",
                )
            return True
        annotations[ANNOTATION_ORIGINAL_MESSAGE] = original
        return False

    def _secret(
        self,
        delivery: Delivery,
        name: str,
        *,
        with_original: bool,
        extra: Mapping[str, bytes] | None = None,
    ) -> dict[str, Any]:
        data = {
            "body": delivery.body,
            "headers.json": json.dumps(dict(delivery.headers), sort_keys=True).encode(),
            "metadata.json": json.dumps(dict(delivery.metadata), sort_keys=True).encode(),
            **(extra or {}),
        }
        if with_original:
            # The body is already the Secret's "body"; the copy keeps the rest.
            data["original.json"] = _original(delivery, with_body=False).encode()
        size = sum(len(v) for v in data.values())
        if size > limits.SECRET_DATA_MAX:
            raise RenderError(
                "MessageTooLarge",
                f"the message with its headers is {size} bytes, over the 1 MiB a Kubernetes "
                "Secret holds",
            )
        sj = self.scaledjob
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": sj.namespace,
                "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SCALEDJOB: sj.name},
                # The Job's own digest: a Secret found under this name is used only when
                # it holds this body (see jobrunner.rendering.messagesecret).
                "annotations": {ANNOTATION_BODY_DIGEST: hashlib.sha256(delivery.body).hexdigest()},
            },
            "data": {k: _b64(v) for k, v in data.items()},
        }

    def _check_limits(self, job: dict[str, Any]) -> None:
        """Annotations, the object's size, and each container's argv and environment."""
        for path, notes in (
            (("metadata", "annotations"), job["metadata"].get("annotations") or {}),
            (
                ("spec", "template", "metadata", "annotations"),
                ((job["spec"].get("template") or {}).get("metadata") or {}).get("annotations")
                or {},
            ),
        ):
            size = _annotations_size(notes)
            if size > limits.ANNOTATIONS_MAX:
                raise RenderError(
                    "MessageTooLarge",
                    f"{self._where_rendered(path)}: {size} bytes, over the 256 KiB "
                    "Kubernetes allows for an object's annotations",
                )
        size = len(json.dumps(job).encode())
        if size > limits.OBJECT_MAX - 64 * 1024:
            raise RenderError(
                "MessageTooLarge",
                f"the Job would be {size} bytes, over what etcd stores in one object "
                "(1.5 MiB, less room for its status); pass large bodies as a file",
            )
        pod = job["spec"]["template"]["spec"]
        for kind in _CONTAINER_LISTS:
            for i, container in enumerate(pod.get(kind) or []):
                self._check_exec(container, ("spec", "template", "spec", kind, i))

    def _check_exec(self, container: Mapping[str, Any], path: tuple[str | int, ...]) -> None:
        """What execve() takes: no string over MAX_ARG_STRLEN, all together under
        ARG_MAX. Values are measured as the process sees them (``$$`` is one byte)."""
        total = 0
        strings: list[tuple[tuple[str | int, ...], int]] = []
        for key in ("command", "args"):
            for j, arg in enumerate(container.get(key) or []):
                strings.append(((*path, key, j), len(str(arg).replace("$$", "$").encode()) + 1))
        for j, item in enumerate(container.get("env") or []):
            value = str(item.get("value", "")).replace("$$", "$")
            length = len(str(item.get("name", "")).encode()) + 1 + len(value.encode()) + 1
            strings.append(((*path, "env", j, "value"), length))
        for where, length in strings:
            total += length
            if length > limits.MAX_ARG_STRLEN:
                raise RenderError(
                    "MessageTooLarge",
                    f"{self._where_rendered(where)}: {length} bytes, over the "
                    f"{limits.MAX_ARG_STRLEN} Linux passes in one argument or variable "
                    "(MAX_ARG_STRLEN); pass large text as a file",
                )
        if total > ARG_MAX:
            raise RenderError(
                "MessageTooLarge",
                f"{self._where_rendered(path)}: arguments and environment total {total} "
                f"bytes, over the {ARG_MAX} a process can be started with",
            )


def original_message(
    job: Mapping[str, Any], secret_data: Mapping[str, str] | None
) -> dict[str, Any] | None:
    """The original message kept with a Job (annotation, or the Secret's original.json
    with the Secret's body), with ``body`` as bytes; None when it keeps none."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(ANNOTATION_ORIGINAL_MESSAGE)
    if secret_data and "original.json" in secret_data:
        # The Secret's copy wins: a Job's annotations may have been written by a pod
        # with rights on Jobs, its Secret only by the dispatcher.
        raw = base64.b64decode(secret_data["original.json"]).decode()
    if raw is None:
        return None
    value: dict[str, Any] = json.loads(raw)
    if "body" in value:
        value["body"] = base64.b64decode(value["body"])
    elif secret_data and "body" in secret_data:
        value["body"] = base64.b64decode(secret_data["body"])
    else:
        return None
    return value
