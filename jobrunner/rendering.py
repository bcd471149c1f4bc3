"""Turns a message into the Job (and, for large bodies, the Secret) that carries it.

Pure: no I/O, so ``jobrunner render`` can show offline exactly what would be created.

Safety: the Job template is parsed first, and only its string *values* are Jinja2
templates, each rendered on its own in a ``SandboxedEnvironment`` with
``StrictUndefined``. Rendered text is never parsed again, so nothing in a message (YAML,
JSON, quotes, newlines, ``{{ }}``) can add, remove or reshape a field of the Job.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import yaml

from jobrunner.config import DeliveryMode, ManifestError, ScaledJob
from jobrunner.models import (
    ANNOTATION_ACK_POLICY,
    ANNOTATION_MESSAGE_ID,
    ANNOTATION_SOURCE_DETAIL,
    LABEL_KEDA_SCALEDJOB,
    LABEL_MANAGED_BY,
    LABEL_MESSAGE_KEY,
    LABEL_SCALEDJOB,
    LABEL_SOURCE,
    MANAGED_BY,
    Delivery,
)
from jobrunner.naming import job_name, message_key, message_secret_name

ANNOTATION_ORIGINAL_MESSAGE = "jobrunner.dev/original-message"
# A Job's annotations may total 256 KiB; keep the original message there only when it
# is well below that, else in the per-Job Secret.
ORIGINAL_IN_ANNOTATION_MAX = 96 * 1024
MESSAGE_VOLUME = "jobrunner-message"


class RenderError(Exception):
    """A message that cannot become a Job. ``reason`` is a short CamelCase code used in
    dead-letter headers; the text says what went wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class MessageView:
    """What a template sees as ``message``. ``json`` parses the body on first use."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self.id = delivery.message_id
        self.identity = delivery.identity
        self.headers = dict(delivery.headers)
        self.metadata = dict(delivery.metadata)
        self.source = delivery.source
        self.content_type = delivery.content_type
        self.size = len(delivery.body)

    @cached_property
    def body(self) -> str:
        return self._delivery.body.decode("utf-8", errors="replace")

    @cached_property
    def json(self) -> Any:
        try:
            return json.loads(self._delivery.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RenderError(
                "InvalidMessage",
                f"the template reads message.json but the body is not JSON ({exc})",
            ) from None


def _b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def _environment() -> jinja2.sandbox.SandboxedEnvironment:
    env = jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )
    env.filters["b64encode"] = _b64
    env.filters["tojson"] = lambda v: json.dumps(v, sort_keys=True)
    return env


Compiled = Callable[[Mapping[str, Any]], Any]


def _compile(node: Any, env: jinja2.Environment, path: str) -> Compiled:
    """Pre-compile every string leaf; a syntax error names its field at start-up."""
    if isinstance(node, dict):
        parts = {k: _compile(v, env, f"{path}.{k}") for k, v in node.items()}
        return lambda ctx: {k: fn(ctx) for k, fn in parts.items()}
    if isinstance(node, list):
        items = [_compile(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
        return lambda ctx: [fn(ctx) for fn in items]
    if isinstance(node, str) and ("{{" in node or "{%" in node or "{#" in node):
        try:
            template = env.from_string(node)
        except jinja2.TemplateSyntaxError as exc:
            raise ManifestError(f"field {path}: template syntax error: {exc.message}") from None

        def render(ctx: Mapping[str, Any], template: jinja2.Template = template) -> str:
            try:
                return template.render(ctx)
            except RenderError:
                raise
            except jinja2.UndefinedError as exc:
                raise RenderError("TemplateError", f"field {path}: {exc.message}") from None
            except jinja2.exceptions.SecurityError as exc:
                raise RenderError("TemplateError", f"field {path}: blocked: {exc}") from None
            except Exception as exc:
                raise RenderError(
                    "TemplateError", f"field {path}: {type(exc).__name__}: {exc}"
                ) from None

        return render
    return lambda ctx: copy.deepcopy(node)


@dataclass(frozen=True)
class RenderedJob:
    name: str
    job: dict[str, Any]
    secret: dict[str, Any] | None
    """Per-Job Secret holding the message, created before the Job and then owned by it."""


def load_job_template(scaledjob: ScaledJob, *, base_dirs: list[Path]) -> dict[str, Any]:
    """The Job skeleton: ``{"metadata": {...}, "spec": JobSpec}`` from jobTargetRef or a
    template file (a Job or a bare JobSpec)."""
    spec = scaledjob.spec
    if spec.jobTargetRef is not None:
        return {"metadata": {}, "spec": copy.deepcopy(spec.jobTargetRef)}
    assert spec.jobTemplate is not None
    candidates = [Path(spec.jobTemplate)] + [d / spec.jobTemplate for d in base_dirs]
    for candidate in candidates:
        if candidate.is_file():
            try:
                doc = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError as exc:
                raise ManifestError(
                    f"field spec.jobTemplate: {candidate}: not valid YAML: {exc}"
                ) from None
            if not isinstance(doc, dict):
                raise ManifestError(
                    f"field spec.jobTemplate: {candidate}: expected a Job or JobSpec mapping"
                )
            if doc.get("kind") == "Job":
                meta = doc.get("metadata") or {}
                return {
                    "metadata": {k: meta[k] for k in ("labels", "annotations") if k in meta},
                    "spec": doc.get("spec") or {},
                }
            return {"metadata": {}, "spec": doc}
    tried = ", ".join(str(c) for c in candidates)
    raise ManifestError(f"field spec.jobTemplate: file not found (tried {tried})")


def _check_job_spec(spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ManifestError("field spec.jobTargetRef: expected a JobSpec mapping")
    template = spec.get("template")
    pod = template.get("spec") if isinstance(template, dict) else None
    containers = pod.get("containers") if isinstance(pod, dict) else None
    if not isinstance(containers, list) or not containers:
        raise ManifestError(
            "field spec.jobTargetRef.template.spec.containers: at least one container is required"
        )
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name"):
            raise ManifestError(
                f"field spec.jobTargetRef.template.spec.containers[{i}].name: required"
            )


class Renderer:
    """Renders Jobs for one ScaledJob; construct once at start (templates compile then)."""

    def __init__(self, scaledjob: ScaledJob, *, base_dirs: list[Path] | None = None) -> None:
        self.scaledjob = scaledjob
        skeleton = load_job_template(scaledjob, base_dirs=base_dirs or [])
        _check_job_spec(skeleton["spec"])
        self._compiled = _compile(skeleton, _environment(), "spec.jobTargetRef")

    def render(
        self, delivery: Delivery, *, extra_env: Mapping[str, str] | None = None
    ) -> RenderedJob:
        """The Job for ``delivery``; ``extra_env`` (such as the trace context) is added to
        the same containers as the message."""
        sj = self.scaledjob
        delivery_cfg = sj.spec.messageDelivery
        body = delivery.body
        if len(body) > delivery_cfg.maxMessageBytes:
            raise RenderError(
                "MessageTooLarge",
                f"body is {len(body)} bytes, over messageDelivery.maxMessageBytes "
                f"({delivery_cfg.maxMessageBytes})",
            )
        name = job_name(sj.name, delivery.identity)
        context = {
            "message": MessageView(delivery),
            "scaledjob": {"name": sj.name, "namespace": sj.namespace},
            "job": {"name": name},
        }
        rendered = self._compiled(context)
        job_meta = rendered.get("metadata") or {}
        spec = rendered["spec"]
        pod_template = spec.setdefault("template", {})
        pod_meta = pod_template.setdefault("metadata", {}) or {}
        pod_template["metadata"] = pod_meta
        pod_spec = pod_template["spec"]
        pod_spec.setdefault("restartPolicy", "Never")

        labels = {
            LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_SCALEDJOB: sj.name,
            LABEL_KEDA_SCALEDJOB: sj.name,
            LABEL_SOURCE: delivery.source,
            LABEL_MESSAGE_KEY: message_key(sj.name, delivery.identity),
        }
        annotations = {
            ANNOTATION_MESSAGE_ID: delivery.identity,
            ANNOTATION_SOURCE_DETAIL: json.dumps(dict(delivery.metadata), sort_keys=True),
            ANNOTATION_ACK_POLICY: sj.spec.ackPolicy.value,
        }
        original = json.dumps(
            {
                "body": _b64(body),
                "message_id": delivery.message_id,
                "headers": dict(delivery.headers),
                "content_type": delivery.content_type,
                "metadata": dict(delivery.metadata),
            },
            sort_keys=True,
        )

        mode = delivery_cfg.mode
        body_is_text = _is_text(body)
        in_env = mode in (DeliveryMode.ENV, DeliveryMode.ARGS) or (
            mode is DeliveryMode.AUTO and len(body) <= delivery_cfg.maxEnvBytes
        )
        if in_env and mode is not DeliveryMode.AUTO and len(body) > delivery_cfg.maxEnvBytes:
            raise RenderError(
                "MessageTooLarge",
                f"body is {len(body)} bytes, over messageDelivery.maxEnvBytes "
                f"({delivery_cfg.maxEnvBytes}) for mode {mode.value}",
            )
        keep_in_secret = len(original) > ORIGINAL_IN_ANNOTATION_MAX
        needs_secret = not in_env or keep_in_secret
        if not keep_in_secret:
            annotations[ANNOTATION_ORIGINAL_MESSAGE] = original

        # The kubelet expands $(VAR) in env values; message text is escaped so that it
        # arrives exactly as sent ("$$" is the kubelet's literal "$").
        env: list[dict[str, Any]] = [
            {"name": "JOBRUNNER_SOURCE", "value": delivery.source},
            {"name": "JOBRUNNER_SCALEDJOB", "value": sj.name},
            {"name": "JOBRUNNER_JOB_NAME", "value": name},
            {
                "name": "JOBRUNNER_MESSAGE_ID",
                "value": _literal(delivery.message_id or delivery.identity),
            },
            {
                "name": "JOBRUNNER_MESSAGE_HEADERS",
                "value": _literal(json.dumps(dict(delivery.headers), sort_keys=True)),
            },
            {
                "name": "JOBRUNNER_MESSAGE_METADATA",
                "value": _literal(json.dumps(dict(delivery.metadata), sort_keys=True)),
            },
            {"name": "JOBRUNNER_MESSAGE_ENCODING", "value": "utf-8" if body_is_text else "base64"},
        ]
        env.extend({"name": k, "value": v} for k, v in (extra_env or {}).items() if v)
        if in_env:
            value = body.decode("utf-8") if body_is_text else _b64(body)
            env.append({"name": delivery_cfg.envVarName, "value": _literal(value)})
        secret_name = message_secret_name(name)
        if not in_env:
            env.append(
                {"name": "JOBRUNNER_MESSAGE_FILE", "value": f"{delivery_cfg.mountPath}/body"}
            )
            volumes = pod_spec.setdefault("volumes", [])
            volumes.append({"name": MESSAGE_VOLUME, "secret": {"secretName": secret_name}})

        targets = delivery_cfg.containers
        for container in pod_spec["containers"]:
            if targets is not None and container.get("name") not in targets:
                continue
            container["env"] = [*env, *(container.get("env") or [])]
            if not in_env:
                mounts = container.setdefault("volumeMounts", [])
                mounts.append(
                    {"name": MESSAGE_VOLUME, "mountPath": delivery_cfg.mountPath, "readOnly": True}
                )
            if mode is DeliveryMode.ARGS:
                container["args"] = [
                    *(container.get("args") or []),
                    f"$({delivery_cfg.envVarName})",
                ]

        pod_meta["labels"] = {
            **(pod_meta.get("labels") or {}),
            **{
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_SCALEDJOB: sj.name,
            },
        }
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": sj.namespace,
                "labels": {**(job_meta.get("labels") or {}), **labels},
                "annotations": {**(job_meta.get("annotations") or {}), **annotations},
            },
            "spec": spec,
        }
        secret = None
        if needs_secret:
            data = {
                "body": _b64(body),
                "headers.json": _b64(json.dumps(dict(delivery.headers), sort_keys=True)),
                "metadata.json": _b64(json.dumps(dict(delivery.metadata), sort_keys=True)),
            }
            if keep_in_secret:
                data["original.json"] = _b64(original)
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": secret_name,
                    "namespace": sj.namespace,
                    "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SCALEDJOB: sj.name},
                },
                "data": data,
            }
        return RenderedJob(name=name, job=job, secret=secret)


def _literal(text: str) -> str:
    """``text`` as an env value the kubelet's ``$(VAR)`` expansion leaves unchanged."""
    return text.replace("$", "$$")


def _is_text(body: bytes) -> bool:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    # NUL cannot travel in an env var.
    return "\x00" not in text


def original_message(
    job: Mapping[str, Any], secret_data: Mapping[str, str] | None
) -> dict[str, Any] | None:
    """The original message kept with a Job (annotation, or the Secret's original.json)."""
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(ANNOTATION_ORIGINAL_MESSAGE)
    if raw is None and secret_data and "original.json" in secret_data:
        raw = base64.b64decode(secret_data["original.json"]).decode()
    if raw is None:
        return None
    value: dict[str, Any] = json.loads(raw)
    value["body"] = base64.b64decode(value["body"])
    return value
