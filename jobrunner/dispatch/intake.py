"""Intake: a delivery becomes a message in hand, or joins the one already in hand.

A delivery is rendered (its identity decides its Job's name); another delivery of the
same identity while one is in hand (a redelivery after a channel loss, a duplicate
publish) joins it in the in-flight map and is settled with it. The identity rule for a
Job that already exists: a different body under the same message id is refused
(``MessageIdReused``, by the body digest the Job records), and so is a fresh publish of a
message whose Job already finished (``DuplicateMessage``).

Imports, of the dispatch modules, only ``settlement`` and below; it never creates a Job.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from jobrunner.core.models import ANNOTATION_BODY_DIGEST, Decision, Delivery, JobOutcome
from jobrunner.core.protocols import MessageHandle
from jobrunner.core.provenance import destination
from jobrunner.dispatch.events import JobEvents
from jobrunner.dispatch.metrics import DispatchMetrics
from jobrunner.dispatch.scope import Scope
from jobrunner.dispatch.settlement import Settlement
from jobrunner.observability.telemetry import extract_context, traceparent_of
from jobrunner.rendering.renderer import RenderedJob, Renderer, RenderError


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


def reused_id(delivery: Delivery, name: str, holder: str) -> Decision:
    """The dead letter of a message whose id already belongs to another body."""
    return Decision.dead_letter(
        "MessageIdReused",
        f"message id {delivery.message_id or delivery.identity!r} already belongs to "
        f"{holder} (Job {name}) with a different body; it was not run. Give every "
        "message its own message_id",
        name,
    )


def refuse_reuse(
    job: Mapping[str, Any], delivery: Delivery, finished: JobOutcome | None
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
        return reused_id(delivery, name, "an earlier message")
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


async def _end_after(span: trace.Span, work: Awaitable[Any]) -> None:
    with trace.use_span(span, end_on_exit=True):
        await work


class Intake:
    def __init__(
        self,
        *,
        scope: Scope,
        renderer: Renderer,
        settlement: Settlement,
        events: JobEvents,
        metrics: DispatchMetrics,
    ) -> None:
        self._scope = scope
        self._renderer = renderer
        self._settlement = settlement
        self._events = events
        self._metrics = metrics
        self.inflight: dict[str, InFlight] = {}
        """Messages in hand by their Job's name."""

    def in_hand(self, name: str) -> bool:
        return name in self.inflight

    def done(self, name: str, record: InFlight) -> None:
        """``record`` is no longer in hand (a newer record of the same name stays)."""
        if self.inflight.get(name) is record:
            del self.inflight[name]

    async def receive(self, handle: MessageHandle) -> tuple[RenderedJob, InFlight] | None:
        """The rendered Job and the new record of a message now in hand, or None when
        the delivery joined the message in hand or was settled (or released) already."""
        delivery = handle.delivery
        self._scope.log.debug(
            "received message %s", delivery.identity, extra={"message_id": delivery.identity}
        )
        span = self._start_span(delivery)
        rendered = await self._render(handle, span)
        if rendered is None:
            return None
        span.set_attribute("jobrunner.job_name", rendered.name)
        current = self.inflight.get(rendered.name)
        if current is not None:
            self._join(current, handle, rendered.name, span)
            return None
        record = InFlight(handles=[handle], span=span)
        self.inflight[rendered.name] = record
        return rendered, record

    def _start_span(self, delivery: Delivery) -> trace.Span:
        where = destination(delivery)
        return self._scope.tracer.start_span(
            "jobrunner.message",
            context=extract_context(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": delivery.source,
                # The queue, topic, stream, subject or path, whatever the source.
                "messaging.destination.name": where.name if where is not None else "",
                "messaging.message.id": delivery.message_id or "",
                "jobrunner.scaledjob": self._scope.scaledjob.name,
                "jobrunner.message_identity": delivery.identity,
            },
        )

    async def _render(self, handle: MessageHandle, span: trace.Span) -> RenderedJob | None:
        """The Job of the message, or None once a message that cannot become one was
        dead-lettered (or, on an error nobody foresaw, released) in a task of its own."""
        delivery = handle.delivery
        try:
            with trace.use_span(span), self._scope.tracer.start_as_current_span("render"):
                # The Job joins the message's trace through TRACEPARENT. Rendered off
                # the event loop, under the render limits (see jobrunner.rendering.sandbox);
                # one message at a time per ScaledJob, as it always was.
                extra = {"TRACEPARENT": traceparent_of(span) or ""}
                return await self._renderer.render_bounded(delivery, extra_env=extra)
        except RenderError as exc:
            self._scope.message_log(delivery).warning("message cannot become a Job: %s", exc)
            span.set_status(Status(StatusCode.ERROR, exc.reason))
            decision = Decision.dead_letter(exc.reason, exc.detail)
            self._scope.spawn(
                _end_after(span, self._settlement.settle(handles=[handle], decision=decision)),
                name=f"settle-unrenderable-{delivery.identity[:40]}",
            )
        except Exception as exc:  # a bug or a library change: never leave it in hand
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            self._scope.spawn(
                _end_after(span, self._settlement.release_unforeseen([handle], None, exc)),
                name=f"unforeseen-{delivery.identity[:40]}",
            )
        return None

    def _join(self, current: InFlight, handle: MessageHandle, name: str, span: trace.Span) -> None:
        """The same identity again while a delivery of it is in hand: a redelivery or a
        duplicate publish joins it and is settled with it; another body under the same
        message id is a different message and is dead-lettered at once."""
        delivery = handle.delivery
        log = self._scope.message_log(delivery, name)
        if delivery.body != current.handle.delivery.body:
            decision = reused_id(delivery, name, "a message in hand")
            log.warning("message id reused for another body: %s", decision.detail)
            self._scope.spawn(
                _end_after(span, self._settlement.settle(handles=[handle], decision=decision)),
                name=f"settle-reused-{name}",
            )
            return
        current.handles.append(handle)
        self._metrics.adopted()
        how = "was redelivered" if delivery.redelivered else "was published again"
        log.info("message %s while in hand; it joins Job %s", how, name)
        self._events.on_name(
            name, "Normal", "Adopted", f"message {delivery.identity} {how}; it joins this Job"
        )
        span.set_attribute("jobrunner.merged_into_inflight", True)
        span.end()
