"""Small immutable values passed between the sources, the dispatcher and the tracker.

They carry no behaviour and import no broker or Kubernetes library, so every layer can
share them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

MANAGED_BY = "jobrunner"

# Labels select; annotations carry what labels cannot (any string, any length).
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SCALEDJOB = "jobrunner.dev/scaledjob"
LABEL_SOURCE = "jobrunner.dev/source"
LABEL_MESSAGE_KEY = "jobrunner.dev/message-key"
ANNOTATION_MESSAGE_ID = "jobrunner.dev/message-id"
ANNOTATION_SOURCE_DETAIL = "jobrunner.dev/source-detail"
ANNOTATION_ACK_POLICY = "jobrunner.dev/ack-policy"
ANNOTATION_HANDED_OVER = "jobrunner.dev/handed-over"
ANNOTATION_SETTLED = "jobrunner.dev/settled"
FINALIZER = "jobrunner.dev/settlement"
"""On every Job jobrunner creates, removed only once the Job's message has a durable fate
(acked, dead-lettered and confirmed, or its offset committed): deleting the Job before
then (a person, the TTL controller, history cleanup, a namespace deletion) leaves it in
place, with the copy of the message it keeps, until a dispatcher has settled that
message. ``jobrunner finalizers release`` removes it by hand (after an uninstall)."""
ANNOTATION_BODY_DIGEST = "jobrunner.dev/body-sha256"
"""SHA-256 of the body the Job was made for: a later message that reuses the identity
with another body is told apart from a redelivery."""
# KEDA's label on Jobs it creates; set too so KEDA-minded tooling finds our Jobs.
LABEL_KEDA_SCALEDJOB = "scaledjob.keda.sh/name"
# Provenance (jobrunner.core.provenance): what made the Job, for selectors and dashboards.
# A label only where the value is a valid label value; the annotation holds any text.
LABEL_TRIGGER_TYPE = "jobrunner.dev/trigger-type"
LABEL_TRIGGER_SOURCE = "jobrunner.dev/trigger-source"
ANNOTATION_TRIGGER_SOURCE = "jobrunner.dev/trigger-source"
LABEL_DELIVERY_COUNT = "jobrunner.dev/delivery-count"
LABEL_REDELIVERED = "jobrunner.dev/redelivered"
ANNOTATION_TRACEPARENT = "jobrunner.dev/traceparent"


@dataclass(frozen=True)
class Delivery:
    """One message as received from a source, before any decision about it."""

    source: str
    """Source type, e.g. ``rabbitmq`` or ``kafka``."""
    identity: str
    """Stable identity across redeliveries: the message id, or a digest (see naming)."""
    body: bytes
    message_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    redelivered: bool = False
    delivery_count: int = 1
    """Which delivery of this message this is, 1 for the first, as the broker counts it
    where it does (what an Azure Functions trigger reports as ``DequeueCount``):

    * azure-queue: the message's ``dequeueCount`` (Queue service "Get Messages");
    * sqs: ``ApproximateReceiveCount`` (ReceiveMessage's system attribute);
    * rabbitmq: ``x-delivery-count`` + 1 on a quorum queue (the broker's count of returns,
      RabbitMQ docs "Quorum Queues: poison message handling"), else 2 when the broker
      sets ``redelivered`` (a classic queue counts no further), else 1;
    * redis: the entry's delivery counter (XPENDING/XAUTOCLAIM; 1 on a first XREADGROUP);
    * nats: ``num_delivered`` of the message's JetStream metadata;
    * mqtt: 2 when the broker sets ``dup`` (MQTT counts no further), else 1;
    * sqlite (the embedded queue): its ``deliveries`` column;
    * kafka: none: always 1 (a record read again after a restart is the same Job).

    The tries of one Job (its ``backoffLimit``) come on top: the in-Job invoker adds
    the failed tries before it (jobrunner.functions.invoker.dequeue_count)."""
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Where it came from (queue, exchange, routing key, topic/partition/offset)."""
    received_at: float = 0.0
    """``time.monotonic()`` when it arrived, for latency figures."""
    published_at: float | None = None
    """The producer's timestamp (epoch seconds), when the message carries one."""
    returns_left: int | None = None
    """How many more times the source tolerates this message coming back before it drops
    or dead-letters it on its own (a quorum queue's delivery limit less the returns so
    far); None: no limit. With one or none left the dispatcher hands the message over to
    its Job as soon as the Job exists, so a crash cannot make the broker drop it."""
    positional: bool = False
    """The identity names one publish (a Kafka record's topic/partition/offset), so a
    Job found for it is always this same publish replayed: it is adopted whatever
    ``redelivered`` says. Otherwise (a message id, or a digest of the body) only a
    delivery the source marks ``redelivered`` adopts a finished Job; see the
    dispatcher's identity rule."""
    unreadable: str | None = None
    """Why the source could not decode this message (an Azure queue message that is not
    the base64 it should be, say): it cannot become a Job and is dead-lettered
    ``InvalidMessage`` with this text. ``body`` is then the message as received."""


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class JobOutcome:
    """How a Job ended, as read from its conditions (or from its disappearance)."""

    outcome: Outcome
    reason: str
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.SUCCEEDED


class Action(enum.Enum):
    ACK = "ack"
    REQUEUE = "requeue"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class OutputMessage:
    """One output message of a function: ``sink`` is the MessageSink of its binding (the
    source that carries it recognises its own kind), ``message_id`` the deterministic
    ``<job>/<binding>/<index>``."""

    sink: object
    body: bytes
    message_id: str


@dataclass(frozen=True)
class Decision:
    """What to do with a message; the dispatcher's settle step carries it out."""

    action: Action
    reason: str = ""
    detail: str = ""
    job_name: str | None = None
    message_identity: str = ""
    """The message's identity (its id, or digest, or Kafka position), carried by a
    dead-lettered copy so a consumer of the dead-letter target can drop a duplicate."""
    outputs: tuple[OutputMessage, ...] = ()
    """A function's output messages for the source to publish in the same transaction
    as this settlement (jobrunner.dispatch.outputs hands them to a source that carries them:
    Kafka to Kafka); empty when they were published before the settle step."""

    @classmethod
    def ack(cls, job_name: str | None = None) -> Decision:
        return cls(Action.ACK, job_name=job_name)

    @classmethod
    def dead_letter(cls, reason: str, detail: str = "", job_name: str | None = None) -> Decision:
        return cls(Action.DEAD_LETTER, reason=reason, detail=detail, job_name=job_name)

    def reason_headers(self, **where: str) -> dict[str, str]:
        """The ``x-jobrunner-*`` headers every source puts on a dead-lettered copy: the
        reason, its detail, the Job, the message's identity, and ``where`` it came from
        (``source_queue="q"``
        becomes ``x-jobrunner-source-queue``)."""
        headers = {"x-jobrunner-reason": self.reason, "x-jobrunner-detail": self.detail[:4000]}
        if self.job_name:
            headers["x-jobrunner-job"] = self.job_name
        if self.message_identity:
            headers["x-jobrunner-message-id"] = self.message_identity
        headers.update({f"x-jobrunner-{k.replace('_', '-')}": v for k, v in where.items()})
        return headers


@dataclass(frozen=True)
class JobStatus:
    """Where a message's Job is, as its sender may read it (the HTTP trigger's GET):
    ``phase`` is ``running`` (created, not finished: waiting for a node or running),
    ``succeeded`` or ``failed``; ``reason`` and ``message`` are the Job's condition's
    (failed), ``result`` what the Job reported of itself, when it did."""

    phase: str
    reason: str = ""
    message: str = ""
    result: Mapping[str, object] | None = None


@dataclass(frozen=True)
class TokenReview:
    """What the API server said of a bearer token (authentication.k8s.io/v1 TokenReview
    ``status``): whether it is valid and, if so, whose (``system:serviceaccount:<ns>:<name>``
    for a ServiceAccount)."""

    authenticated: bool
    username: str = ""
    groups: tuple[str, ...] = ()


TERMINATION_MESSAGE_LIMIT = 4096
"""Bytes of a container's termination message the kubelet keeps (``terminationMessagePath``,
kubernetes pkg/kubelet/kuberuntime: the file is read up to 4096 bytes into the pod's
``state.terminated.message``); the local executor keeps the same."""


@dataclass(frozen=True)
class JobResult:
    """What a finished Job came to, as its producer may be told it (a reply to the
    message's reply address, the HTTP trigger's GET): read by a ``ReadsResults``
    JobClient from the Job and its last pod.

    ``outcome``/``reason``/``message`` are the Job's finished condition's; ``exit_code``
    the last attempt's main container's (the first that exited non-zero, else the first
    container's; None when no container ended, a deadline before start, say);
    ``duration_seconds`` from the Job's ``startTime`` to its finish (None when either is
    unknown); ``payload`` the termination message of that container (the file at its
    ``terminationMessagePath``, at most ``TERMINATION_MESSAGE_LIMIT`` bytes, "" when it
    wrote none)."""

    job_name: str
    outcome: Outcome
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    duration_seconds: float | None = None
    payload: str = ""
    container: str = ""

    @property
    def succeeded(self) -> bool:
        return self.outcome is Outcome.SUCCEEDED


ANNOTATION_REPLIED = "jobrunner.dev/replied"
"""The id of the reply published for the Job's outcome (jobrunner.dispatch.replies), once
the broker confirmed it: a settlement that runs again after a crash finds it and does not
publish again."""


@dataclass(frozen=True)
class ReplyAddress:
    """Where a message's producer waits for its result, as the message's source read it
    from the message (AMQP ``reply_to`` + ``correlation_id``, a Kafka reply-topic header)
    and allowed it. ``destination``: the queue (AMQP, through the default exchange) or
    topic (Kafka), on the source's own connection; ``correlation_id``: echoed back."""

    destination: str
    correlation_id: str = ""
    kind: str = ""
    """``queue`` or ``topic``, for messages."""


@dataclass(frozen=True)
class Reply:
    """One reply to publish: ``body`` (JSON), ``reply_id`` (deterministic: the Job and its
    outcome, so a republish after a crash can be dropped by the consumer), ``attributes``
    the CloudEvents context attributes (``specversion``, ``id``, ``source``, ``type``,
    ``subject``, ``time``) that each source maps onto its binding's headers."""

    body: bytes
    reply_id: str
    correlation_id: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
