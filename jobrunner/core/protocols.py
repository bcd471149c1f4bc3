"""The two small interfaces the dispatcher core depends on: where messages come from and
where Jobs go. Broker and Kubernetes libraries stay behind them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from jobrunner.core.admission import WorkloadView
from jobrunner.core.models import (
    Decision,
    Delivery,
    JobResult,
    JobStatus,
    Reply,
    ReplyAddress,
    TokenReview,
)


class ApiRejected(Exception):
    """The API server refused a request for good (4xx other than conflict): retrying the
    same request cannot help, so the message is dead-lettered with this text."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        by: str = "the API server",
        causes: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.by = by
        """Who refused: the API server, or the local executor in its stead."""
        self.causes = causes
        """(field, reason) pairs from the answer's ``details.causes`` (metav1.Status, as a
        422 Invalid has them: ``spec.template.spec.containers[0].name``,
        ``FieldValueInvalid``): what is wrong, named without the server's text."""


class TransientError(Exception):
    """The API server or the broker could not be reached or answered 5xx/429: retry."""


class Refusal(Exception):
    """A failure whose text says all there is to say: what is wrong and what to do. A
    task that ends with one is logged in that text alone, without a traceback (which
    would only bury it); the command line prints it as its one error line."""


class SourceError(Refusal):
    """A source cannot consume now for a reason a person must fix or wait out: the
    broker is unreachable, refuses the credentials, or the queue does not exist. The
    text names the broker and the queue and says what to do; the runner retries with
    backoff and reports it on ``/readyz``."""


class SourceUnreachable(SourceError, ConnectionError):
    """The broker cannot be reached now (refused, timed out, dropped the connection): a
    ``SourceError`` that is also a ``ConnectionError``, in jobrunner's words (the host
    without credentials and what failed, never the text of what answered; see
    jobrunner.core.redaction)."""


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


@dataclass(frozen=True)
class WatchEvent:
    type: str
    """ADDED, MODIFIED, DELETED or BOOKMARK."""
    object: Mapping[str, Any]


@dataclass(frozen=True)
class JobPage:
    items: list[Mapping[str, Any]]
    resource_version: str
    continue_token: str | None


class JobClient(Protocol):
    async def create_job(
        self, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> tuple[Mapping[str, Any], bool]:
        """Create the Job, then its message Secret (``secret``, when the message needs
        one) owned by the Job from its creation (see ``jobrunner.rendering.messagesecret``).
        Returns the Job and whether it was created now; an existing Job of that name is
        returned with ``False`` (a redelivery adopting it), its Secret made if an earlier
        call stopped between the two.

        Never leaves a Secret without an owner, nor a Job whose Secret was refused: it is
        removed, and ApiRejected raised. A Secret of that name that is already there is
        used only when it holds this body (the SHA-256 of its ``body`` is the Job's
        ``jobrunner.dev/body-sha256``); otherwise ApiRejected (409,
        ``MessageSecretConflict``): it is never mounted, and a Job that may have run with
        it is removed. A Job made for another body, or being deleted, is returned as it
        is, without a Secret made for it. TransientError: try again (the next call
        completes this one)."""
        ...

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None: ...

    async def annotate_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any]:
        """Merge-patch annotations; returns the Job as it is after the patch."""
        ...

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete with background propagation, so owned pods and Secrets go too. A Job
        that still carries a finalizer stays, with ``deletionTimestamp`` set, until the
        finalizer is removed."""
        ...

    async def release_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any] | None:
        """Remove jobrunner's finalizer (``models.FINALIZER``) and merge ``annotations``
        in one write, safe against concurrent writers (retried on conflict). Returns the
        Job after it, or None when it no longer exists. A Job whose deletion was waiting
        on the finalizer is then deleted."""
        ...

    async def read_secret(self, namespace: str, name: str) -> Mapping[str, str] | None: ...

    async def record_event(
        self,
        *,
        namespace: str,
        job_name: str,
        job_uid: str | None,
        type: str,
        reason: str,
        message: str,
    ) -> None:
        """A Kubernetes Event about the Job (``type`` Normal or Warning)."""
        ...

    async def list_jobs(
        self, namespace: str, selector: str, *, limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        """One page of matching Jobs; follow ``continue_token`` for the rest. All pages
        share the first page's resourceVersion."""
        ...

    def watch_jobs(
        self, namespace: str, selector: str, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        """Events after ``resource_version``; raises WatchExpired on 410 Gone. Ends when
        the server closes the watch; the caller resumes from the last version seen."""
        ...


@runtime_checkable
class DescribesFailures(Protocol):
    """A JobClient that can say more about a failed Job than its condition does (the
    containers' exit codes, the last lines of a log): added to the dead letter's detail.
    The local executor needs none (its condition message says it already)."""

    async def failure_detail(self, namespace: str, name: str) -> str:
        """What is known, as one line; "" when nothing is. Best effort: never raises
        for what cannot be read."""
        ...


@runtime_checkable
class ReadsResults(Protocol):
    """A JobClient that can say what a finished Job came to (``JobResult``: outcome,
    reason, exit code, duration and the termination-message payload), for a reply to
    its message's producer (jobrunner.dispatch.replies) and the HTTP trigger's GET.
    Both the Kubernetes client and the local executor implement it."""

    async def job_result(self, namespace: str, name: str) -> JobResult | None:
        """The Job's result; None while it has not finished or when it is gone. Best
        effort on the pod: a pod that cannot be read leaves ``exit_code`` None and
        ``payload`` empty, the Job's own outcome is still given. Raises TransientError
        when the Job itself cannot be read now."""
        ...


@runtime_checkable
class ReadsWorkloads(Protocol):
    """A JobClient that can read the Kueue Workload of a queued Job (jobrunner.core.
    admission): Kueue's reasons for not admitting or for evicting it. The local executor
    has no Kueue and does not implement it."""

    async def workload_of(self, namespace: str, job_uid: str) -> WorkloadView | None:
        """The Workload Kueue made for the Job of uid ``job_uid`` (label
        ``kueue.x-k8s.io/job-uid``); None when there is none (not yet made, or Kueue not
        installed). Raises TransientError when it cannot be read now."""
        ...


class MessageHandle(Protocol):
    """A received message that still awaits its settlement."""

    @property
    def delivery(self) -> Delivery: ...


class MessageSource(Protocol):
    name: str

    async def start(self) -> None: ...

    def deliveries(self) -> AsyncIterator[MessageHandle]:
        """Messages as they arrive; the source applies its own backpressure (prefetch)."""
        ...

    @property
    def connected(self) -> bool:
        """Connected to the broker now (for readiness)."""
        ...

    async def depth(self) -> int | None:
        """Messages waiting in the source, when it can tell."""
        ...

    async def stop_consuming(self) -> None:
        """Take no new messages; keep the connection for settling those in hand."""
        ...

    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        """Carry out a decision on a live message. False when the broker no longer knows
        it (its channel closed): it will be redelivered, and its Job adopted then."""
        ...

    def is_durable(self, handle: MessageHandle) -> bool:
        """Whether a settlement of ``handle`` can no longer be undone by a crash (a Kafka
        record only once its offset is committed). Until then its Job must be kept: it
        is what a replay adopts."""
        ...

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        """Dead-letter a message that was already acked, from the copy kept with its Job."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class KeepsMessagesAlive(Protocol):
    """A source that renews the broker's redelivery timer while a message is in hand (SQS
    visibility, JetStream in-progress acks, Redis idle-time heartbeats, an MQTT session
    that never redelivers on a live connection), so it can hold a message as long as its
    Job runs rather than as long as RabbitMQ's ``consumer_timeout``."""

    @property
    def hold_limit_seconds(self) -> float | None:
        """How long after receipt a message can still be held: None without a limit (the
        message is settled only once its Job ends, however long it runs), else the
        broker's cap (SQS: 12 h), before which the message is handed over to its Job.
        A ScaledJob that sets ``consumerTimeoutSeconds`` overrides it."""
        ...


class OutputRefused(Exception):
    """A destination refused an output for good (too large for it, say): publishing it
    again cannot help, so the message is dead-lettered with this text."""


class MessageSink(Protocol):
    """Where an output binding's messages go (see jobrunner.dispatch.outputs). Each source module
    that can be a destination has an ``open_sink`` beside its ``open_source``."""

    async def publish(self, body: bytes, *, message_id: str) -> None:
        """Publish one message and return once the broker has it (confirmed, committed).
        ``message_id`` is deterministic per (Job, binding, index), so a consumer can
        recognise the one republish a crash can cause (see jobrunner.dispatch.outputs). Raises
        OutputRefused for a message the destination can never take; anything else is
        retried."""
        ...

    async def close(self) -> None: ...


class ReplyRefused(Exception):
    """A reply that this source will never deliver: its address is one the source does
    not allow (another exchange, a topic outside ``replyTopics``, the trigger's own queue)
    or no longer exists (a deleted reply queue). The message is dead-lettered
    ``ReplyFailed`` with the text, which names no credential and quotes no server."""


@runtime_checkable
class SendsReplies(Protocol):
    """A source that can answer a message's producer on the message's own connection
    (jobrunner.dispatch.replies): RabbitMQ's RPC pattern, a Kafka reply topic."""

    def reply_address(self, message: Mapping[str, Any]) -> ReplyAddress | None:
        """The reply address a message carries, read from its kept form (``headers``,
        ``metadata``: jobrunner.rendering.renderer.original_fields); None when it carries
        none. Raises ReplyRefused for one this source does not allow."""
        ...

    async def send_reply(self, address: ReplyAddress, reply: Reply) -> None:
        """Publish ``reply`` to ``address`` and return once the broker has it (publisher
        confirm, acks=all). ReplyRefused when it can never be delivered; anything else is
        retried, within a bound."""
        ...


class SettleHook(Protocol):
    """A collaborator the dispatcher asks, in its settle step, before a message's final
    settlement that names a Job (jobrunner.dispatch.outputs publishes a function's outputs
    there). It returns the decision to carry out (the same, or a dead letter, or the
    same with ``outputs`` for the source to publish). ``live``: the message is in hand
    (settled through the source), not a copy kept by its Job."""

    async def before_settle(
        self, decision: Decision, *, live: bool = False, message: Mapping[str, Any] | None = None
    ) -> Decision:
        """``message``: the message in its kept form (jobrunner.rendering.renderer
        .original_fields: ids, headers, metadata, maybe the body), when the settlement has
        it at hand (a live delivery, or the copy a failed Job keeps); None otherwise (the
        hook reads the Job's copy itself if it needs it)."""
        ...


@runtime_checkable
class CarriesOutputs(Protocol):
    """A source that can publish a function's outputs in the transaction that settles
    the live message they came from (Kafka: dead letter, outputs and offsets in one
    transaction), so an output is published exactly once without the Job's record."""

    def carries(self, sink: MessageSink) -> bool:
        """Whether ``sink``'s messages can go in this source's settle transaction (same
        cluster, same credentials)."""
        ...


@runtime_checkable
class TokenReviewer(Protocol):
    """Checks a Kubernetes bearer token with the API server (a TokenReview), for a source
    that authenticates its callers by ServiceAccount (the HTTP trigger)."""

    async def review_token(self, token: str, *, audiences: tuple[str, ...] = ()) -> TokenReview:
        """The API server's verdict; TransientError when it cannot be asked now. The
        token is never logged nor kept."""
        ...


@runtime_checkable
class AnswersSenders(Protocol):
    """A source whose senders wait for an answer and may ask after their message's Job
    (the HTTP trigger): the runner gives it a reader of Job status by Job name, and a
    TokenReviewer when the executor has one."""

    def bind_job_status(self, reader: Callable[[str], Awaitable[JobStatus | None]]) -> None: ...

    def bind_token_reviewer(self, reviewer: TokenReviewer) -> None: ...
