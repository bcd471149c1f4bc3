"""The core loop for one ScaledJob: receive -> render -> create -> await outcome -> settle.

It sees only the two protocols (a message source, a job client) and the tracker. Every
settlement of a message goes through ``_settle``.

Guarantees, and how:

* one Job per message: the Job name is derived from the message; a redelivery gets 409
  on create and adopts the Job it already has;
* nothing lost: a message is acked only once its outcome is durable (the Job succeeded,
  or a dead-lettered copy was confirmed), or once the Job itself keeps the message
  (ack policy ``onJobCreation``, or a handover before the broker's consumer timeout);
* crash-safe: unacked messages come back to whichever dispatcher runs next and adopt
  their Jobs; Jobs whose message was already acked are settled from the copy they keep
  when the tracker sees them finish, whoever started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from jobrunner.core.failpoints import Failpoints
from jobrunner.core.marks import JobMarks
from jobrunner.core.models import (
    ANNOTATION_ACK_POLICY,
    ANNOTATION_BODY_DIGEST,
    ANNOTATION_HANDED_OVER,
    ANNOTATION_SETTLED,
    Action,
    Decision,
    Delivery,
    JobOutcome,
)
from jobrunner.core.naming import message_secret_name
from jobrunner.core.protocols import (
    ApiRejected,
    DescribesFailures,
    JobClient,
    KeepsMessagesAlive,
    MessageHandle,
    MessageSource,
    SettleHook,
    TransientError,
)
from jobrunner.core.redaction import describe_error
from jobrunner.core.settings import DispatcherSettings
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.core.timestamps import age_seconds, seconds_between
from jobrunner.dispatch.limiter import ActiveJobs
from jobrunner.manifest.scaledjob import AckPolicy, ScaledJob
from jobrunner.observability.telemetry import Telemetry, extract_context, traceparent_of
from jobrunner.rendering.renderer import (
    ANNOTATION_ORIGINAL_MESSAGE,
    RenderedJob,
    Renderer,
    RenderError,
    original_message,
)
from jobrunner.tracking.cleanup import HistoryCleaner
from jobrunner.tracking.tracker import JobState, JobTracker, outcome_of

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class InFlight:
    """A message in hand. Another delivery of the same message while it is in hand (a
    redelivery after a channel loss, or a duplicate publish) joins ``handles``: all of
    them are settled together, the newest first, since an older one's channel may be
    gone."""

    handles: list[MessageHandle]
    span: trace.Span
    task: asyncio.Task[None] | None = None
    deciding: bool = True
    """True until the message's fate is decided; at shutdown only decided messages are
    worth waiting for (their settlement is under way)."""

    @property
    def handle(self) -> MessageHandle:
        return self.handles[-1]


def decision_for(outcome: JobOutcome, job_name: str) -> Decision:
    if outcome.succeeded:
        return Decision.ack(job_name)
    return Decision.dead_letter(outcome.reason, outcome.message, job_name)


class Dispatcher:
    def __init__(
        self,
        *,
        scaledjob: ScaledJob,
        renderer: Renderer,
        source: MessageSource,
        jobs: JobClient,
        tracker: JobTracker,
        settings: DispatcherSettings,
        telemetry: Telemetry,
        retry_ceiling: float = 30.0,
        settle_hook: SettleHook | None = None,
        marks: JobMarks | None = None,
    ) -> None:
        self.scaledjob = scaledjob
        self._settle_hook = settle_hook
        """Asked before a final settlement naming a Job (a function's outputs)."""
        self._marks = marks
        """For a ScaledJob whose pods may annotate Jobs (a function's): the settlement
        mark is signed with each Job's key, and one found on a Job is trusted only when it
        verifies (jobrunner.core.marks; the tracker screens the ones it sees)."""
        self._renderer = renderer
        self._source = source
        self._jobs = jobs
        self._tracker = tracker
        self._settings = settings
        self._retry_ceiling = retry_ceiling
        self.limiter = ActiveJobs(scaledjob.spec.maxReplicaCount)
        self._failpoints = Failpoints(settings.failpoints)
        self.inflight: dict[str, InFlight] = {}
        self.settled_here: set[str] = set()
        """Jobs whose message this process settled for good: free for cleanup."""
        self._awaiting_durable: dict[str, tuple[MessageHandle, str]] = {}
        """Settled, but not yet durably (Kafka: offset not committed yet)."""
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._tracer = telemetry.tracer
        metrics = telemetry.metrics
        # Series are keyed by namespace and name: same-named ScaledJobs of two
        # namespaces are two series, and closing one never removes the other's.
        sj = (scaledjob.namespace, scaledjob.name)
        self._m_received = metrics.messages_received.labels(*sj, source.name)
        self._m_created = metrics.jobs_created.labels(*sj)
        self._m_adopted = metrics.jobs_adopted.labels(*sj)
        self._m_succeeded = metrics.jobs_succeeded.labels(*sj)
        self._m_failed = metrics.jobs_failed
        self._m_dead = metrics.dead_lettered
        self._m_receive_to_create = metrics.receive_to_create.labels(*sj)
        self._m_publish_to_create = metrics.publish_to_create.labels(*sj)
        self._m_duration = metrics.job_duration
        self._m_unforeseen = metrics.unforeseen_errors
        self._metrics = metrics
        metrics.jobs_active.labels(*sj).set_function(lambda: len(self.limiter))
        self._unforeseen: dict[str, int] = {}
        """Unforeseen errors so far per message identity (bounded retries)."""
        self.cleaner = HistoryCleaner(
            jobs=jobs,
            tracker=tracker,
            namespace=scaledjob.namespace,
            successful_limit=scaledjob.spec.successfulJobsHistoryLimit,
            failed_limit=scaledjob.spec.failedJobsHistoryLimit,
            busy=lambda name: name in self.inflight or name in self._awaiting_durable,
            before_pass=self._promote_durable,
            settled=self.settled_here,
        )
        self._log = logging.LoggerAdapter(
            logger, {"scaledjob": scaledjob.name, "source": source.name}
        )
        tracker.on_finished(self._job_finished)
        tracker.on_deletion(self._job_deleting)
        self._working_on: set[str] = set()
        """Jobs with a settle-from-copy or release task running (one at a time each)."""
        self.last_message_at: float | None = None
        """When the last message arrived (epoch seconds), for the operator's status."""
        self.rejected_in_row = 0
        """Job creates the API server refused since the last one it accepted (for the
        operator's status: a template only the server refuses must not look Ready)."""
        self.last_rejection: ApiRejected | None = None

    def resize(self, scaledjob: ScaledJob) -> None:
        """Take a new spec whose only changes are limits (``maxReplicaCount``, history):
        applied live, nothing restarted. The caller checks that nothing else changed."""
        spec = scaledjob.spec
        self.scaledjob = scaledjob
        self.limiter.resize(spec.maxReplicaCount)
        self.cleaner.set_limits(
            successful=spec.successfulJobsHistoryLimit, failed=spec.failedJobsHistoryLimit
        )

    def close(self) -> None:
        """Undo what construction registered: the tracker listener and the metric series
        of this ScaledJob (a replaced unit must leave no second settler or stale series)."""
        self._tracker.remove_listener(self._job_finished)
        self._tracker.remove_deletion_listener(self._job_deleting)
        sj = (self.scaledjob.namespace, self.scaledjob.name)
        for metric in (
            self._metrics.jobs_active,
            self._metrics.jobs_created,
            self._metrics.jobs_adopted,
            self._metrics.jobs_succeeded,
            self._metrics.receive_to_create,
            self._metrics.publish_to_create,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(*sj)
        with contextlib.suppress(KeyError):
            self._metrics.messages_received.remove(*sj, self._source.name)
        self._metrics.forget(*sj)

    def _series(self, metric: str, reason: str) -> tuple[str, str, str]:
        """(namespace, scaledjob, reason) labels of a by-reason metric, the reason bounded
        (``Metrics.reason``)."""
        ns, name = self.scaledjob.namespace, self.scaledjob.name
        return ns, name, self._metrics.reason(ns, name, metric, reason)

    # ------------------------------------------------------------------ receive
    async def run(self) -> None:
        """Consume until cancelled; Jobs and unsettled messages are left for the next run."""
        await self._tracker.synced.wait()
        self.limiter.seed(self._tracker.unfinished())
        # Jobs that finished while no dispatcher was watching and whose message was
        # already acked are settled from the copy they keep; Jobs deleted meanwhile
        # wait on their finalizer for this dispatcher.
        for state in list(self._tracker.jobs.values()):
            if state.outcome is not None:
                self._job_finished(state, state.outcome)
        for state in self._tracker.deleting():
            self._job_deleting(state)
        async for handle in self._source.deliveries():
            await self._accept(handle)

    async def _accept(self, handle: MessageHandle) -> None:
        delivery = handle.delivery
        self._m_received.inc()
        self.last_message_at = time.time()
        self._log.debug(
            "received message %s", delivery.identity, extra={"message_id": delivery.identity}
        )
        span = self._tracer.start_span(
            "jobrunner.message",
            context=extract_context(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": delivery.source,
                "messaging.destination.name": delivery.metadata.get("queue", ""),
                "messaging.message.id": delivery.message_id or "",
                "jobrunner.scaledjob": self.scaledjob.name,
                "jobrunner.message_identity": delivery.identity,
            },
        )
        try:
            with trace.use_span(span), self._tracer.start_as_current_span("render"):
                # The Job joins the message's trace through TRACEPARENT. Rendered off
                # the event loop, under the render limits (see jobrunner.rendering.sandbox); one
                # message at a time per ScaledJob, as it always was.
                extra = {"TRACEPARENT": traceparent_of(span) or ""}
                rendered = await self._renderer.render_bounded(delivery, extra_env=extra)
        except RenderError as exc:
            self._message_log(delivery).warning("message cannot become a Job: %s", exc)
            span.set_status(Status(StatusCode.ERROR, exc.reason))
            self._spawn(
                self._settle_and_end(
                    span, handles=[handle], decision=Decision.dead_letter(exc.reason, exc.detail)
                ),
                name=f"settle-unrenderable-{delivery.identity[:40]}",
            )
            return
        except Exception as exc:  # a bug or a library change: never leave it in hand
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            self._spawn(
                self._end_after(span, self._release_unforeseen([handle], None, exc)),
                name=f"unforeseen-{delivery.identity[:40]}",
            )
            return
        span.set_attribute("jobrunner.job_name", rendered.name)
        current = self.inflight.get(rendered.name)
        if current is not None:
            self._join(current, handle, rendered.name, span)
            return
        record = InFlight(handles=[handle], span=span)
        self.inflight[rendered.name] = record
        record.task = self._spawn(self._process(rendered, record), name=f"message-{rendered.name}")

    def _join(self, current: InFlight, handle: MessageHandle, name: str, span: trace.Span) -> None:
        """The same identity again while a delivery of it is in hand: a redelivery or a
        duplicate publish joins it and is settled with it; another body under the same
        message id is a different message and is dead-lettered at once."""
        delivery = handle.delivery
        log = self._message_log(delivery, name)
        if delivery.body != current.handle.delivery.body:
            decision = self._reused_id(delivery, name, "a message in hand")
            log.warning("message id reused for another body: %s", decision.detail)
            self._spawn(
                self._settle_and_end(span, handles=[handle], decision=decision),
                name=f"settle-reused-{name}",
            )
            return
        current.handles.append(handle)
        self._m_adopted.inc()
        how = "was redelivered" if delivery.redelivered else "was published again"
        log.info("message %s while in hand; it joins Job %s", how, name)
        self._event_by_name(
            name, "Normal", "Adopted", f"message {delivery.identity} {how}; it joins this Job"
        )
        span.set_attribute("jobrunner.merged_into_inflight", True)
        span.end()

    def _message_log(
        self, delivery: Delivery, job_name: str | None = None
    ) -> logging.LoggerAdapter[Any]:
        """A logger whose lines carry the message's fields (and its Job's, when it has one)."""
        extra = {**(self._log.extra or {}), "message_id": delivery.identity}
        if job_name:
            extra["job_name"] = job_name
        return logging.LoggerAdapter(self._log.logger, extra)

    def _job_log(self, job_name: str) -> logging.LoggerAdapter[Any]:
        """A logger whose lines carry the Job (and the message id the Job records)."""
        state = self._tracker.jobs.get(job_name)
        return logging.LoggerAdapter(
            self._log.logger,
            {
                **(self._log.extra or {}),
                "job_name": job_name,
                "message_id": state.message_id if state else "",
            },
        )

    def _reused_id(self, delivery: Delivery, name: str, holder: str) -> Decision:
        return Decision.dead_letter(
            "MessageIdReused",
            f"message id {delivery.message_id or delivery.identity!r} already belongs to "
            f"{holder} (Job {name}) with a different body; it was not run. Give every "
            "message its own message_id",
            name,
        )

    async def _end_after(self, span: trace.Span, work: Awaitable[None]) -> None:
        with trace.use_span(span, end_on_exit=True):
            await work

    async def _settle_and_end(self, span: trace.Span, **kwargs: Any) -> None:
        with trace.use_span(span, end_on_exit=True):
            await self._settle(**kwargs)

    def _spawn(self, coro: Awaitable[None], *, name: str) -> asyncio.Task[None]:
        task = start_guarded(coro, name=name, long_lived=False)  # type: ignore[arg-type]
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    # ------------------------------------------------------------------ create + wait
    async def _process(self, rendered: RenderedJob, record: InFlight) -> None:
        name = rendered.name
        log = self._message_log(record.handle.delivery, name)
        try:
            with trace.use_span(record.span, end_on_exit=True):
                try:
                    await self._create_wait_settle(rendered, record, log)
                except Exception as exc:  # nobody foresaw it: never leave the message in hand
                    record.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    if name not in self._tracker.unfinished():
                        self.limiter.release(name)
                    await self._release_unforeseen(record.handles, name, exc)
        finally:
            if self.inflight.get(name) is record:
                del self.inflight[name]

    async def _release_unforeseen(
        self, handles: list[MessageHandle], name: str | None, exc: Exception
    ) -> None:
        """An error nobody foresaw (a bug, a library that changed): the message goes back
        to the source to be tried again, and after ``max_unforeseen_errors`` tries it is
        dead-lettered ``InternalError`` with the exception, so no message ever stays in
        hand and none loops forever. The dispatcher goes on."""
        delivery = handles[-1].delivery
        log = self._message_log(delivery, name)
        self._m_unforeseen.labels(*self._series("unforeseen_errors", type(exc).__name__)).inc()
        count = self._unforeseen.get(delivery.identity, 0) + 1
        self._unforeseen[delivery.identity] = count
        limit = self._settings.max_unforeseen_errors
        # The dead letter's detail reaches the ScaledJob's author (headers, the Job's
        # annotations and Events): jobrunner's words only, since the exception may quote
        # a server the author chose. The traceback, for the bug it is, goes to the log.
        words = describe_error(exc)
        log.error(
            "unforeseen error processing the message (try %d of %d): %s",
            count,
            limit,
            words,
            exc_info=exc,
        )
        dead = Decision.dead_letter("InternalError", f"{words} (after {count} tries)", name)
        try:
            if count < limit:
                requeue = Decision(Action.REQUEUE, reason="InternalError", job_name=name)
                if await self._settle(handles=handles, decision=requeue, final=False):
                    return
                # The source cannot hand it out again now (a Kafka record is read again
                # only after a restart): dead-letter it rather than hold it.
            self._unforeseen.pop(delivery.identity, None)
            await self._settle(handles=handles, decision=dead, final=False)
        except Exception as again:
            log.error(
                "could not release the message either (%s); it returns to the source when "
                "its connection closes",
                again,
            )

    async def _create_wait_settle(
        self, rendered: RenderedJob, record: InFlight, log: logging.LoggerAdapter[Any]
    ) -> None:
        name = rendered.name
        with self._tracer.start_as_current_span("wait-for-slot"):
            await self.limiter.acquire(name)
        self._failpoints.hit("before-create")
        try:
            with self._tracer.start_as_current_span("create") as create_span:
                job, created = await self._retry(
                    lambda: self._jobs.create_job(rendered.job, rendered.secret)
                )
                create_span.set_attribute("jobrunner.adopted", not created)
                if not created and self._marks is not None:
                    marks = self._marks
                    adopted = job
                    job = await self._retry(lambda: marks.screen(adopted))
        except ApiRejected as exc:
            self.limiter.release(name)
            self.rejected_in_row, self.last_rejection = self.rejected_in_row + 1, exc
            log.warning("%s rejected Job %s: %s", exc.by, name, exc)
            record.deciding = False
            await self._settle(
                handles=record.handles,
                decision=Decision.dead_letter(
                    "ApiRejected", f"{exc.status} {exc.reason}: {exc.message}", name
                ),
            )
            return
        self._failpoints.hit("after-create")
        self.rejected_in_row = 0
        delivery = record.handle.delivery
        finished = outcome_of(job)
        if created:
            self._m_created.inc()
            self._m_receive_to_create.observe(time.monotonic() - delivery.received_at)
            if delivery.published_at is not None:
                self._m_publish_to_create.observe(max(0.0, time.time() - delivery.published_at))
            log.info("created Job %s", name)
        else:
            refusal = self._refuse_reuse(job, delivery, finished)
            if refusal is not None:
                if finished is not None or name not in self._tracker.unfinished():
                    self.limiter.release(name)
                record.deciding = False
                log.warning("not run: %s", refusal.detail)
                await self._settle(handles=record.handles, decision=refusal, final=False)
                return
            self._adopted(job, delivery, log)
        if finished is not None:
            self.limiter.release(name)
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        record.deciding = False
        if annotations.get(ANNOTATION_SETTLED):
            # Settled before, but the ack was lost: the outcome is already durable.
            await self._settle(handles=record.handles, decision=Decision.ack(name), final=False)
            return
        if (
            annotations.get(ANNOTATION_ACK_POLICY) == AckPolicy.ON_JOB_CREATION.value
            or annotations.get(ANNOTATION_HANDED_OVER) == "true"
        ):
            # The Job keeps the message; failures are dead-lettered from that copy.
            await self._settle(handles=record.handles, decision=Decision.ack(name), final=False)
            log.info("acked the message: Job %s keeps it from now on", name)
            return
        record.deciding = finished is None
        with self._tracer.start_as_current_span("wait") as wait_span:
            outcome = finished or await self._wait_or_hand_over(name, record, log)
            wait_span.set_attribute(
                "jobrunner.outcome", outcome.reason if outcome else "handed-over"
            )
        if outcome is None:
            return  # handed over
        record.deciding = False
        if not outcome.succeeded:
            record.span.set_status(Status(StatusCode.ERROR, outcome.reason))
        await self._settle(handles=record.handles, decision=await self._decide(outcome, name))

    def _refuse_reuse(
        self, job: Mapping[str, Any], delivery: Delivery, finished: JobOutcome | None
    ) -> Decision | None:
        """The identity rule for a message whose Job already exists. None: adopt the Job
        (a redelivery, a replayed Kafka record, or a duplicate publish while the Job still
        runs). A dead letter saying why: a different body under the same message id
        (``MessageIdReused``), or a fresh publish of a message whose Job already finished
        (``DuplicateMessage``) — a message is never acked for work it did not get."""
        meta = job.get("metadata") or {}
        name = str(meta.get("name", ""))
        digest = (meta.get("annotations") or {}).get(ANNOTATION_BODY_DIGEST)
        if digest and digest != hashlib.sha256(delivery.body).hexdigest():
            return self._reused_id(delivery, name, "an earlier message")
        if delivery.redelivered or delivery.positional or finished is None:
            return None
        state = "succeeded" if finished.succeeded else f"failed ({finished.reason})"
        return Decision.dead_letter(
            "DuplicateMessage",
            f"this message (id {delivery.message_id or delivery.identity!r}) already ran as "
            f"Job {name}, which {state}; a new publish of it is not run again. To run it "
            "again, publish it with a new message_id, or replay its dead letter "
            "(jobrunner dead-letters --replay)",
            name,
        )

    def _adopted(
        self, job: Mapping[str, Any], delivery: Delivery, log: logging.LoggerAdapter[Any]
    ) -> None:
        name = (job.get("metadata") or {}).get("name", "")
        self._m_adopted.inc()
        if delivery.redelivered or delivery.positional:
            how = "was delivered again"
        else:
            how = "was published again while its Job runs"
        log.info("message %s: adopted its existing Job %s", how, name)
        self._event(
            job,
            "Normal",
            "Adopted",
            f"message {delivery.identity} {how}; adopted this Job instead of creating another",
        )

    async def _wait_or_hand_over(
        self, name: str, record: InFlight, log: logging.LoggerAdapter[Any]
    ) -> JobOutcome | None:
        """The Job's outcome, or None once the message was handed over to the Job because
        the broker's consumer timeout was near."""
        limit = self._hold_limit()
        margin = self._settings.handover_margin_seconds
        delivery = record.handle.delivery
        at_risk = delivery.returns_left is not None and delivery.returns_left <= 1
        while True:
            held = time.monotonic() - delivery.received_at
            budget = None if limit is None else limit - margin - held
            if at_risk:
                budget = 0.0  # one more return and the broker drops it: hand it over now
            try:
                return await asyncio.wait_for(
                    asyncio.shield(self._tracker.wait_for(name)),
                    timeout=None if budget is None else max(budget, 0.0),
                )
            except TimeoutError:
                pass
            job = await self._retry(
                lambda: self._jobs.annotate_job(
                    self.scaledjob.namespace, name, {ANNOTATION_HANDED_OVER: "true"}
                )
            )
            # The patched object tells whether the Job finished first: then settle the
            # live message normally; otherwise the Job now owns it.
            finished = outcome_of(job)
            if finished is not None:
                return finished
            if at_risk:
                log.info(
                    "message near the queue's delivery limit (%s return(s) left): handing "
                    "it over to Job %s",
                    delivery.returns_left,
                    name,
                )
            else:
                held = time.monotonic() - delivery.received_at  # as of now
                log.info(
                    "message held %.0fs, near the consumer timeout: handing it over to Job %s",
                    held,
                    name,
                )
            record.deciding = False
            await self._settle(handles=record.handles, decision=Decision.ack(name), final=False)
            return None

    def _hold_limit(self) -> float | None:
        """Seconds a message may be held before it is handed over to its Job: the
        ScaledJob's ``consumerTimeoutSeconds`` when set, else the source's own limit when
        it keeps messages alive (None: no limit), else the RabbitMQ-minded default."""
        spec = self.scaledjob.spec
        if "consumerTimeoutSeconds" not in spec.model_fields_set and isinstance(
            self._source, KeepsMessagesAlive
        ):
            return self._source.hold_limit_seconds
        return spec.consumerTimeoutSeconds

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        delay = 0.1
        while True:
            try:
                return await call()
            except TransientError as exc:
                pause = delay * (0.5 + random.random() / 2)
                self._log.warning("Kubernetes API unavailable (%s); retrying in %.1fs", exc, pause)
                await asyncio.sleep(pause)
                delay = min(self._retry_ceiling, delay * 2)

    # ------------------------------------------------------------------ settle
    async def _settle(
        self,
        *,
        decision: Decision,
        handles: list[MessageHandle] | None = None,
        original: Mapping[str, Any] | None = None,
        final: bool = True,
    ) -> bool:
        """The one place a message is settled: a live message through the source, or an
        already-acked one from the copy its Job keeps (dead-letter only). ``final`` says
        the decision is the message's outcome (not an ack that hands it to its Job); only
        then is it recorded: for cleanup, and on the Job for a dead letter."""
        self._failpoints.hit("before-settle")
        if final and decision.job_name and self._settle_hook is not None:
            decision = await self._settle_hook.before_settle(decision, live=bool(handles))
            if decision.action is Action.DEAD_LETTER and not handles and original is None:
                # A Job that keeps its message succeeded, but its outputs cannot go out
                # (or its result is not trusted): dead-letter the copy the Job keeps.
                name = decision.job_name or ""
                job = await self._retry(lambda: self._jobs.get_job(self.scaledjob.namespace, name))
                original = await self._kept_copy(job) if job is not None else None
                if original is None:
                    self._job_log(name).error(
                        "Job %s: %s (%s), and it keeps no copy of its message to dead-letter",
                        name,
                        decision.reason,
                        decision.detail,
                    )
                    return False
        identity = handles[-1].delivery.identity if handles else ""
        if not identity and original is not None:
            identity = str(original.get("identity") or original.get("message_id") or "")
        decision = replace(decision, message_identity=identity)
        with self._tracer.start_as_current_span("settle") as span:
            span.set_attribute("jobrunner.settlement", decision.action.value)
            if decision.reason:
                span.set_attribute("jobrunner.reason", decision.reason)
            if handles:
                if not await self._settle_live(handles, decision):
                    span.set_attribute("jobrunner.redelivery_expected", True)
                    return False
                if decision.action is not Action.REQUEUE:
                    # Gone from the broker: its count of unforeseen errors goes too (a
                    # message that failed once and then succeeded must not stay here).
                    self._unforeseen.pop(identity, None)
            elif decision.action is Action.DEAD_LETTER and original is not None:
                await self._source.dead_letter_copy(original, decision)
        delivery = handles[-1].delivery if handles else None
        log = self._log
        if delivery is not None:
            log = self._message_log(delivery, decision.job_name)
        elif decision.job_name:
            log = logging.LoggerAdapter(
                self._log.logger,
                {
                    **(self._log.extra or {}),
                    "job_name": decision.job_name,
                    "message_id": str((original or {}).get("identity") or ""),
                },
            )
        if decision.action is Action.DEAD_LETTER:
            self._m_dead.labels(*self._series("dead_lettered", decision.reason)).inc()
            if decision.job_name:
                self._event_by_name(
                    decision.job_name,
                    "Warning",
                    "DeadLettered",
                    f"message dead-lettered: {decision.reason} {decision.detail}",
                )
            log.warning(
                "dead-lettered the message (%s): %s %s",
                f"Job {decision.job_name}" if decision.job_name else "no Job was created",
                decision.reason,
                decision.detail,
            )
        elif decision.action is Action.ACK:
            log.info(
                "acked the message%s",
                f" (Job {decision.job_name})" if decision.job_name else "",
            )
        else:
            log.info("released the message to the source to be tried again")
        if not final or not decision.job_name:
            return True
        # The settlement is recorded on the Job together with the finalizer's removal
        # (so a redelivery after a lost ack, or another dispatcher, never dead-letters
        # the same message twice), and only once it is durable: a Kafka record is
        # settled for good when its offset is committed; before that a crash replays it,
        # and the replay must still find its Job.
        durable = not handles or self._source.is_durable(handles[-1])
        if durable:
            self.settled_here.add(decision.job_name)
            await self._release(decision.job_name, decision.action.value)
            self.cleaner.trigger()
        elif handles:
            self._awaiting_durable[decision.job_name] = (handles[-1], decision.action.value)
        return True

    def _promote_durable(self) -> None:
        for name, (handle, settled) in list(self._awaiting_durable.items()):
            if self._source.is_durable(handle):
                del self._awaiting_durable[name]
                self.settled_here.add(name)
                self._release_soon(name, settled)
            elif name not in self._tracker.jobs:
                del self._awaiting_durable[name]  # gone anyway (TTL, someone else)

    async def _release(self, name: str, settled: str) -> None:
        """The message of Job ``name`` has a durable fate: remove the finalizer (and
        record the settlement) in one write, so the Job may now be deleted."""
        try:
            mark = {ANNOTATION_SETTLED: settled}
            if self._marks is not None:
                mark = await self._signed(self._marks, name, mark)
            await self._retry(lambda: self._jobs.release_job(self.scaledjob.namespace, name, mark))
        except ApiRejected as exc:
            self._job_log(name).warning("could not release Job %s: %s", name, exc)

    async def _signed(self, marks: JobMarks, name: str, mark: dict[str, str]) -> dict[str, str]:
        """``mark`` with its MAC for Job ``name`` (its uid from the watch, else the API)."""
        state = self._tracker.jobs.get(name)
        uid = state.uid if state is not None else ""
        if not uid:
            job = await self._retry(lambda: self._jobs.get_job(self.scaledjob.namespace, name))
            uid = str(((job or {}).get("metadata") or {}).get("uid", ""))
        return await self._retry(lambda: marks.sign(name, uid, mark))

    def _release_soon(self, name: str, settled: str) -> None:
        self._once(name, self._release(name, settled), f"release-{name}")

    def _once(self, name: str, work: Coroutine[Any, Any, None], task_name: str) -> None:
        """Run ``work`` for Job ``name`` unless work for it already runs (two listeners
        may react to the same Job: it finished, and its deletion began)."""
        if name in self._working_on:
            work.close()
            return
        self._working_on.add(name)

        async def guarded() -> None:
            try:
                await work
            finally:
                self._working_on.discard(name)

        self._spawn(guarded(), name=task_name)

    async def _settle_live(self, handles: list[MessageHandle], decision: Decision) -> bool:
        """The decision on the newest live delivery; every other delivery of the same
        message in hand is a duplicate of a settled message, so it is acked. False when
        none could be settled (all their channels are gone: the broker redelivers)."""
        settled = False
        for handle in reversed(handles):
            if not settled:
                settled = await self._source.settle(handle, decision)
            else:
                await self._source.settle(handle, Decision.ack(decision.job_name))
        return settled

    def _job_finished(self, state: JobState, outcome: JobOutcome) -> None:
        self.limiter.release(state.name)
        if outcome.succeeded:
            self._m_succeeded.inc()
        else:
            self._m_failed.labels(*self._series("jobs_failed", outcome.reason)).inc()
        duration = seconds_between(state.created, state.finished_at)
        if duration is not None:
            self._m_duration.labels(
                self.scaledjob.namespace, self.scaledjob.name, outcome.outcome.value
            ).observe(duration)
        self.cleaner.trigger()
        if not self._owns_message(state) or state.name in self.inflight:
            return
        if state.settled:
            if state.guarded:  # settled, but the release did not happen (a crash)
                self._release_soon(state.name, state.settled)
            return
        if outcome.succeeded:
            if state.guarded:
                self._release_succeeded_kept(state)
            return
        if outcome.reason == "JobDeleted" and not state.guarded:
            # A Job from before finalizers: its kept copy went with it.
            self._job_log(state.name).error(
                "Job %s, which owned its acked message, was deleted before it finished", state.name
            )
            return
        self._once(state.name, self._settle_kept(state, outcome), f"settle-kept-{state.name}")

    def _release_succeeded_kept(self, state: JobState) -> None:
        """A Job that keeps its (acked) message succeeded. With a settle hook (a
        function's outputs) the success goes through ``_settle`` so the hook runs before
        the Job is released; else the Job is simply released."""
        if self._settle_hook is None:
            self._release_soon(state.name, Action.ACK.value)
            return
        self._once(state.name, self._settle_succeeded(state.name), f"settle-kept-{state.name}")

    async def _settle_succeeded(self, name: str) -> None:
        await self._settle(decision=Decision.ack(name))

    @staticmethod
    def _owns_message(state: JobState) -> bool:
        """The Job keeps its message (acked on creation, or handed over): failures are
        dead-lettered from its copy by whichever dispatcher sees them."""
        return state.ack_policy == AckPolicy.ON_JOB_CREATION.value or state.handed_over

    def _job_deleting(self, state: JobState) -> None:
        """A Job that still carries our finalizer is being deleted (a person, the TTL
        controller, history cleanup, a namespace deletion). Its message is settled
        first, then the finalizer goes and the deletion finishes:

        * its message is in hand here: the waiting task settles it (the Job's outcome,
          or ``JobDeleted`` if it had not finished) and releases the Job;
        * already settled (a crash came between the settlement and the release): release;
        * the Job keeps its message: dead-letter ``JobDeleted`` (or its failure) from the
          copy, or nothing if it succeeded; then release (``_job_finished`` does both);
        * otherwise the message is with the broker or another dispatcher: its delivery
          adopts the Job and settles it here or there. If none comes within the grace
          (a crash came between an ack and the release), the Job is let go.
        """
        if state.name in self.inflight:
            return
        if state.settled:
            self._release_soon(state.name, state.settled)
            return
        if self._owns_message(state):
            if state.outcome is not None:
                self._job_finished_quietly(state, state.outcome)
            return
        self._once(state.name, self._release_if_unclaimed(state), f"release-late-{state.name}")

    def _job_finished_quietly(self, state: JobState, outcome: JobOutcome) -> None:
        """The settle-or-release half of ``_job_finished`` (no metrics: counted once)."""
        if outcome.succeeded and not state.settled:
            self._release_succeeded_kept(state)
        elif state.settled:
            self._release_soon(state.name, state.settled)
        else:
            self._once(state.name, self._settle_kept(state, outcome), f"settle-kept-{state.name}")

    async def _release_if_unclaimed(self, state: JobState) -> None:
        grace = self._settings.unclaimed_deletion_grace_seconds
        await asyncio.sleep(max(0.0, grace - age_seconds(state.finished_at)))
        current = self._tracker.jobs.get(state.name)
        if current is None or not current.guarded or state.name in self.inflight:
            return  # released elsewhere, or its message arrived meanwhile
        self._job_log(state.name).warning(
            "Job %s is being deleted and no delivery of its message came within %.0fs: "
            "its message was settled before a crash; letting the deletion finish",
            state.name,
            grace,
        )
        await self._release(state.name, "abandoned")

    async def _decide(self, outcome: JobOutcome, name: str) -> Decision:
        """``decision_for``, a failure's detail completed with what the executor can still
        tell (exit codes, the last lines of a log): best effort, at most a few seconds."""
        decision = decision_for(outcome, name)
        if decision.action is not Action.DEAD_LETTER or not isinstance(
            self._jobs, DescribesFailures
        ):
            return decision
        try:
            extra = await asyncio.wait_for(
                self._jobs.failure_detail(self.scaledjob.namespace, name), timeout=5.0
            )
        except Exception as exc:  # the detail is a courtesy; the dead letter is not
            self._log.debug("no failure detail for Job %s: %s", name, exc)
            return decision
        if not extra:
            return decision
        return replace(decision, detail=f"{decision.detail}; {extra}" if decision.detail else extra)

    async def _settle_kept(self, state: JobState, outcome: JobOutcome) -> None:
        decision = await self._decide(outcome, state.name)
        if decision.action is not Action.DEAD_LETTER:
            await self._settle(decision=decision)
            return
        job = await self._retry(lambda: self._jobs.get_job(self.scaledjob.namespace, state.name))
        if job is None:
            self._job_log(state.name).error(
                "Job %s vanished before its failure could be dead-lettered", state.name
            )
            return
        original = await self._kept_copy(job)
        if original is None:
            self._job_log(state.name).error(
                "Job %s failed (%s) but keeps no copy of its message", state.name, outcome.reason
            )
            return
        await self._settle(decision=decision, original=original)

    async def _kept_copy(self, job: Mapping[str, Any]) -> dict[str, Any] | None:
        """The copy of its message a Job keeps (annotation or Secret), None without one."""
        name = str((job.get("metadata") or {}).get("name", ""))
        secret = None
        # With marks, the copy in the Secret (which pods cannot write) is always read: it
        # wins over an annotation (see rendering.original_message).
        always = self._marks is not None and self._marks.reads_secrets
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        if always or ANNOTATION_ORIGINAL_MESSAGE not in annotations:
            secret = await self._retry(
                lambda: self._jobs.read_secret(self.scaledjob.namespace, message_secret_name(name))
            )
        return original_message(job, secret)

    # ------------------------------------------------------------------ events
    def _event(self, job: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the Job for a dispatcher decision; best effort, never in
        the way of settling."""
        meta = job.get("metadata") or {}
        self._spawn(
            self._record_event(meta.get("name", ""), meta.get("uid"), kind, reason, message),
            name=f"event-{reason}-{meta.get('name', '')}",
        )

    def _event_by_name(self, name: str, kind: str, reason: str, message: str) -> None:
        state = self._tracker.jobs.get(name)
        self._spawn(
            self._record_event(name, state.uid if state else None, kind, reason, message),
            name=f"event-{reason}-{name}",
        )

    async def _record_event(
        self, name: str, uid: str | None, kind: str, reason: str, message: str
    ) -> None:
        try:
            await self._jobs.record_event(
                namespace=self.scaledjob.namespace,
                job_name=name,
                job_uid=uid,
                type=kind,
                reason=reason,
                message=message,
            )
        except (ApiRejected, TransientError) as exc:
            self._log.info("could not record %s event on Job %s: %s", reason, name, exc)

    # ------------------------------------------------------------------ shutdown
    async def drain(self, *, grace: float) -> int:
        """Stop taking messages, give in-flight work ``grace`` seconds to settle, then
        cancel it: unsettled messages return to the broker, Jobs keep running. Returns
        how many messages were released unsettled (for the shutdown's summary line)."""
        await self._source.stop_consuming()
        undecided = [r.task for r in self.inflight.values() if r.deciding and r.task is not None]
        for task in undecided:
            # Waiting on a Job or on the API: nothing is decided, so let the message go
            # back to the broker now; the next dispatcher adopts the Job.
            task.cancel()
        await stop_tasks(list(self._side_tasks), grace=grace)
        return len(undecided)
