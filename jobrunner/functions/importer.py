"""``jobrunner functions import DIR``: a function app -> one ScaledJob manifest per
function that a message triggers.

Reads ``host.json``, each ``*/function.json`` (the v1 folder model, and what custom
handlers use) or a Python v2 ``function_app.py``, and ``local.settings.json`` (its
``Values``) when present. Triggers map as Azure Functions Core Tools maps them to KEDA
(src/Cli/func/Kubernetes/KEDA/KedaResourceBase.cs ``GetKedaTriggerType`` and
V2/KedaV2Resource.cs): ``queueTrigger`` -> ``azure-queue``, ``rabbitMQTrigger`` ->
``rabbitmq``, ``kafkaTrigger`` -> ``kafka`` (``brokerList`` -> ``bootstrapServers``);
``%Setting%`` values are resolved from the app settings (Core Tools copies them
literally, which KEDA never resolves). Connection strings never land in the ScaledJob:
a TriggerAuthentication takes them from the Secret ``<app>-settings`` (written from
``local.settings.json`` beside it, as ``func kubernetes deploy`` writes its Secret).
Functions whose trigger jobrunner cannot consume (HTTP, timer, blob, Service Bus, ...)
or that use bindings it cannot honour (input bindings, outputs other than ``queue``,
``rabbitMQ`` and ``kafka``) are listed with the reason, never dropped silently.

Python v2 apps are indexed as the Python worker indexes them: by importing
``function_app.py`` and asking its ``FunctionApp`` for each function's bindings (the
same JSON ``get_function_json`` gives the host), in a separate interpreter (``--python``,
default this one, which has ``azure-functions``), so blueprints and defaults come out
exactly as the Functions host would see them. Importing runs the app's module code.

Each Job runs the in-Job invoker (jobrunner.functions.invoker): for a custom handler,
the handler is a native sidecar with a startup probe on its port and the invoker runs
in the jobrunner image; for a Python app, an init container copies the invoker from the
jobrunner image into an ``emptyDir`` and the function's own image runs it. With
``--local`` the manifests run on this machine (the local executor: images are ignored,
paths are this machine's).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobrunner.core.naming import dns_label
from jobrunner.core.privatefs import write_private
from jobrunner.functions.policy import invoker_policy
from jobrunner.manifest.loader import load_json
from jobrunner.manifest.scaledjob import ManifestError

APP_ROOT = "/home/site/wwwroot"
"""Where Functions images keep the app (AzureWebJobsScriptRoot in the official images)."""
INVOKER_MOUNT = "/jobrunner"
DEFAULT_TIMEOUT_SECONDS = 1800
"""The host's functionTimeout outside the Consumption plan (30 min)."""
_SETTING = re.compile(r"%([^%]+)%")
APP_NAME_MAX = 24
"""An app's name is at most this long: ``<app>-settings``, ``<app>-invoker`` and the
admission policy's name are built from it."""
SCALEDJOB_NAME_MAX = 40
"""A function's ScaledJob name (``<app>-<function>``) is at most this long: Job names
take it as their prefix (jobrunner.core.naming), and TriggerAuthentications add
``-trigger`` / ``-out<i>``."""
HASH_CHARS = 8
"""Hex digits of SHA-256 that tell apart names that had to be cut or changed."""


def kube_name(text: str, limit: int) -> str:
    """``text`` as a DNS label (RFC 1123: ``[a-z0-9-]``, at most ``limit``) that names
    nothing else: lower-cased only, when that is all it takes (function and app names
    are case-insensitive to the Functions host), else cut to ``limit`` - 9 characters
    and suffixed with ``-`` and HASH_CHARS hex digits of SHA-256 of the lower-cased
    text, so two names that share a long prefix, or differ only in the characters a
    label cannot hold (``Process_Order``, ``Process.Order``), stay two names, and the
    same name is the same label on every import."""
    lowered = text.lower()
    label = dns_label(lowered, 1_000_000)
    if label == lowered and len(label) <= limit:
        return label
    digest = hashlib.sha256(lowered.encode()).hexdigest()[:HASH_CHARS]
    return f"{dns_label(lowered, limit - HASH_CHARS - 1)}-{digest}"


_TRIGGERS = {"queuetrigger": "azure-queue", "rabbitmqtrigger": "rabbitmq", "kafkatrigger": "kafka"}
_OUTPUTS = {"queue": "azure-queue", "rabbitmq": "rabbitmq", "kafka": "kafka"}
_WHY_NOT = {
    "httptrigger": "an HTTP function answers requests, not messages: run it as a Deployment "
    "(func kubernetes deploy)",
    "timertrigger": "a timer fires on a schedule, not per message: a Kubernetes CronJob fits",
}

_INDEX_V2 = r"""
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
import azure.functions as func
spec = importlib.util.spec_from_file_location("function_app", sys.argv[2])
module = importlib.util.module_from_spec(spec)
sys.modules["function_app"] = module
spec.loader.exec_module(module)
apps = [v for v in vars(module).values() if isinstance(v, func.FunctionRegister)]
if len(apps) != 1:
    sys.exit(f"{sys.argv[2]} must define exactly one FunctionApp at top level; found {len(apps)}")
print(json.dumps([
    {"name": f.get_function_name(), "bindings": json.loads(f.get_function_json())["bindings"]}
    for f in apps[0].get_functions()
]))
"""


@dataclass(frozen=True)
class Function:
    name: str
    bindings: list[dict[str, Any]]
    origin: str
    """Where it was declared (a function.json, or function_app.py)."""


@dataclass
class App:
    """A function app as read from its directory."""

    path: Path
    name: str
    host: dict[str, Any]
    settings: dict[str, str]
    functions: list[Function]
    model: str
    """``custom`` (a custom handler), ``python-v1`` or ``python-v2``."""


@dataclass
class Imported:
    written: list[tuple[Path, str]] = field(default_factory=list)
    """Each manifest written, with a line saying what it maps."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(function, why) for each function not imported."""


class Unsupported(Exception):
    """This function cannot run under jobrunner; the text says why."""


def _read_json(path: Path) -> Any:
    """host.json, local.settings.json, function.json: a duplicate key refused with both
    lines (see config.load_json)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except ValueError as exc:
        raise ManifestError(f"{path}: not UTF-8 ({exc}); save the file as UTF-8") from None
    return load_json(text, path)


def read_app(directory: Path, *, python: str | None = None, name: str | None = None) -> App:
    """The function app in ``directory``; ManifestError when it is not one."""
    host_file = directory / "host.json"
    if directory.is_file():  # the app's host.json itself, or another file of it
        raise ManifestError(
            f"{directory}: is a file; give the function app's directory "
            f"(the one holding host.json, e.g. {directory.parent})"
        )
    if not host_file.is_file():
        raise ManifestError(f"{directory}: no host.json; give a function app's directory")
    host = _read_json(host_file)
    settings: dict[str, str] = {}
    local = directory / "local.settings.json"
    if local.is_file():
        settings = {str(k): str(v) for k, v in (_read_json(local).get("Values") or {}).items()}
    functions = [
        Function(p.parent.name, list(_read_json(p).get("bindings") or []), str(p))
        for p in sorted(directory.glob("*/function.json"))
    ]
    model = "custom" if ("customHandler" in host or "httpWorker" in host) else "python-v1"
    script = directory / "function_app.py"
    if script.is_file() and model != "custom":
        model = "python-v2"
        functions += _index_v2(directory, script, python or sys.executable)
    if not functions:
        raise ManifestError(
            f"{directory}: no functions (no */function.json and no function_app.py)"
        )
    return App(
        path=directory,
        name=kube_name(name or directory.resolve().name, APP_NAME_MAX),
        host=host,
        settings=settings,
        functions=functions,
        model=model,
    )


def _index_v2(directory: Path, script: Path, python: str) -> list[Function]:
    done = subprocess.run(
        [python, "-c", _INDEX_V2, str(directory.resolve()), str(script.resolve())],
        capture_output=True,
        text=True,
        cwd=directory,
        timeout=120,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ManifestError(
            f"{script}: indexing the app with {python} failed: {tail} (the interpreter needs "
            "azure-functions and the app's own dependencies; pass --python)"
        )
    return [Function(f["name"], f["bindings"], str(script)) for f in json.loads(done.stdout)]


def resolve_settings(value: Any, settings: Mapping[str, str], where: str) -> Any:
    """``%Name%`` in a string value replaced by the app setting ``Name`` (the host's
    binding expression for app settings); Unsupported naming a missing one."""
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in settings:
            raise Unsupported(
                f"{where}: {value!r} names app setting {key}, which local.settings.json does "
                f"not have; add it there or pass --setting {key}=VALUE"
            )
        return settings[key]

    return _SETTING.sub(sub, value)


def _direction(binding: Mapping[str, Any]) -> str:
    return str(binding.get("direction", "")).lower()


def _connection_setting(name: str | None, settings: Mapping[str, str], default: str) -> str:
    """The app setting a ``connection`` names: empty -> ``default``; a name without the
    ``AzureWebJobs`` prefix also finds ``AzureWebJobs<name>`` (the host's rule)."""
    if not name:
        return default
    if name not in settings and f"AzureWebJobs{name}" in settings:
        return f"AzureWebJobs{name}"
    return name


@dataclass
class Destination:
    """A trigger or output mapped to jobrunner: type, metadata, and the parameters a
    TriggerAuthentication takes from the settings Secret (parameter -> setting)."""

    type: str
    metadata: dict[str, str]
    secrets: dict[str, str] = field(default_factory=dict)


def map_binding(
    binding: Mapping[str, Any], app: App, where: str, *, output: bool = False
) -> Destination:
    """One trigger (or queue-type output) binding as a jobrunner destination."""
    kind = str(binding.get("type", "")).lower()
    values = {k: resolve_settings(v, app.settings, f"{where}.{k}") for k, v in binding.items()}
    if kind in ("queuetrigger", "queue"):
        setting = _connection_setting(values.get("connection"), app.settings, "AzureWebJobsStorage")
        encoding = ((app.host.get("extensions") or {}).get("queues") or {}).get(
            "messageEncoding"
        ) or "base64"
        return Destination(
            "azure-queue",
            {"queueName": str(values.get("queueName", "")), "messageEncoding": str(encoding)},
            {"connection": setting},
        )
    if kind in ("rabbitmqtrigger", "rabbitmq"):
        host_setting = values.get("connectionStringSetting")
        if not host_setting:
            raise Unsupported(f"{where}: connectionStringSetting is required")
        return Destination(
            "rabbitmq",
            {"queueName": str(values.get("queueName", ""))},
            {"host": str(host_setting)},
        )
    if kind in ("kafkatrigger", "kafka"):
        metadata = {
            "topic": str(values.get("topic", "")),
            "bootstrapServers": str(values.get("brokerList", "")),
        }
        if not output:
            metadata["consumerGroup"] = str(values.get("consumerGroup") or f"{app.name}-group")
        mode = str(values.get("authenticationMode", "")).lower()
        sasl = {"plain": "plaintext", "scramsha256": "scram_sha256", "scramsha512": "scram_sha512"}
        secrets: dict[str, str] = {}
        if mode in sasl:
            metadata["sasl"] = sasl[mode]
            for key in ("username", "password"):
                raw = str(binding.get(key, ""))
                found = _SETTING.fullmatch(raw)
                if not found:
                    raise Unsupported(
                        f"{where}.{key}: give it as %Setting% so it stays in the Secret"
                    )
                secrets[key] = found.group(1)
        elif mode:
            raise Unsupported(f"{where}: authenticationMode {mode} is not supported")
        if str(values.get("protocol", "")).lower() in ("ssl", "saslssl"):
            metadata["tls"] = "enable"
        return Destination("kafka", metadata, secrets)
    raise Unsupported(f"{where}: type {binding.get('type')} cannot be mapped")


@dataclass(frozen=True)
class Options:
    out: Path
    image: str
    jobrunner_image: str
    local: bool = False
    python: str | None = None
    port: int = 8080
    namespace: str | None = None
    """Put every object in this namespace (default: none given, i.e. kubectl's)."""
    embedded: bool = False
    """Triggers and queue outputs on the embedded queue (``type: sqlite``), same queue
    names: the app runs with no broker at all (``jobrunner publish`` fills it)."""


def plan_function(app: App, function: Function, options: Options) -> list[dict[str, Any]]:
    """The documents for one function: Secret, TriggerAuthentication(s), ScaledJob.
    Unsupported when jobrunner cannot run it."""
    where = f"{function.origin}: function {function.name}"
    trigger = _trigger_binding(function, where)
    outputs = _output_destinations(app, function, trigger, where)
    source = map_binding(trigger, app, f"{where}: binding {trigger.get('name')}")
    if options.embedded:
        source = _embedded(source)
        outputs = [(b, _embedded(d)) for b, d in outputs]
    name = kube_name(f"{app.name}-{function.name}", SCALEDJOB_NAME_MAX)
    settings_secret = f"{app.name}-settings"
    docs: list[dict[str, Any]] = [_secret(app, settings_secret)]
    trigger_doc: dict[str, Any] = {"type": source.type, "metadata": source.metadata}
    if source.secrets:  # a trigger that needs none gets no TriggerAuthentication
        auth_name = f"{name}-trigger"
        docs.append(_authentication(auth_name, settings_secret, source.secrets))
        trigger_doc["authenticationRef"] = {"name": auth_name}
    output_specs, output_auths = _output_specs(outputs, name=name, settings_secret=settings_secret)
    docs.extend(output_auths)
    kind = str(trigger.get("type", "")).lower()
    job = _job(
        app,
        function,
        str(trigger.get("name", "msg")),
        [b for b, _ in outputs],
        options,
        tries=_tries(app) if kind == "queuetrigger" else 1,
    )
    docs.append(
        _scaledjob(
            app,
            function=function,
            name=name,
            job=job,
            trigger=trigger_doc,
            outputs=output_specs,
        )
    )
    return docs


def _trigger_binding(function: Function, where: str) -> Mapping[str, Any]:
    """The function's one trigger binding; Unsupported when it has none or several, or
    when jobrunner has no source for its type."""
    triggers = [
        b
        for b in function.bindings
        if _direction(b) == "in" and str(b.get("type", "")).lower().endswith("trigger")
    ]
    if len(triggers) != 1:
        raise Unsupported(f"{where}: {len(triggers)} trigger bindings; a function has one")
    trigger = triggers[0]
    kind = str(trigger.get("type", "")).lower()
    if kind not in _TRIGGERS:
        why = _WHY_NOT.get(
            kind,
            f"jobrunner has no source for {trigger.get('type')} (it imports queueTrigger, "
            "rabbitMQTrigger and kafkaTrigger)",
        )
        raise Unsupported(f"{trigger.get('type')}: {why}")
    return trigger


def _output_destinations(
    app: App, function: Function, trigger: Mapping[str, Any], where: str
) -> list[tuple[str, Destination]]:
    """Every binding but the trigger, as (binding name, destination); Unsupported for an
    input binding or an output jobrunner cannot publish to."""
    outputs: list[tuple[str, Destination]] = []
    for binding in function.bindings:
        if binding is trigger:
            continue
        bname = str(binding.get("name", ""))
        btype = str(binding.get("type", ""))
        if _direction(binding) != "out":
            raise Unsupported(
                f"input binding {bname!r} ({btype}): input bindings are not supported"
            )
        if btype.lower() not in _OUTPUTS:
            raise Unsupported(
                f"output binding {bname!r} ({btype}): jobrunner publishes queue, rabbitMQ and "
                "kafka outputs only"
            )
        outputs.append((bname, map_binding(binding, app, f"{where}: binding {bname}", output=True)))
    return outputs


def _output_specs(
    outputs: list[tuple[str, Destination]], *, name: str, settings_secret: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ScaledJob's ``function.outputs``, and a TriggerAuthentication for each output
    that takes secrets from the settings Secret."""
    output_specs = []
    docs: list[dict[str, Any]] = []
    for i, (bname, dest) in enumerate(outputs):
        spec: dict[str, Any] = {"name": bname, "type": dest.type, "metadata": dest.metadata}
        if dest.secrets:
            out_auth = f"{name}-out{i}"
            docs.append(_authentication(out_auth, settings_secret, dest.secrets))
            spec["authenticationRef"] = {"name": out_auth}
        output_specs.append(spec)
    return output_specs, docs


def _scaledjob(
    app: App,
    *,
    function: Function,
    name: str,
    job: dict[str, Any],
    trigger: dict[str, Any],
    outputs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The function's ScaledJob: its Job template, its one trigger and its outputs."""
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {
            "name": name,
            "labels": {"jobrunner.dev/function-app": app.name},
            "annotations": {"jobrunner.dev/imported-from": function.origin},
        },
        "spec": {
            "jobTargetRef": job,
            "triggers": [trigger],
            "function": {"name": function.name, "outputs": outputs},
            "messageDelivery": {"containers": [_message_container(app)]},
        },
    }


def _embedded(destination: Destination) -> Destination:
    name = destination.metadata.get("queueName") or destination.metadata.get("topic") or ""
    return Destination("sqlite", {"queueName": name})


def _message_container(app: App) -> str:
    return "invoker" if app.model == "custom" else "function"


def _secret(app: App, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"jobrunner.dev/function-app": app.name}},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(app.settings.items())},
    }


def _authentication(name: str, secret: str, parameters: Mapping[str, str]) -> dict[str, Any]:
    # The ScaledJob's own group: the operator resolves a jobrunner.dev ScaledJob's
    # authenticationRef among jobrunner.dev TriggerAuthentications only (keda.sh ones are
    # read for keda.sh ScaledJobs it takes over), so a keda.sh one is "not found" there.
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": name},
        "spec": {
            "secretTargetRef": [
                {"parameter": p, "name": secret, "key": key} for p, key in parameters.items()
            ]
        },
    }


MAX_TRIES = 1000
"""The most tries ``maxDequeueCount`` may ask for (the Job controller's per-index limit is
far higher; a function tried more often than this is better dead-lettered)."""


def _tries(app: App) -> int:
    """host.json ``extensions.queues.maxDequeueCount``: how many times a queue message is
    tried before it is poisoned (default 5; Azure docs, "host.json settings: queues" and
    "Azure Queue storage trigger: poison messages"). Unsupported when not a whole number
    from 1 to MAX_TRIES."""
    queues = (app.host.get("extensions") or {}).get("queues") or {}
    raw: object = queues.get("maxDequeueCount", 5)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_TRIES:
        raise Unsupported(
            f"{app.path / 'host.json'}: extensions.queues.maxDequeueCount is {raw!r}; give a "
            f"whole number of tries from 1 to {MAX_TRIES}"
        )
    return int(raw)


BACKOFF_CAP_SECONDS = 360
"""The Job controller's back-off between failed pods: 10 s, doubling, at most 6 min
(kubernetes.io "Jobs: Pod backoff failure policy")."""
TRY_OVERHEAD_SECONDS = 300
"""What a try may spend outside the function: pod start, image pull, the handler's
start (the invoker waits 60 s for it) and the key (10 s)."""


def _job_deadline(timeout: int, tries: int) -> int:
    """``activeDeadlineSeconds`` for a function's Job: a bound over all its tries that
    never cuts one short (``functionTimeout`` is a per-try limit, which the invoker
    enforces): each try its timeout and TRY_OVERHEAD_SECONDS, plus the back-off before
    each retry."""
    backoff = sum(min(BACKOFF_CAP_SECONDS, 10 << i) for i in range(tries - 1))
    return tries * (timeout + TRY_OVERHEAD_SECONDS) + backoff


def _timeout(app: App) -> int | None:
    """host.json functionTimeout (``hh:mm:ss``; ``-1`` = none) in seconds."""
    raw = str(app.host.get("functionTimeout") or "")
    if raw in ("-1", "-1:00:00"):
        return None
    if not raw:
        return DEFAULT_TIMEOUT_SECONDS
    days, _, clock = raw.rpartition(".")
    parts = [int(float(p)) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days or 0) * 86400) + parts[0] * 3600 + parts[1] * 60 + parts[2]


def _invoker_command(options: Options) -> list[str]:
    if options.local:
        return [sys.executable, "-m", "jobrunner.functions.invoker"]
    # python3, not python: Debian's and distroless images have no `python`, and every
    # image that has `python` (python:3.x, Azure Functions' own) has python3 as well.
    return ["python3", "-m", "jobrunner.functions.invoker"]


def _job(
    app: App,
    function: Function,
    binding: str,
    outputs: list[str],
    options: Options,
    *,
    tries: int = 1,
) -> dict[str, Any]:
    """The Job template: the function's pod, ``tries`` pods at most (``backoffLimit``),
    each invocation limited to host.json ``functionTimeout``."""
    root = str(app.path.resolve()) if options.local else APP_ROOT
    pod: dict[str, Any] = {"restartPolicy": "Never"}
    if not options.local:
        # The invoker records the result on its own Job (see rbac.yaml and policy.yaml).
        pod["serviceAccountName"] = f"{app.name}-invoker"
    out_arg = ["--outputs", ",".join(outputs)] if outputs else []
    timeout = _timeout(app)
    if timeout is not None:
        out_arg += ["--timeout", str(timeout)]
    if app.model == "custom":
        pod.update(
            _custom_handler_pod(
                app, function=function, binding=binding, out_arg=out_arg, options=options, root=root
            )
        )
    else:
        pod.update(_python_pod(app, function=function, out_arg=out_arg, options=options, root=root))
    # Each try one pod, as each try of the host is one dequeue (the invoker counts the
    # failed ones into DequeueCount).
    job: dict[str, Any] = {"backoffLimit": tries - 1, "template": {"spec": pod}}
    if timeout is not None:
        job["activeDeadlineSeconds"] = _job_deadline(timeout, tries)
    return job


def _function_env(app: App, root: str) -> list[dict[str, Any]]:
    """What the host tells a function's process: where the app is, which worker runs it."""
    return [
        {"name": "AzureWebJobsScriptRoot", "value": root},
        {
            "name": "FUNCTIONS_WORKER_RUNTIME",
            "value": "custom" if app.model == "custom" else "python",
        },
    ]


def _settings_env_from(app: App, options: Options) -> list[dict[str, Any]]:
    """The app's settings Secret as environment; none locally (they come from the app)."""
    return [] if options.local else [{"secretRef": {"name": f"{app.name}-settings"}}]


def _custom_handler_pod(
    app: App, *, function: Function, binding: str, out_arg: list[str], options: Options, root: str
) -> dict[str, Any]:
    """The containers of a custom-handler app's pod: the user's handler as a sidecar (an
    init container that keeps running) and the invoker, which hands it the message."""
    executable, args, cwd = _handler_command(app, options=options, root=root)
    if options.local:
        # Jobs share this machine's network: each gets its own port, from its name.
        port: Any = "{{ 10000 + (job.name[-4:] | int(base=16)) % 22000 }}"
    else:
        port = options.port
    handler = {
        "name": "handler",
        "image": options.image,
        "restartPolicy": "Always",
        "command": [executable, *[str(a) for a in args]],
        "workingDir": cwd,
        "env": [
            *_function_env(app, root),
            {"name": "FUNCTIONS_CUSTOMHANDLER_PORT", "value": str(port)},
            {"name": "FUNCTIONS_APP_ROOT_PATH", "value": root},
        ],
        "envFrom": _settings_env_from(app, options),
        "ports": (
            [{"name": "handler", "containerPort": options.port}] if not options.local else []
        ),
        "startupProbe": {
            "tcpSocket": {"port": port if options.local else "handler"},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
    }
    invoker = {
        "name": "invoker",
        "image": options.jobrunner_image,
        "command": [
            *_invoker_command(options),
            "custom-handler",
            "--function",
            function.name,
            "--port",
            str(port),
            "--binding",
            binding,
            *out_arg,
        ],
    }
    for container in (handler, invoker):
        if not container.get("envFrom"):
            container.pop("envFrom", None)
        if not container.get("ports"):
            container.pop("ports", None)
    return {"initContainers": [handler], "containers": [invoker]}


def _handler_command(app: App, *, options: Options, root: str) -> tuple[str, list[Any], str]:
    """host.json ``customHandler.description``: the handler's executable, its arguments
    (app settings resolved) and its working directory."""
    handler = app.host.get("customHandler") or app.host.get("httpWorker") or {}
    description = handler.get("description") or {}
    executable = str(description.get("defaultExecutablePath") or "")
    if not executable:
        raise Unsupported("host.json customHandler.description.defaultExecutablePath is empty")
    if options.local and (app.path / executable).exists():
        executable = str((app.path / executable).resolve())
    args = [
        resolve_settings(a, app.settings, "customHandler.arguments")
        for a in description.get("arguments") or []
    ]
    workdir = description.get("workingDirectory") or ""
    cwd = (
        str(Path(root) / workdir)
        if workdir and not Path(workdir).is_absolute()
        else (workdir or root)
    )
    return executable, args, cwd


def _python_pod(
    app: App, *, function: Function, out_arg: list[str], options: Options, root: str
) -> dict[str, Any]:
    """The volumes and containers of a Python app's pod: an init container copies the
    invoker into a shared volume, and the function's image runs it with the app."""
    interpreter = (options.python or sys.executable) if options.local else "python3"
    mount = [{"name": "jobrunner-invoker", "mountPath": INVOKER_MOUNT}]
    main: dict[str, Any] = {
        "name": "function",
        "image": options.image,
        "workingDir": root,
        "command": [
            interpreter,
            f"{INVOKER_MOUNT}/invoker.py",
            "python",
            "--app",
            root,
            "--function",
            function.name,
            *out_arg,
        ],
        "env": _function_env(app, root),
        "volumeMounts": mount,
    }
    env_from = _settings_env_from(app, options)
    if env_from:
        main["envFrom"] = env_from
    return {
        "volumes": [{"name": "jobrunner-invoker", "emptyDir": {}}],
        "initContainers": [
            {
                "name": "install-invoker",
                "image": options.jobrunner_image,
                "command": [*_invoker_command(options), "install", INVOKER_MOUNT],
                "volumeMounts": mount,
            }
        ],
        "containers": [main],
    }


def _rbac(app: App) -> list[dict[str, Any]]:
    """What the invoker needs in a cluster: to annotate its own Job (a PATCH: no read).
    RBAC cannot name the Job, so this grants every Job of the namespace; the admission
    policy (``<app>-policy.yaml``, jobrunner.functions.policy) narrows it to the pod's
    own Job and its result."""
    account = f"{app.name}-invoker"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": account},
            "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["patch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account}],
        },
    ]


_Planned = tuple[Path, list[dict[str, Any]], str, bool]
"""A file an import writes: path, documents, the line that reports it, whether private."""


def import_app(
    directory: Path,
    options: Options,
    *,
    name: str | None = None,
    settings: Mapping[str, str] | None = None,
) -> Imported:
    """Write one manifest per importable function into ``options.out``. Nothing is
    written when two functions would become the same file or the same object
    (ManifestError naming both; see ``_Names``)."""
    app = read_app(directory, python=options.python, name=name)
    app.settings.update(settings or {})
    result = Imported()
    names = _Names()
    planned: list[_Planned] = []
    for function in app.functions:
        try:
            docs = plan_function(app, function, options)
        except Unsupported as exc:
            result.skipped.append((function.name, str(exc)))
            continue
        planned.append(_function_file(function, docs, options=options, names=names))
    if planned and not options.local:
        planned.extend(_invoker_files(app, options=options, names=names))
    options.out.mkdir(parents=True, exist_ok=True)
    for path, docs, line, private in planned:
        text = yaml.safe_dump_all(docs, sort_keys=False)
        if private:
            write_private(path, text.encode())
        else:
            path.write_text(text)
        result.written.append((path, line))
    return result


def _function_file(
    function: Function, docs: list[dict[str, Any]], *, options: Options, names: _Names
) -> _Planned:
    """One function's file (named for its ScaledJob), claimed in ``names``, and the
    line that says what it runs."""
    if options.namespace:
        for doc in docs:
            doc["metadata"]["namespace"] = options.namespace
    scaledjob = docs[-1]
    path = options.out / f"{scaledjob['metadata']['name']}.yaml"
    what = f"function {function.name} ({function.origin})"
    names.claim(path, docs, what)
    trigger = scaledjob["spec"]["triggers"][0]
    outs = [f"{o['name']} -> {o['type']}" for o in scaledjob["spec"]["function"]["outputs"]]
    line = f"{function.name}: {trigger['type']} {_destination(trigger['metadata'])}" + (
        f"; outputs {', '.join(outs)}" if outs else ""
    )
    # It may hold the app's Secret (local.settings.json's values): private, like
    # that file should be.
    return path, docs, line, True


def _invoker_files(app: App, *, options: Options, names: _Names) -> list[_Planned]:
    """What the invoker needs in a cluster, claimed in ``names``: its RBAC, and the
    admission policy that narrows it."""
    rbac = _rbac(app)
    if options.namespace:
        for doc in rbac:
            doc["metadata"]["namespace"] = options.namespace
        rbac[-1]["subjects"][0]["namespace"] = options.namespace
    rbac_path = options.out / f"{app.name}-rbac.yaml"
    names.claim(rbac_path, rbac, "the invoker's RBAC")
    policy = invoker_policy(app.name, options.namespace)
    policy_path = options.out / f"{app.name}-policy.yaml"
    names.claim(policy_path, policy, "the invoker's admission policy")
    return [
        (rbac_path, rbac, "the invoker's ServiceAccount, Role and RoleBinding", False),
        (
            policy_path,
            policy,
            "an admission policy letting the invoker change only its own Job's result "
            "(cluster-scoped: for a cluster admin, unless the jobrunner chart's "
            "invokerPolicy is on)",
            False,
        ),
    ]


class _Names:
    """Every file and every object (kind, namespace, name) one import writes, with what
    it stands for: a second claim on one of them by something else is a ManifestError
    naming both (names are cut and changed to fit Kubernetes, ``kube_name``; what
    still collides, such as two functions whose names differ only in case, is refused
    rather than one of them silently lost). The same object written twice with the
    same content (the app's settings Secret, in every function's file) is one object."""

    def __init__(self) -> None:
        self._files: dict[Path, str] = {}
        self._objects: dict[tuple[str, str, str], tuple[str, str]] = {}

    def claim(self, path: Path, docs: list[dict[str, Any]], what: str) -> None:
        if path in self._files:
            raise ManifestError(
                f"{what} and {self._files[path]} would both be written to {path}; "
                "rename one of them (function names are case-insensitive)"
            )
        self._files[path] = what
        for doc in docs:
            meta = doc.get("metadata") or {}
            key = (str(doc.get("kind")), str(meta.get("namespace", "")), str(meta.get("name")))
            content = json.dumps(doc, sort_keys=True)
            earlier = self._objects.get(key)
            if earlier is not None and earlier[1] != content:
                raise ManifestError(
                    f"{what} and {earlier[0]} would both be the {key[0]} {key[2]}; rename "
                    "one of them (function names are case-insensitive)"
                )
            self._objects[key] = (earlier or (what, content))[0], content


def _destination(metadata: Mapping[str, str]) -> str:
    return metadata.get("queueName") or metadata.get("topic") or ""


def run(args: argparse.Namespace) -> int:
    """``jobrunner functions import`` (its options: jobrunner.cli.parser ``_functions``,
    and the global ``-n``): prints what was written and what was not (and why); exit 0
    when at least one function was imported, else 1."""
    directory = Path(args.directory)
    overrides = {}
    for pair in args.setting:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ManifestError(f"--setting {pair!r}: expected NAME=VALUE")
        overrides[key] = value
    app_name = kube_name(args.name or directory.resolve().name, APP_NAME_MAX)
    options = Options(
        out=Path(args.out or f"{app_name}-scaledjobs"),
        image=args.image or f"{app_name}:latest",
        jobrunner_image=args.jobrunner_image,
        local=args.local,
        python=args.python,
        port=args.port,
        embedded=args.embedded,
        namespace=getattr(args, "namespace", None),
    )
    result = import_app(directory, options, name=args.name, settings=overrides)
    for path, what in result.written:
        print(f"wrote {path}: {what}")
    for function, why in result.skipped:
        print(f"not imported: {function}: {why}", file=sys.stderr)
    return 0 if result.written else 2  # nothing in the app can run: exit 2, as a bad input
