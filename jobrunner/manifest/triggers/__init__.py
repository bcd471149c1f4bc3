"""Trigger types: how a ScaledJob trigger (KEDA's ``type`` and ``metadata`` names) and the
parameters of its TriggerAuthentication become the settings a source connects with.

One registry keyed by trigger type, so a new source is a new module here (and one under
``jobrunner/sources/``) plus one line in ``_MODULES`` — never a branch in the runner. Each
type is checked twice: ``check`` without any I/O (``jobrunner validate`` runs it, so
validate refuses what ``run`` would), and ``resolve`` at start, when Secrets and
environment variables are read. Triggers never read ``os.environ``: the variables they
may read come in their ``ResolveContext.reach`` (see jobrunner.manifest.triggers.reach),
which the command line makes — everything in file mode, the allow-listed few in
operator mode.

Must not import: any broker or Kubernetes library, the sources, the loader
(``jobrunner.manifest.loader`` imports this package), anything above the manifest.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobrunner.manifest.scaledjob import (
    ManifestError,
    OutputBinding,
    ScaledJob,
    ScaledJobSpec,
    Trigger,
    TriggerAuthentication,
)
from jobrunner.manifest.triggers.auth import (
    FileSecrets,
    SecretReader,
    auth_parameters,
    pod_identity,
)
from jobrunner.manifest.triggers.reach import Reach

__all__ = [
    "FileSecrets",
    "Problem",
    "Reach",
    "ResolveContext",
    "SecretReader",
    "TriggerType",
    "check_output",
    "check_spec",
    "check_trigger",
    "resolve_trigger",
    "tenant_problems",
    "trigger_type",
    "trigger_types",
]


@dataclass(frozen=True)
class Problem:
    """One mistake in a trigger, at ``field`` (relative to the trigger, e.g.
    ``metadata.queueName``)."""

    field: str
    text: str


@dataclass(frozen=True)
class ResolveContext:
    """What resolving a trigger may read: its ScaledJob, the TriggerAuthentications of the
    manifest, Secrets (the cluster's, then the manifest file's), the local state
    directory (for the embedded queue) and, through ``reach``, the environment variables
    and the cloud identity of the dispatcher's process that this ScaledJob may use."""

    scaledjob: ScaledJob
    trigger: Trigger
    authentications: Mapping[str, TriggerAuthentication]
    read_secret: SecretReader
    state_dir: Path
    reach: Reach

    async def parameters(self) -> dict[str, str]:
        """The trigger's metadata overlaid with its TriggerAuthentication's parameters
        (KEDA's precedence: authentication wins)."""
        params = dict(self.trigger.metadata)
        params.update(
            await auth_parameters(
                self.scaledjob,
                self.trigger,
                self.authentications,
                self.read_secret,
                self.reach,
            )
        )
        return params

    def from_env(self, metadata: Mapping[str, str], key: str) -> str | None:
        """KEDA's ``<key>``, else ``<key>FromEnv`` (the name of an environment variable,
        read through ``reach``): the value, or None when neither gives one. A variable
        the ScaledJob may not read is a ManifestError naming it, never its value."""
        if metadata.get(key):
            return metadata[key]
        name = metadata.get(f"{key}FromEnv")
        if not name:
            return None
        value = self.reach.read(
            name,
            where=self.where(),
            field_path=f"metadata.{key}FromEnv",
            namespace=self.scaledjob.namespace,
            parameter=key,
        )
        return value or None

    def pod_identity(self) -> dict[str, str]:
        """KEDA's ``podIdentity`` of the trigger's TriggerAuthentication; {} for none."""
        return pod_identity(self.trigger, self.authentications)

    def where(self) -> str:
        return f"ScaledJob {self.scaledjob.name}: trigger {self.trigger.type}"


@dataclass(frozen=True)
class TriggerType:
    """One kind of trigger.

    ``metadata``: every metadata key the type understands (KEDA's names, plus KEDA's
    queue-length keys that a push dispatcher accepts and ignores); any other key is a
    mistake, reported with a did-you-mean. ``check(metadata, has_auth)`` returns the
    static problems; ``resolve`` returns the source's settings object, raising
    ManifestError naming the field; ``source`` is ``"module:function"`` of the source
    factory, imported only when a dispatcher starts (so ``validate`` needs no broker
    library).
    """

    name: str
    destination: str
    """What the source consumes from, in the broker's words: queue, topic, stream..."""
    metadata: frozenset[str]
    check: Callable[[Mapping[str, str], bool], list[Problem]]
    resolve: Callable[[ResolveContext], Awaitable[Any]]
    source: str
    summary: str = ""
    aliases: tuple[str, ...] = field(default=())
    sink: str = ""
    """``"module:function"`` of the factory of a publisher to this kind of destination
    (for output bindings, see jobrunner.dispatch.outputs); "" when the type cannot be one."""
    operator_refusal: str = ""
    """Why ``jobrunner operator`` refuses this type for tenants' ScaledJobs (as a
    trigger and as an output destination); "" when it serves it."""
    check_spec: Callable[[ScaledJobSpec, Trigger], list[Problem]] | None = None
    """The type's bounds on the ScaledJob's own fields (``consumerTimeoutSeconds``,
    ``deadLetter``...), without I/O: problems whose ``field`` is the path from the
    document (``spec.consumerTimeoutSeconds``). ``validate`` runs it, so a bound the
    broker sets is refused before anything starts."""


# Trigger type -> the module under jobrunner.manifest.triggers that defines TRIGGER.
_MODULES = {
    "rabbitmq": "rabbitmq",
    "kafka": "kafka",
    "apache-kafka": "kafka",
    "aws-sqs-queue": "sqs",
    "redis-streams": "redis_streams",
    "nats-jetstream": "nats_jetstream",
    "mqtt": "mqtt",
    "sqlite": "sqlite",
    "azure-queue": "azure_queue",
    "http": "http",
}


def trigger_types() -> list[str]:
    """Every supported trigger type (aliases included), sorted."""
    return sorted(_MODULES)


def trigger_type(name: str, *, where: str = "") -> TriggerType:
    """The registered type ``name``; ManifestError (naming the supported ones, with a
    did-you-mean) when there is none."""
    module = _MODULES.get(name)
    if module is None:
        close = difflib.get_close_matches(name, list(_MODULES), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        prefix = f"{where}: " if where else ""
        raise ManifestError(
            f"{prefix}field type: {name!r} is not supported; {hint}"
            f"use one of {', '.join(trigger_types())} (sqlite is the embedded queue, for "
            "running without a broker)"
        )
    found: TriggerType = importlib.import_module(f"jobrunner.manifest.triggers.{module}").TRIGGER
    return found


def check_trigger(trigger: Trigger) -> list[Problem]:
    """Static problems of ``trigger``: an unsupported type, unknown metadata keys, and
    the type's own checks (required keys, allowed values). No I/O."""
    try:
        kind = trigger_type(trigger.type)
    except ManifestError as exc:
        return [Problem("type", str(exc).split("field type: ", 1)[-1])]
    problems = []
    for key in trigger.metadata:
        if key not in kind.metadata:
            close = difflib.get_close_matches(key, sorted(kind.metadata), n=1, cutoff=0.7)
            hint = f"did you mean {close[0]!r}?" if close else "remove it"
            problems.append(
                Problem(f"metadata.{key}", f"unknown {kind.name} trigger metadata key; {hint}")
            )
    problems.extend(kind.check(trigger.metadata, trigger.authenticationRef is not None))
    return problems


def check_spec(scaledjob: ScaledJob) -> list[Problem]:
    """The bounds each trigger type sets on the ScaledJob's own fields (``TriggerType.
    check_spec``); ``field`` is the path from the document. No I/O."""
    problems: list[Problem] = []
    for trigger in scaledjob.spec.triggers:
        if trigger.type not in _MODULES:
            continue  # check_trigger names the type
        kind = trigger_type(trigger.type)
        if kind.check_spec is not None:
            problems += kind.check_spec(scaledjob.spec, trigger)
    return problems


def check_output(output: OutputBinding) -> list[Problem]:
    """Static problems of a function's output destination: a type that can be one, and
    that type's own checks on its metadata."""
    try:
        kind = trigger_type(output.type)
    except ManifestError as exc:
        return [Problem("type", str(exc).split("field type: ", 1)[-1])]
    if not kind.sink:
        return [Problem("type", f"{kind.name} cannot be an output destination")]
    return check_trigger(output.as_trigger())


def tenant_problems(
    scaledjob: ScaledJob,
    authentications: Mapping[str, TriggerAuthentication],
    reach: Reach,
) -> list[Problem]:
    """What a tenant's ScaledJob asks of the operator's own process that ``reach`` does
    not give, found without reading anything (operator mode; [] in file mode): a
    trigger type the operator refuses (the embedded queue), a ``*FromEnv`` metadata key
    or a TriggerAuthentication ``env`` entry naming a variable that is not allow-listed.
    Each trigger and each function output destination is looked at; ``field`` is the
    path from ``spec``. Resolving refuses the same things again (``ResolveContext.
    from_env``, ``auth_parameters``), so no other path can read them either."""
    if not reach.tenant:
        return []
    destinations = [(f"spec.triggers[{i}]", t) for i, t in enumerate(scaledjob.spec.triggers)]
    if scaledjob.spec.function is not None:
        destinations += [
            (f"spec.function.outputs[{i}]", o.as_trigger())
            for i, o in enumerate(scaledjob.spec.function.outputs)
        ]
    namespace = scaledjob.namespace
    problems = []
    for path, trigger in destinations:
        if trigger.type in _MODULES:  # an unknown type is refused by resolving it
            kind = trigger_type(trigger.type)
            if kind.operator_refusal:
                problems.append(Problem(f"{path}.type", f"{kind.name}: {kind.operator_refusal}"))
        for key, name in sorted(trigger.metadata.items()):
            if key.endswith("FromEnv") and name and not reach.may_read(name):
                refusal = reach.refusal(name, namespace=namespace, parameter=key[: -len("FromEnv")])
                problems.append(Problem(f"{path}.metadata.{key}", refusal))
        ref = trigger.authenticationRef
        auth = authentications.get(ref.key) if ref is not None else None
        if auth is None:
            continue
        for j, env_ref in enumerate(auth.spec.env):
            if not reach.may_read(env_ref.name):
                refusal = reach.refusal(
                    env_ref.name, namespace=namespace, parameter=env_ref.parameter
                )
                problems.append(
                    Problem(
                        f"{path}.authenticationRef",
                        f"TriggerAuthentication {auth.metadata.name} spec.env[{j}]: {refusal}",
                    )
                )
    return problems


async def resolve_trigger(context: ResolveContext) -> tuple[TriggerType, Any]:
    """The trigger's type and its resolved settings; ManifestError on any problem."""
    kind = trigger_type(context.trigger.type, where=context.where())
    if context.reach.tenant and kind.operator_refusal:
        raise ManifestError(f"{context.where()}: field type: {kind.operator_refusal}")
    problems = check_trigger(context.trigger)
    if problems:
        raise ManifestError(
            "; ".join(f"{context.where()}: field {p.field}: {p.text}" for p in problems)
        )
    return kind, await kind.resolve(context)


def required(metadata: Mapping[str, str], *keys: str, what: str = "") -> list[Problem]:
    """A problem for each of ``keys`` missing or empty in ``metadata``."""
    return [
        Problem(f"metadata.{key}", f"required{what}; add it")
        for key in keys
        if not metadata.get(key)
    ]


def one_of(metadata: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> list[Problem]:
    value = metadata.get(key)
    if value is None or value in allowed:
        return []
    return [Problem(f"metadata.{key}", f"one of {', '.join(allowed)}; got {value!r}")]


def raise_problems(where: str, problems: list[Problem]) -> None:
    if problems:
        raise ManifestError("; ".join(f"{where}: field {p.field}: {p.text}" for p in problems))
