"""Settings and the ScaledJob-style manifest models.

Manifests keep KEDA's field names and defaults wherever the meaning is the same, so a
``keda.sh/v1alpha1`` ScaledJob loads unchanged; jobrunner's own fields (how the message
reaches the Job, the ack policy, the dead-letter target) have defaults that make such a
manifest run. Models validate plain dicts, so the same objects can later come from custom
resources read from the cluster rather than from files.
"""

from __future__ import annotations

import difflib
import enum
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobrunner import limits

API_GROUP = "jobrunner.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KEDA_API_VERSION = "keda.sh/v1alpha1"
SUPPORTED_API_VERSIONS = (API_VERSION, KEDA_API_VERSION)


MAX_REPLICA_COUNT_MAX = 1000
"""The largest ``maxReplicaCount`` (see ScaledJobSpec.maxReplicaCount for why)."""
HISTORY_LIMIT_MAX = 10_000
"""The largest ``successfulJobsHistoryLimit`` and ``failedJobsHistoryLimit``."""
FUNCTION_OUTPUTS_MAX = 16
"""The most output bindings a function may have: each is a broker connection the
dispatcher opens and keeps for its ScaledJob."""
AMQP_SHORTSTR_MAX = 255
"""AMQP 0-9-1: an exchange, queue or routing key is a ``shortstr``, at most 255 octets
(RabbitMQ refuses longer)."""


class ManifestError(Exception):
    """A manifest that cannot be used; the message names the file and the field."""


class InvalidTriggers(ManifestError):
    """A ScaledJob whose fields are well formed but whose triggers (or outputs) are not:
    ``scaledjob`` is whole enough for the checks that do not need them (its templates),
    so that `validate` reports those mistakes in the same run."""

    def __init__(self, message: str, *, scaledjob: ScaledJob) -> None:
        super().__init__(message)
        self.scaledjob = scaledjob


class ManifestErrors(ManifestError):
    """Every independent mistake of a manifest file at once: one entry per document that
    cannot be used (each naming its lines and fields), in file order. ``checkable``: the
    ScaledJobs that parsed (some with InvalidTriggers), for the checks after loading."""

    def __init__(self, problems: list[str], *, checkable: list[ScaledJob]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.checkable = checkable


class _Model(BaseModel):
    # Attribute docstrings become schema descriptions: the CRDs (jobrunner.operator.crd)
    # are generated from these models, and `kubectl explain` shows them.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, use_attribute_docstrings=True
    )


ObjectName = Annotated[
    str,
    Field(max_length=limits.DNS1123_SUBDOMAIN_MAX, pattern=limits.DNS1123_SUBDOMAIN_PATTERN),
]
"""The name of a Kubernetes object that becomes part of an API path (a Secret, a
TriggerAuthentication): a DNS-1123 subdomain, as the API server requires of it. Checked
here, and by the CRDs' schema, so that ``..``, ``/`` or ``%2F`` in a name can never make
a path to another object (see ``jobrunner.apipath``)."""

LabelName = Annotated[
    str, Field(max_length=limits.DNS1123_LABEL_MAX, pattern=limits.DNS1123_LABEL_PATTERN)
]
"""A name Kubernetes requires to be a DNS-1123 label: a namespace, a container."""


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1, max_length=40, pattern=limits.DNS1123_LABEL_PATTERN)
    """A DNS-1123 label (lowercase letters, digits, '-'): the names of its Jobs are made
    from it, and Kubernetes refuses a Job name that is not one. At most 40 characters, so
    that the name, the Job's suffix and its pods' suffixes stay within 63."""
    namespace: str = Field(
        default="default", max_length=limits.DNS1123_LABEL_MAX, pattern=limits.DNS1123_LABEL_PATTERN
    )
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


def authentication_key(kind: str, name: str) -> str:
    """How the TriggerAuthentications of a manifest are keyed: a TriggerAuthentication by
    its name, a ClusterTriggerAuthentication as ``ClusterTriggerAuthentication/<name>``
    (KEDA keeps the two kinds apart: one of each may have the same name; no object name
    holds a '/')."""
    return name if kind == "TriggerAuthentication" else f"{kind}/{name}"


class AuthenticationRef(_Model):
    name: ObjectName
    """The TriggerAuthentication's name (a DNS-1123 subdomain), in the ScaledJob's
    namespace."""
    kind: Literal["TriggerAuthentication", "ClusterTriggerAuthentication"] = "TriggerAuthentication"

    @property
    def key(self) -> str:
        """The referenced object's key among a manifest's authentications."""
        return authentication_key(self.kind, self.name)


class Trigger(_Model):
    type: str
    name: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    authenticationRef: AuthenticationRef | None = None
    useCachedMetrics: bool | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        # KEDA's metadata is map[string]string; YAML may give numbers or booleans.
        if isinstance(value, dict):
            return {
                k: v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in value.items()
            }
        return value


class DeliveryMode(enum.StrEnum):
    AUTO = "auto"
    """env when the body fits ``maxEnvBytes``, else a file from a per-Job Secret."""
    ENV = "env"
    FILE = "file"
    ARGS = "args"
    """As env, and ``$(JOBRUNNER_MESSAGE)`` appended to each container's args."""


class MessageDelivery(_Model):
    mode: DeliveryMode = DeliveryMode.AUTO
    envVarName: str = Field(default="JOBRUNNER_MESSAGE", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    maxEnvBytes: int = Field(default=32 * 1024, ge=0)
    """Largest body passed in an env var; larger ones go to a mounted file (mode
    ``auto``) or are dead-lettered ``MessageTooLarge`` (modes ``env``/``args``). At most
    128 KiB less the variable's name: the most Linux passes in one environment string."""
    maxMessageBytes: int = Field(default=512 * 1024, gt=0, le=limits.MESSAGE_MAX)
    """Largest body accepted at all; beyond it the message is dead-lettered
    ``MessageTooLarge``. At most 960 KiB: the per-Job Secret that carries a large body
    holds at most 1 MiB, and keeps the headers beside it."""
    mountPath: str = "/var/run/jobrunner/message"
    containers: list[str] | None = None
    """Containers that get the message; all of them when unset."""

    @field_validator("maxEnvBytes")
    @classmethod
    def _fits_an_env_string(cls, value: int, info: ValidationInfo) -> int:
        name = info.data.get("envVarName") or "JOBRUNNER_MESSAGE"
        most = limits.env_value_max(name)
        if value > most:
            raise ValueError(
                f"{value} can never work: Linux passes at most {most} bytes in the "
                f"variable {name} (MAX_ARG_STRLEN, 128 KiB, less its name); larger bodies "
                "must go to a file (mode auto or file)"
            )
        return value


class AckPolicy(enum.StrEnum):
    ON_JOB_COMPLETION = "onJobCompletion"
    """Ack when the Job succeeds, dead-letter when it fails for good."""
    ON_JOB_CREATION = "onJobCreation"
    """Ack once the Job exists (the Job is the durable record); failures are still
    dead-lettered, by republishing the original message kept with the Job."""


class DeadLetter(_Model):
    exchange: str | None = Field(default=None, max_length=AMQP_SHORTSTR_MAX)
    """Exchange for dead-lettered copies. Unset: the queue's own dead-letter exchange
    when it has one, else the queue named by ``queue``. At most 255 characters (an
    AMQP shortstr)."""
    routingKey: str | None = Field(default=None, max_length=AMQP_SHORTSTR_MAX)
    """At most 255 characters (an AMQP shortstr)."""
    queue: str | None = Field(default=None, max_length=AMQP_SHORTSTR_MAX)
    """Fallback queue (declared durable) when neither ``exchange`` nor the queue's own
    dead-letter exchange is there. Default: ``<queueName>.dead-letter``. At most 255
    characters (RabbitMQ's; SQS takes 80 and Azure 63, which they check)."""
    topic: str | None = None
    """Kafka: the dead-letter topic. Default: ``<topic>.dead-letter``. MQTT: the topic
    dead-lettered copies are published to. Default: ``jobrunner/dead-letter/<ScaledJob>``."""
    stream: str | None = None
    """Redis Streams: the dead-letter stream. Default: ``<stream>.dead-letter``."""
    subject: str | None = None
    """NATS JetStream: the subject dead-lettered copies are published to (a stream must
    store it). Default: ``jobrunner.dead-letter.<stream>``."""


class OutputBinding(_Model):
    """Where one of a function's output bindings publishes: a destination named like a
    trigger (KEDA's type and metadata names, an optional authenticationRef)."""

    name: str
    """The function's output binding name (``$return`` for its return value)."""
    type: str
    """azure-queue, rabbitmq, kafka or sqlite (the embedded queue)."""
    metadata: dict[str, str] = Field(default_factory=dict)
    authenticationRef: AuthenticationRef | None = None

    @field_validator("metadata", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return Trigger._stringify(value)

    def as_trigger(self) -> Trigger:
        """The destination as a trigger of its type, to check and resolve it the same
        way (a Kafka destination needs no consumer group: a placeholder fills it)."""
        metadata = dict(self.metadata)
        if self.type in ("kafka", "apache-kafka"):
            metadata.setdefault("consumerGroup", "jobrunner-outputs")
        return Trigger(
            type=self.type,
            name=self.name,
            metadata=metadata,
            authenticationRef=self.authenticationRef,
        )


class FunctionSpec(_Model):
    """jobrunner: the ScaledJob runs an Azure Functions-style function through the in-Job
    invoker (see jobrunner.functions), which records its result on the Job; the
    dispatcher then publishes the function's outputs when it settles the message and
    puts a failed function's error in the dead letter (see jobrunner.outputs)."""

    name: str
    outputs: list[OutputBinding] = Field(default_factory=list, max_length=FUNCTION_OUTPUTS_MAX)
    """At most 16: each output is a broker connection the dispatcher opens and keeps."""


class ScaledJobSpec(_Model):
    jobTargetRef: dict[str, Any] | None = None
    """A batch/v1 JobSpec whose strings may hold Jinja2 expressions. Its templated
    strings may hold 64 KiB of template text in all (parsing costs the dispatcher about
    6 s per MiB), and labels and annotations under ``jobrunner.dev/`` (and
    ``app.kubernetes.io/managed-by``, ``scaledjob.keda.sh/name``) are jobrunner's own:
    a template that sets one is refused. Each message's render may take 2 s and make
    1 MiB of text (the operator's ``dispatcher.render_*`` settings); past either the
    message is dead-lettered ``TemplateError``."""
    jobTemplate: str | None = Field(default=None, max_length=4096)
    """jobrunner: a template file (YAML, a Job or a JobSpec) instead of jobTargetRef,
    relative to the manifest's directory or to ``job_templates/``. At most 4096
    characters (Linux's PATH_MAX)."""
    maxReplicaCount: int = Field(default=100, ge=1, le=MAX_REPLICA_COUNT_MAX)
    """The most messages in hand, and so Jobs running, at once: the broker's prefetch
    (RabbitMQ ``basic.qos``, MQTT Receive Maximum, the in-hand cap of the other
    sources). KEDA's default, 100. At most 1000: every message in hand is held, body
    and all, in the dispatcher's memory until it is settled (with ackPolicy
    onJobCompletion, until its Job ends): 1000 x the default ``maxMessageBytes`` is
    500 MiB, the chart's memory limit. 1000 is also NATS JetStream's default
    ``max_ack_pending``; the protocols' own ceilings are higher
    (RabbitMQ's prefetch-count and MQTT's Receive Maximum are 16-bit, 65,535; SQS
    receives 10 per call and holds about 120,000 in flight per queue)."""
    successfulJobsHistoryLimit: int = Field(default=100, ge=0, le=HISTORY_LIMIT_MAX)
    """Succeeded Jobs kept (the oldest are deleted first). KEDA's default, 100. At most
    10,000: every kept Job stays in the API server and in the dispatcher's Job watch
    (a few KiB each: tens of MiB at the bound); for longer records use the logs or the
    dead-letter queue."""
    failedJobsHistoryLimit: int = Field(default=100, ge=0, le=HISTORY_LIMIT_MAX)
    """Failed Jobs kept (the oldest are deleted first). KEDA's default, 100. At most
    10,000, as ``successfulJobsHistoryLimit``."""
    triggers: list[Trigger] = Field(min_length=1, json_schema_extra={"maxItems": 1})
    """One trigger: a ScaledJob's dispatcher consumes one source. KEDA takes several
    (and scales on their sum); here each source gets a ScaledJob of its own."""
    # KEDA fields that mean nothing for a push-based dispatcher; accepted and ignored.
    pollingInterval: int | None = None
    minReplicaCount: int | None = None
    envSourceContainerName: str | None = None
    rolloutStrategy: str | None = None
    rollout: dict[str, Any] | None = None
    scalingStrategy: dict[str, Any] | None = None
    # jobrunner's own fields.
    messageDelivery: MessageDelivery = Field(default_factory=MessageDelivery)
    ackPolicy: AckPolicy = AckPolicy.ON_JOB_COMPLETION
    ordering: Literal["none", "perKey"] = "none"
    """Kafka: ``perKey`` starts a record's Job only after the previous Job for the same
    key (in the same partition) has finished."""
    deadLetter: DeadLetter = Field(default_factory=DeadLetter)
    function: FunctionSpec | None = None
    """An Azure Functions-style function (written by ``jobrunner functions import``)."""
    consumerTimeoutSeconds: float = Field(default=1800, gt=0)
    """The broker's delivery acknowledgement timeout (RabbitMQ ``consumer_timeout``,
    30 min by default). A message held this long would be cut off, so shortly before
    it the Job is handed over: the message is acked and the Job, which keeps the
    original message, becomes the durable record. Unset, a source that keeps its
    messages alive uses its own limit instead (SQS: 12 h; Redis Streams, JetStream,
    MQTT: none), see ``protocols.KeepsMessagesAlive``."""

    @field_validator("triggers")
    @classmethod
    def _one_trigger(cls, value: list[Trigger]) -> list[Trigger]:
        if len(value) > 1:
            raise ValueError(
                f"{len(value)} triggers; jobrunner consumes one source per ScaledJob (KEDA "
                "adds several up): give each trigger a ScaledJob of its own"
            )
        return value

    @model_validator(mode="after")
    def _one_template(self) -> ScaledJobSpec:
        if (self.jobTargetRef is None) == (self.jobTemplate is None):
            raise ValueError(
                "give exactly one of spec.jobTargetRef (the Job template inline) or "
                "spec.jobTemplate (a template file)"
            )
        return self


class ScaledJob(_Model):
    apiVersion: str
    kind: Literal["ScaledJob"]
    metadata: ObjectMeta
    spec: ScaledJobSpec
    status: dict[str, Any] | None = None
    _node: yaml.Node | None = PrivateAttr(default=None)
    """The YAML node it was read from, when read from a file: errors give lines."""
    _origin: str = PrivateAttr(default="")
    """The file it was read from, when it was ("" for an object from elsewhere)."""

    @property
    def origin(self) -> str:
        """``"<file>: "`` to put before an error about this ScaledJob, or ""."""
        return f"{self._origin}: " if self._origin else ""

    def line_of(self, path: tuple[int | str, ...]) -> int | None:
        """The manifest line of the field at ``path`` (None when not read from a file)."""
        return line_of(self._node, path)

    @field_validator("apiVersion")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value not in SUPPORTED_API_VERSIONS:
            raise ValueError(f"must be one of {', '.join(SUPPORTED_API_VERSIONS)}")
        return value

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace


class SecretKeyRef(_Model):
    parameter: str
    name: ObjectName
    """The Secret's name (a DNS-1123 subdomain), in the TriggerAuthentication's
    namespace."""
    key: str


class EnvRef(_Model):
    parameter: str
    name: str
    containerName: LabelName | None = None
    """KEDA: the container whose environment holds ``name`` (a DNS-1123 label)."""


class AuthenticationMeta(BaseModel):
    """A TriggerAuthentication's metadata: its name is an object name (a DNS-1123
    subdomain, up to 253 characters, as KEDA's), not a prefix of Job names."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: ObjectName
    namespace: LabelName = "default"


class TriggerAuthenticationSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)
    secretTargetRef: list[SecretKeyRef] = Field(default_factory=list)
    env: list[EnvRef] = Field(default_factory=list)


class TriggerAuthentication(_Model):
    apiVersion: str
    kind: Literal["TriggerAuthentication", "ClusterTriggerAuthentication"]
    metadata: AuthenticationMeta
    spec: TriggerAuthenticationSpec

    @property
    def key(self) -> str:
        """Its key among a manifest's authentications (``authentication_key``)."""
        return authentication_key(self.kind, self.metadata.name)


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


def line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (or of its nearest parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    # An unknown key is best pointed at by its own line.
                    child, line = value, key.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


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
        raise _explain(exc, where, node) from None
    scaledjob._node = node
    scaledjob._origin = origin
    from jobrunner.triggers import (  # they import this module
        check_output,
        check_spec,
        check_trigger,
    )

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
    the cluster has none of that name (see jobrunner.triggers.auth)."""
    skipped: list[str] = Field(default_factory=list)
    """Documents of other kinds, left to kubectl: one note each."""


def load_manifest(path: Path) -> ManifestSet:
    """Load ScaledJobs, TriggerAuthentications and Secrets from a YAML file, as a KEDA
    user keeps them for ``kubectl apply -f``; documents of other kinds are skipped with
    a note. Errors name the file, the line and the field."""
    scaledjobs: list[ScaledJob] = []
    auths: dict[str, TriggerAuthentication] = {}
    secrets: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: list[str] = []
    documents = _documents(path)
    # Each document's mistakes are independent of the others': all are reported at once.
    problems: list[str] = []
    checkable: list[ScaledJob] = []
    for index, (doc, node) in enumerate(documents):
        kind = doc.get("kind")
        where = f"{path} (document {index + 1}, {kind or 'no kind'})"
        if kind == "ScaledJob":
            try:
                scaledjobs.append(parse_scaledjob(doc, where=where, node=node, origin=str(path)))
            except InvalidTriggers as exc:
                problems.append(str(exc))
                checkable.append(exc.scaledjob)
            except ManifestError as exc:
                problems.append(str(exc))
        elif kind in ("TriggerAuthentication", "ClusterTriggerAuthentication"):
            try:
                auth = parse_trigger_authentication(doc, where=where, node=node)
            except ManifestError as exc:
                problems.append(str(exc))
                continue
            auths[auth.key] = auth
        elif kind == "Secret":
            meta = doc.get("metadata") or {}
            secrets[(str(meta.get("namespace") or "default"), str(meta.get("name")))] = doc
        elif not kind:
            raise ManifestError(
                f"{where}: line {node.start_mark.line + 1}, field kind: required; "
                "add kind: ScaledJob"
            )
        else:
            name = (doc.get("metadata") or {}).get("name", "?")
            skipped.append(
                f"{kind} {name} (document {index + 1}): not jobrunner's; left to kubectl"
            )
    if problems:
        raise ManifestErrors(problems, checkable=[*scaledjobs, *checkable])
    if not scaledjobs:
        raise ManifestError(_no_scaledjob(path, documents))
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
    return ManifestSet(
        path=path,
        scaledjobs=scaledjobs,
        authentications=auths,
        secrets=secrets,
        skipped=skipped,
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


class KubeSettings(BaseModel):
    kubeconfig: str | None = None
    """Path to a kubeconfig; unset: in-cluster config, else ~/.kube/config."""
    context: str | None = None
    api_retry_max_seconds: float = Field(default=30.0, gt=0)
    """Ceiling of the exponential backoff between retries of a failing API call."""


class DispatcherSettings(BaseModel):
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    """How long SIGTERM waits for in-flight settlements before cancelling them."""
    handover_margin_seconds: float = Field(default=60.0, ge=0)
    """How long before the broker's consumer timeout a held message is handed over."""
    unclaimed_deletion_grace_seconds: float = Field(default=600.0, ge=0)
    """A finished Job being deleted whose message no delivery claims (it was settled just
    before a crash, before the Job was released) is let go this long after it finished;
    a delivery that does come meanwhile settles it and releases it at once."""
    max_unforeseen_errors: int = Field(default=3, ge=1)
    """Tries a message gets when processing it fails in a way nobody foresaw (a bug, a
    library that changed): it is released to the source that many times, then
    dead-lettered ``InternalError`` with the exception, so none stays in hand or loops
    forever."""
    progress_log_seconds: float = Field(default=30.0, gt=0)
    """While Jobs run, how often a line says how many, the longest running and what
    waits: long work shows progress in the log, not only on /metrics."""
    read_message_secrets: bool = True
    """False when this dispatcher may not ``get`` its own message Secrets (the chart's
    ``permissions.operator.restrict.secret``: RBAC can name Secrets, and per-Job names
    cannot be known in advance). Every Job then keeps its message's copy in its own
    annotations, where a Job that owns its message is dead-lettered from, and a message
    whose copy does not fit there (over 96 KiB) is dead-lettered ``MessageTooLarge`` on
    arrival instead of making a Job whose failure could not be dead-lettered."""
    render_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    """Wall time one message's Job may take to render (every templated string of it). A
    template ordinarily renders in well under a millisecond; past this the render is
    stopped (its worker killed if need be) and the message dead-lettered
    ``TemplateError`` saying so. At most 60 s: a render holds one of the process's
    render workers for that long."""
    render_output_bytes: int = Field(default=1024 * 1024, ge=4096, le=limits.OBJECT_MAX)
    """Characters the templates of one Job may output in all, counted while they stream;
    past it: ``TemplateError``. At most 1.5 MiB: no Job larger than that can be stored
    (etcd's request limit, see ``limits.OBJECT_MAX``)."""
    render_memory_bytes: int = Field(default=96 * 1024 * 1024, ge=64 * 1024 * 1024)
    """Address space of each render worker (``RLIMIT_AS``), Python itself included (about
    25 MiB); a render that needs more is a ``TemplateError``. Keep
    ``render_workers`` x this, plus the dispatcher's own memory, within the pod's memory
    limit (the chart's default, 512 MiB, holds 3 x 96 MiB and the operator's ~125 MiB)."""
    render_workers: int = Field(default=3, ge=1, le=64)
    """Render worker processes, shared by every ScaledJob of the process; started on
    first use."""
    render_workers_per_namespace: int = Field(default=2, ge=1)
    """The most workers the ScaledJobs of one namespace hold at once (in operator mode a
    namespace is a tenant), so that a tenant whose renders run to the time limit, with
    however many ScaledJobs, leaves the other namespaces workers to render with; a
    ScaledJob holds one at most. Below ``render_workers`` for that to hold; 2 of 3 by
    default, so that one hostile ScaledJob does not hold up the others of its own
    namespace either."""
    render_cooldown_max_seconds: float = Field(default=60.0, ge=0, le=3600)
    """A ScaledJob whose render passed its time or memory limit waits before its next
    render asks for a worker: the time limit, doubled for each such render in a row, up
    to this; a render that succeeds ends the wait. So a hostile template holds a worker
    a small share of the time, and other tenants' renders rarely wait for one."""
    failpoints: list[str] = Field(default_factory=list)
    """Testing only: crash points to arm (see jobrunner.failpoints)."""

    @model_validator(mode="after")
    def _share_fits(self) -> DispatcherSettings:
        if self.render_workers_per_namespace > self.render_workers:
            raise ValueError(
                f"render_workers_per_namespace ({self.render_workers_per_namespace}) is over "
                f"render_workers ({self.render_workers}); a namespace cannot hold more "
                "workers than there are"
            )
        return self


class KafkaSettings(BaseModel):
    max_poll_interval_ms: int = Field(default=300_000, gt=0)
    """The consumer's ``max.poll.interval.ms``. The dispatcher keeps polling while it
    pauses partitions for backpressure, so Jobs of any length stay below it."""
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)


class AzureQueueSettings(BaseModel):
    visibility_timeout_seconds: float = Field(default=600.0, ge=2, le=7 * 24 * 3600)
    """How long a received message stays invisible; renewed at half this interval for
    as long as its Job runs, so a message is never handed out twice while its Job lives.
    10 minutes is the Functions queue listener's fixed lease (QueueListener.cs). After a
    dispatcher dies, its messages come back once this much time has passed."""
    max_poll_interval_seconds: float = Field(default=5.0, gt=0)
    """Longest pause between two receives of an empty queue (the pause starts at 0.1 s
    and doubles while the queue stays empty; the Functions host's maxPollingInterval,
    1 min by default, plays the same part)."""


class Executor(enum.StrEnum):
    KUBERNETES = "kubernetes"
    LOCAL = "local"
    """Jobs run as processes on this machine (see jobrunner.local): no cluster needed."""


class LocalSettings(BaseModel):
    state_dir: Path = Path(".jobrunner")
    """Where the local executor keeps its Jobs (and their logs) and where a ``sqlite``
    trigger's queue file lives unless its ``path`` is absolute."""
    retry_seconds: float = Field(default=1.0, ge=0)
    """Pause before a failed local Job's first retry, doubled for each further one (a
    cluster waits 10 s; a developer waiting on a laptop should not)."""
    poll_interval_seconds: float = Field(default=0.1, gt=0)
    """How often the local executor looks for Jobs whose status changed."""


class TelemetrySettings(BaseModel):
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """Port for /metrics, /healthz and /readyz; unset: no HTTP server (the image sets 8080)."""
    http_host: str = "127.0.0.1"
    """Address to bind; the image sets 0.0.0.0 so the kubelet's probes reach it."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); unset: spans are
    not exported (the CLI also honours OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)."""
    queue_depth_interval_seconds: float = Field(default=10.0, gt=0)
    """How often the queue depth gauge is refreshed."""


class OperatorSettings(BaseModel):
    """``jobrunner operator``: ScaledJobs from the cluster (see jobrunner.operator)."""

    watch_namespaces: str = ""
    """Comma-separated namespaces whose ScaledJobs to serve; empty: all namespaces (a
    cluster-wide watch, which needs a ClusterRoleBinding)."""
    label_selector: str = ""
    """Serve only ScaledJobs with these labels (a Kubernetes label selector)."""
    lease_namespace: str = ""
    """Where the replicas' Leases live; empty: the pod's own namespace (from its service
    account), else ``default``."""
    lease_group: str = Field(default="jobrunner", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Prefix of the Lease names and value of their ``jobrunner.dev/lease-group`` label:
    replicas with the same group share the ScaledJobs (one Helm release, one group)."""
    identity: str = ""
    """This replica's name in the group; empty: ``$POD_NAME`` (else the host name) and a
    random suffix, so a restarted container is never taken for its predecessor."""
    buckets: int = Field(default=16, ge=1, le=1024)
    """ScaledJobs hash into this many buckets, one Lease each; a replica holds at most
    ceil(buckets / live replicas). More buckets than replicas spreads work evenly; every
    replica must use the same number."""
    lease_duration_seconds: float = Field(default=15.0, gt=0)
    """A replica whose member Lease has not changed for this long (as another replica
    sees it) is gone: its buckets are taken over. The takeover time after a crash."""
    renew_seconds: float = Field(default=3.0, gt=0)
    """How often a replica renews its member Lease: one write per replica per period,
    the steady API cost of high availability."""
    renew_deadline_seconds: float = Field(default=10.0, gt=0)
    """A replica that could not renew for this long stops every dispatcher it runs (it
    must: the others will take its buckets at ``lease_duration_seconds``)."""
    keda_takeover: bool = False
    """Also serve keda.sh ScaledJobs annotated ``jobrunner.dev/takeover: "true"`` (and
    paused for KEDA with ``autoscaling.keda.sh/paused: "true"``): migrate one ScaledJob
    at a time."""
    status_interval_seconds: float = Field(default=10.0, gt=0)
    """At most one status write per ScaledJob per this many seconds for the counters
    (``activeJobs``, ``lastMessageTime``); a condition that changes is written at once."""
    secret_refresh_seconds: float = Field(default=30.0, gt=0, le=3600)
    """How often the Secrets a consuming dispatcher was built from (those its
    TriggerAuthentications name) are read again; a change rebuilds the dispatcher with
    the new value. A dispatcher that cannot connect re-reads them every
    ``min(5, this)`` seconds. Polled by name (``get``): the operator has no right to
    list or watch Secrets (jobrunner.operator.secrets)."""
    tenant_env_allow_list: str = ""
    """Comma-separated names of the operator's own environment variables that ScaledJobs
    may read (KEDA's ``*FromEnv`` keys, TriggerAuthentication ``env``); empty, the
    default: none, and a ScaledJob naming any variable is ``InvalidSpec``. The
    operator's environment is the chart owner's (broker credentials, cloud keys), not
    the tenants': a listed variable can be read by every ScaledJob author and sent to
    any host they name, so list only values every tenant may have."""
    allow_operator_identity: bool = False
    """Let an SQS trigger without keys use the operator's own AWS identity (its IRSA or
    instance role) when it asks for it (KEDA's ``identityOwner: operator``). Off by
    default: that identity reaches every queue the operator's role reaches, for every
    tenant. Azure queues never use an ambient identity, so this changes nothing there."""

    def namespaces(self) -> list[str]:
        return [n.strip() for n in self.watch_namespaces.split(",") if n.strip()]

    def tenant_env_names(self) -> list[str]:
        """``tenant_env_allow_list`` as names."""
        return [n.strip() for n in self.tenant_env_allow_list.split(",") if n.strip()]

    @field_validator("tenant_env_allow_list")
    @classmethod
    def _env_names(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        # A POSIX-style name: ASCII letters, digits and _, not starting with a digit.
        bad = [n for n in names if not (n.isascii() and n.isidentifier())]
        if bad:
            raise ValueError(
                "comma-separated names of environment variables (letters, digits and _, "
                f"not starting with a digit); not names: {', '.join(map(repr, bad))}"
            )
        return value


class Settings(BaseSettings):
    """Process settings; only the CLI reads the environment (``JOBRUNNER_*``)."""

    model_config = SettingsConfigDict(env_prefix="JOBRUNNER_", env_nested_delimiter="__")
    kube: KubeSettings = Field(default_factory=KubeSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    azure_queue: AzureQueueSettings = Field(default_factory=AzureQueueSettings)
    executor: Executor = Executor.KUBERNETES
    """Explicit, never guessed: a dispatcher that cannot reach its cluster must fail,
    not quietly run Jobs inside its own pod."""
    local: LocalSettings = Field(default_factory=LocalSettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    otel_traces_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "JOBRUNNER_OTEL_TRACES_ENDPOINT"
        ),
    )
    """OpenTelemetry's standard variable, honoured when telemetry.otlp_endpoint is unset."""
    log_level: str = "INFO"
    log_json: bool = False
