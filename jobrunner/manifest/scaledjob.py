"""The ScaledJob and TriggerAuthentication models (KEDA's field names and defaults
wherever the meaning is the same, so a ``keda.sh/v1alpha1`` ScaledJob loads unchanged;
jobrunner's own fields have defaults that make such a manifest run), and the errors
of a manifest. Models validate plain dicts, so the same objects come from files and from
custom resources.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobrunner.core import limits

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
    """A ScaledJob whose triggers (or outputs) are not well formed, or whose fields are
    not but read without those fields it is: ``scaledjob`` is whole enough for the
    checks that do not need them (its templates), so that `validate` reports those
    mistakes in the same run."""

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
a path to another object (see ``jobrunner.core.apipath``)."""

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


_TRIGGER_ACK_POLICY = {"http": AckPolicy.ON_JOB_CREATION}
"""Trigger types whose ack policy is implied (see ScaledJobSpec._implied_ack_policy)."""


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
    url: str | None = Field(default=None, max_length=2048)
    """HTTP trigger: where a failed event is POSTed, as a structured CloudEvent carrying
    the reason (jobrunner.sources.http). Unset: the failure is answered on the event's
    Location only. At most 2048 characters."""


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
    puts a failed function's error in the dead letter (see jobrunner.dispatch.outputs)."""

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
    maxPendingAdmission: int = Field(default=5, ge=1, le=MAX_REPLICA_COUNT_MAX)
    """jobrunner, for Jobs queued by Kueue (their template names a LocalQueue with the
    label ``kueue.x-k8s.io/queue-name``): of the ``maxReplicaCount`` Jobs, at most this
    many may wait for admission (suspended, their Workload not admitted) at once; past
    it the next messages wait in the broker, so a quota-starved queue does not become
    thousands of suspended Jobs. Waiting Jobs still count under ``maxReplicaCount``
    (each will be admitted), so at most that many are ever admitted at once. Default 5:
    enough for Kueue to see a backlog and preempt or borrow for it."""
    inadmissibleTimeoutSeconds: float = Field(default=300, gt=0, le=7 * 24 * 3600)
    """jobrunner, for Jobs queued by Kueue: a Job that Kueue says can never be admitted
    (its LocalQueue or ClusterQueue missing or stopped: ``Inadmissible``; its requests
    beyond what any flavor of the ClusterQueue can hold: ``NeverFits``) for this long is
    ended and its message dead-lettered with Kueue's reason and message. Waiting for
    quota in use is never ended (that is what a queue is for). Default 5 minutes: time
    for an administrator to create a missing queue. At most a week."""
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

    @model_validator(mode="before")
    @classmethod
    def _implied_ack_policy(cls, data: Any) -> Any:
        # A trigger whose sender waits for the answer (http) is accepted once the Job
        # exists: its ack policy is onJobCreation unless the manifest says otherwise
        # (which the trigger's check_spec then refuses, naming the field).
        if not isinstance(data, dict) or "ackPolicy" in data:
            return data
        triggers = data.get("triggers")
        first = triggers[0] if isinstance(triggers, list) and triggers else None
        kind = first.get("type") if isinstance(first, dict) else getattr(first, "type", None)
        implied = _TRIGGER_ACK_POLICY.get(kind) if isinstance(kind, str) else None
        return data if implied is None else {**data, "ackPolicy": implied}

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
