"""The life of one message's Job: wait for a slot (``maxReplicaCount``), create the Job
and its message Secret (or adopt the Job a redelivery finds), wait for its outcome
through the tracker, or hand the message over to the Job when the broker's consumer
timeout (or delivery limit) is near; then have the message settled.

Every settlement goes through ``settlement``; the identity rule for an adopted Job is
``intake``'s. Imports, of the dispatch modules, ``intake`` and below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from jobrunner.core.admission import is_queued, is_suspended
from jobrunner.core.models import (
    ANNOTATION_ACK_POLICY,
    ANNOTATION_HANDED_OVER,
    ANNOTATION_SETTLED,
    Decision,
    Delivery,
    JobOutcome,
)
from jobrunner.core.protocols import ApiRejected, KeepsMessagesAlive
from jobrunner.dispatch.admission import Admission
from jobrunner.dispatch.events import JobEvents
from jobrunner.dispatch.intake import InFlight, Intake, refuse_reuse
from jobrunner.dispatch.limiter import ActiveJobs
from jobrunner.dispatch.metrics import DispatchMetrics
from jobrunner.dispatch.scope import Scope
from jobrunner.dispatch.settlement import Settlement
from jobrunner.manifest.scaledjob import AckPolicy
from jobrunner.rendering.renderer import RenderedJob
from jobrunner.tracking.tracker import outcome_of

Log = logging.LoggerAdapter[Any]


class Lifecycle:
    def __init__(
        self,
        *,
        scope: Scope,
        intake: Intake,
        settlement: Settlement,
        limiter: ActiveJobs,
        events: JobEvents,
        metrics: DispatchMetrics,
        admission: Admission,
    ) -> None:
        self._scope = scope
        self._admission = admission
        self._queued_seen = False
        """A Job of this ScaledJob came back from the API server queued by Kueue."""
        self._intake = intake
        self._settlement = settlement
        self._limiter = limiter
        self._events = events
        self._metrics = metrics
        self.rejected_in_row = 0
        """Job creates the API server refused since the last one it accepted (for the
        operator's status: a template only the server refuses must not look Ready)."""
        self.last_rejection: ApiRejected | None = None

    async def process(self, rendered: RenderedJob, record: InFlight) -> None:
        """The message in ``record`` from its Job's creation to its settlement; an error
        nobody foresaw releases it (``Settlement.release_unforeseen``)."""
        name = rendered.name
        log = self._scope.message_log(record.handle.delivery, name)
        try:
            with trace.use_span(record.span, end_on_exit=True):
                try:
                    await self._create_wait_settle(rendered, record, log)
                except Exception as exc:  # nobody foresaw it: never leave the message in hand
                    record.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    if name not in self._scope.tracker.unfinished():
                        self._limiter.release(name)
                    await self._settlement.release_unforeseen(record.handles, name, exc)
        finally:
            self._intake.done(name, record)

    async def _create_wait_settle(self, rendered: RenderedJob, record: InFlight, log: Log) -> None:
        name = rendered.name
        with self._scope.tracer.start_as_current_span("wait-for-slot"):
            queued = is_queued(rendered.job) or self._queued_seen
            await self._limiter.acquire(name, queued=queued)
        self._scope.failpoints.hit("before-create")
        made = await self._create(rendered, record, log)
        if made is None:
            return
        job, created = made
        self._scope.failpoints.hit("after-create")
        if is_queued(job):
            # The API server's answer says whether Kueue holds the Job (its webhook may add
            # the queue label itself: LocalQueue defaulting), and an adopted Job may long be
            # admitted: the slot follows it, and so does every later acquisition. The
            # tracker's state, when it has one, is newer than this answer (Kueue may have
            # admitted the Job before the answer was read).
            self._queued_seen = True
            seen = self._scope.tracker.jobs.get(name)
            waits = seen.pending_admission if seen is not None else is_suspended(job)
            self._limiter.admission(name, pending=waits)
        self.rejected_in_row = 0
        finished = outcome_of(job)
        if not await self._created_or_adopted(
            name=name, job=job, created=created, finished=finished, record=record, log=log
        ):
            return
        if finished is not None:
            self._limiter.release(name)
        else:
            secret = rendered.secret["metadata"]["name"] if rendered.secret else None
            await self._admission.check_created(job, secret=secret)
        record.deciding = False
        if await self._kept_by_job(name=name, job=job, record=record, log=log):
            return
        record.deciding = finished is None
        with self._scope.tracer.start_as_current_span("wait") as wait_span:
            outcome = finished or await self._wait_or_hand_over(name, record, log)
            wait_span.set_attribute(
                "jobrunner.outcome", outcome.reason if outcome else "handed-over"
            )
        if outcome is None:
            return  # handed over
        record.deciding = False
        if not outcome.succeeded:
            record.span.set_status(Status(StatusCode.ERROR, outcome.reason))
        decision = await self._settlement.decide(outcome, name)
        await self._settlement.settle(handles=record.handles, decision=decision)

    async def _create(
        self, rendered: RenderedJob, record: InFlight, log: Log
    ) -> tuple[Mapping[str, Any], bool] | None:
        """The Job and whether this call created it; None once the API server refused it
        and the message was dead-lettered ``ApiRejected``."""
        scope, name = self._scope, rendered.name
        try:
            with scope.tracer.start_as_current_span("create") as create_span:
                job, created = await scope.retry(
                    lambda: scope.jobs.create_job(rendered.job, rendered.secret)
                )
                create_span.set_attribute("jobrunner.adopted", not created)
                if not created and scope.marks is not None:
                    marks = scope.marks
                    adopted = job
                    job = await scope.retry(lambda: marks.screen(adopted))
        except ApiRejected as exc:
            self._limiter.release(name)
            self.rejected_in_row, self.last_rejection = self.rejected_in_row + 1, exc
            log.warning("%s rejected Job %s: %s", exc.by, name, exc)
            record.deciding = False
            await self._settlement.settle(
                handles=record.handles,
                decision=Decision.dead_letter(
                    "ApiRejected", f"{exc.status} {exc.reason}: {exc.message}", name
                ),
            )
            return None
        return job, created

    async def _created_or_adopted(
        self,
        *,
        name: str,
        job: Mapping[str, Any],
        created: bool,
        finished: JobOutcome | None,
        record: InFlight,
        log: Log,
    ) -> bool:
        """Count a created Job, or adopt an existing one: False once the identity rule
        refused the message (and it was dead-lettered)."""
        delivery = record.handle.delivery
        if created:
            self._metrics.created(delivery)
            log.info("created Job %s", name)
            return True
        refusal = refuse_reuse(job, delivery, finished)
        if refusal is None:
            self._adopted(job, delivery, log)
            return True
        if finished is not None or name not in self._scope.tracker.unfinished():
            self._limiter.release(name)
        record.deciding = False
        log.warning("not run: %s", refusal.detail)
        await self._settlement.settle(handles=record.handles, decision=refusal, final=False)
        return False

    def _adopted(self, job: Mapping[str, Any], delivery: Delivery, log: Log) -> None:
        name = (job.get("metadata") or {}).get("name", "")
        self._metrics.adopted()
        if delivery.redelivered or delivery.positional:
            how = "was delivered again"
        else:
            how = "was published again while its Job runs"
        log.info("message %s: adopted its existing Job %s", how, name)
        self._events.on_job(
            job,
            "Normal",
            "Adopted",
            f"message {delivery.identity} {how}; adopted this Job instead of creating another",
        )

    async def _kept_by_job(
        self, *, name: str, job: Mapping[str, Any], record: InFlight, log: Log
    ) -> bool:
        """True once the message was acked because its outcome is already durable (a
        settlement whose ack was lost) or the Job keeps the message."""
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        if annotations.get(ANNOTATION_SETTLED):
            # Settled before, but the ack was lost: the outcome is already durable.
            await self._settlement.settle(
                handles=record.handles, decision=Decision.ack(name), final=False
            )
            return True
        if (
            annotations.get(ANNOTATION_ACK_POLICY) == AckPolicy.ON_JOB_CREATION.value
            or annotations.get(ANNOTATION_HANDED_OVER) == "true"
        ):
            # The Job keeps the message; failures are dead-lettered from that copy.
            await self._settlement.settle(
                handles=record.handles, decision=Decision.ack(name), final=False
            )
            log.info("acked the message: Job %s keeps it from now on", name)
            return True
        return False

    async def _wait_or_hand_over(self, name: str, record: InFlight, log: Log) -> JobOutcome | None:
        """The Job's outcome, or None once the message was handed over to the Job because
        the broker's consumer timeout was near."""
        limit = self._hold_limit()
        margin = self._scope.settings.handover_margin_seconds
        delivery = record.handle.delivery
        at_risk = delivery.returns_left is not None and delivery.returns_left <= 1
        scope = self._scope
        while True:
            held = time.monotonic() - delivery.received_at
            budget = None if limit is None else limit - margin - held
            if at_risk:
                budget = 0.0  # one more return and the broker drops it: hand it over now
            try:
                return await asyncio.wait_for(
                    asyncio.shield(scope.tracker.wait_for(name)),
                    timeout=None if budget is None else max(budget, 0.0),
                )
            except TimeoutError:
                pass
            job = await scope.retry(
                lambda: scope.jobs.annotate_job(
                    scope.namespace, name, {ANNOTATION_HANDED_OVER: "true"}
                )
            )
            # The patched object tells whether the Job finished first: then settle the
            # live message normally; otherwise the Job now owns it.
            finished = outcome_of(job)
            if finished is not None:
                return finished
            await self._hand_over(name, record, log, at_risk=at_risk)
            return None

    async def _hand_over(self, name: str, record: InFlight, log: Log, *, at_risk: bool) -> None:
        """Ack the message: Job ``name``, annotated as its keeper, settles it from now on."""
        delivery = record.handle.delivery
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
        await self._settlement.settle(
            handles=record.handles, decision=Decision.ack(name), final=False
        )

    def _hold_limit(self) -> float | None:
        """Seconds a message may be held before it is handed over to its Job: the
        ScaledJob's ``consumerTimeoutSeconds`` when set, else the source's own limit when
        it keeps messages alive (None: no limit), else the RabbitMQ-minded default."""
        spec = self._scope.scaledjob.spec
        source = self._scope.source
        if "consumerTimeoutSeconds" not in spec.model_fields_set and isinstance(
            source, KeepsMessagesAlive
        ):
            return source.hold_limit_seconds
        return spec.consumerTimeoutSeconds
