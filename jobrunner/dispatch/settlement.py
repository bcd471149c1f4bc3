"""Settlement: the one place a message is settled.

A decision (ack, dead-letter, requeue) goes to the live deliveries through the source's
``settle``, or, for a message its Job keeps, to the source's ``dead_letter_copy``; a
function's outputs are published first (the settle hook). A final settlement is then
recorded on the Job together with the removal of jobrunner's finalizer, once the broker
made it durable. An error nobody foresaw releases the message up to a bound, then
dead-letters it ``InternalError``.

Imports, of the dispatch modules, only ``events``, ``metrics`` and ``scope``; it never
starts a Job nor waits for one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

from jobrunner.core.marks import JobMarks
from jobrunner.core.models import ANNOTATION_SETTLED, Action, Decision, JobOutcome
from jobrunner.core.naming import message_secret_name
from jobrunner.core.protocols import ApiRejected, DescribesFailures, MessageHandle, SettleHook
from jobrunner.core.redaction import describe_error
from jobrunner.dispatch.events import JobEvents
from jobrunner.dispatch.metrics import DispatchMetrics
from jobrunner.dispatch.scope import Scope
from jobrunner.rendering.renderer import (
    ANNOTATION_ORIGINAL_MESSAGE,
    original_fields,
    original_message,
)


def decision_for(outcome: JobOutcome, job_name: str) -> Decision:
    """What a Job's outcome means for its message: ack a success, dead-letter a failure
    with its reason."""
    if outcome.succeeded:
        return Decision.ack(job_name)
    return Decision.dead_letter(outcome.reason, outcome.message, job_name)


class Settlement:
    def __init__(
        self,
        *,
        scope: Scope,
        events: JobEvents,
        metrics: DispatchMetrics,
        settle_hook: SettleHook | None = None,
        on_settled: Callable[[], None] = lambda: None,
    ) -> None:
        self._scope = scope
        self._events = events
        self._metrics = metrics
        self._settle_hook = settle_hook
        """Asked before a final settlement naming a Job (a function's outputs)."""
        self._on_settled = on_settled
        """Called once a Job is released (history cleanup may now remove it)."""
        self.settled_here: set[str] = set()
        """Jobs whose message this process settled for good: free for cleanup."""
        self.awaiting_durable: dict[str, tuple[MessageHandle, str]] = {}
        """Settled, but not yet durably (Kafka: offset not committed yet)."""
        self.unforeseen: dict[str, int] = {}
        """Unforeseen errors so far per message identity (bounded retries)."""
        self._working_on: set[str] = set()
        """Jobs with a settle-from-copy or release task running (one at a time each)."""

    @property
    def has_hook(self) -> bool:
        return self._settle_hook is not None

    # ------------------------------------------------------------------ settle
    async def settle(
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
        then is it recorded: for cleanup, and on the Job for a dead letter. False when
        nothing could be settled (the broker redelivers, or there is no copy)."""
        self._scope.failpoints.hit("before-settle")
        if final and decision.job_name and self._settle_hook is not None:
            message = original_fields(handles[-1].delivery) if handles else original
            decision = await self._settle_hook.before_settle(
                decision, live=bool(handles), message=message
            )
            if decision.action is Action.DEAD_LETTER and not handles and original is None:
                # A Job that keeps its message succeeded, but its outputs cannot go out
                # (or its result is not trusted): dead-letter the copy the Job keeps.
                original = await self._copy_for(decision)
                if original is None:
                    return False
        identity = handles[-1].delivery.identity if handles else ""
        if not identity and original is not None:
            identity = str(original.get("identity") or original.get("message_id") or "")
        decision = replace(decision, message_identity=identity)
        if not await self._send(decision, handles, original):
            return False
        self._report(decision, handles, original)
        if final and decision.job_name:
            await self._record(decision, handles)
        return True

    async def _copy_for(self, decision: Decision) -> dict[str, Any] | None:
        name = decision.job_name or ""
        job = await self._scope.retry(lambda: self._scope.jobs.get_job(self._scope.namespace, name))
        original = await self.kept_copy(job) if job is not None else None
        if original is None:
            self._scope.job_log(name).error(
                "Job %s: %s (%s), and it keeps no copy of its message to dead-letter",
                name,
                decision.reason,
                decision.detail,
            )
        return original

    async def _send(
        self,
        decision: Decision,
        handles: list[MessageHandle] | None,
        original: Mapping[str, Any] | None,
    ) -> bool:
        with self._scope.tracer.start_as_current_span("settle") as span:
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
                    self.unforeseen.pop(decision.message_identity, None)
            elif decision.action is Action.DEAD_LETTER and original is not None:
                await self._scope.source.dead_letter_copy(original, decision)
        return True

    async def _settle_live(self, handles: list[MessageHandle], decision: Decision) -> bool:
        """The decision on the newest live delivery; every other delivery of the same
        message in hand is a duplicate of a settled message, so it is acked. False when
        none could be settled (all their channels are gone: the broker redelivers)."""
        settled = False
        for handle in reversed(handles):
            if not settled:
                settled = await self._scope.source.settle(handle, decision)
            else:
                await self._scope.source.settle(handle, Decision.ack(decision.job_name))
        return settled

    def _report(
        self,
        decision: Decision,
        handles: list[MessageHandle] | None,
        original: Mapping[str, Any] | None,
    ) -> None:
        """The settlement's log line, and for a dead letter its metric and Event."""
        log = self._scope.log
        if handles:
            log = self._scope.message_log(handles[-1].delivery, decision.job_name)
        elif decision.job_name:
            log = self._scope.job_log(
                decision.job_name, str((original or {}).get("identity") or "")
            )
        if decision.action is Action.DEAD_LETTER:
            self._metrics.dead_lettered(decision.reason)
            if decision.job_name:
                self._events.on_name(
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

    async def _record(self, decision: Decision, handles: list[MessageHandle] | None) -> None:
        """The settlement is recorded on the Job together with the finalizer's removal
        (so a redelivery after a lost ack, or another dispatcher, never dead-letters the
        same message twice), and only once it is durable: a Kafka record is settled for
        good when its offset is committed; before that a crash replays it, and the replay
        must still find its Job."""
        name = decision.job_name or ""
        if not handles or self._scope.source.is_durable(handles[-1]):
            self.settled_here.add(name)
            await self.release(name, decision.action.value)
            self._on_settled()
        else:
            self.awaiting_durable[name] = (handles[-1], decision.action.value)

    # ------------------------------------------------------------------ release
    def promote_durable(self) -> None:
        """Release the Jobs whose settlement became durable since (before a cleanup pass)."""
        for name, (handle, settled) in list(self.awaiting_durable.items()):
            if self._scope.source.is_durable(handle):
                del self.awaiting_durable[name]
                self.settled_here.add(name)
                self.release_soon(name, settled)
            elif name not in self._scope.tracker.jobs:
                del self.awaiting_durable[name]  # gone anyway (TTL, someone else)

    async def release(self, name: str, settled: str) -> None:
        """The message of Job ``name`` has a durable fate: remove the finalizer (and
        record the settlement) in one write, so the Job may now be deleted."""
        scope = self._scope
        try:
            mark = {ANNOTATION_SETTLED: settled}
            if scope.marks is not None:
                mark = await self._signed(scope.marks, name, mark)
            await scope.retry(lambda: scope.jobs.release_job(scope.namespace, name, mark))
        except ApiRejected as exc:
            scope.job_log(name).warning("could not release Job %s: %s", name, exc)

    async def _signed(self, marks: JobMarks, name: str, mark: dict[str, str]) -> dict[str, str]:
        """``mark`` with its MAC for Job ``name`` (its uid from the watch, else the API)."""
        scope = self._scope
        state = scope.tracker.jobs.get(name)
        uid = state.uid if state is not None else ""
        if not uid:
            job = await scope.retry(lambda: scope.jobs.get_job(scope.namespace, name))
            uid = str(((job or {}).get("metadata") or {}).get("uid", ""))
        return await scope.retry(lambda: marks.sign(name, uid, mark))

    def release_soon(self, name: str, settled: str) -> None:
        self.once(name, self.release(name, settled), f"release-{name}")

    def once(self, name: str, work: Coroutine[Any, Any, None], task_name: str) -> None:
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

        self._scope.spawn(guarded(), name=task_name)

    # ------------------------------------------------------------------ decide
    async def decide(self, outcome: JobOutcome, name: str) -> Decision:
        """``decision_for``, a failure's detail completed with what the executor can still
        tell (exit codes, the last lines of a log): best effort, at most a few seconds."""
        decision = decision_for(outcome, name)
        jobs = self._scope.jobs
        if decision.action is not Action.DEAD_LETTER or not isinstance(jobs, DescribesFailures):
            return decision
        try:
            extra = await asyncio.wait_for(
                jobs.failure_detail(self._scope.namespace, name), timeout=5.0
            )
        except Exception as exc:  # the detail is a courtesy; the dead letter is not
            self._scope.log.debug("no failure detail for Job %s: %s", name, exc)
            return decision
        if not extra:
            return decision
        return replace(decision, detail=f"{decision.detail}; {extra}" if decision.detail else extra)

    async def kept_copy(self, job: Mapping[str, Any]) -> dict[str, Any] | None:
        """The copy of its message a Job keeps (annotation or Secret), None without one."""
        scope = self._scope
        name = str((job.get("metadata") or {}).get("name", ""))
        secret = None
        # With marks, the copy in the Secret (which pods cannot write) is always read: it
        # wins over an annotation (see rendering.original_message).
        always = scope.marks is not None and scope.marks.reads_secrets
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        if always or ANNOTATION_ORIGINAL_MESSAGE not in annotations:
            secret = await scope.retry(
                lambda: scope.jobs.read_secret(scope.namespace, message_secret_name(name))
            )
        return original_message(job, secret)

    # ------------------------------------------------------------------ unforeseen
    async def release_unforeseen(
        self, handles: list[MessageHandle], name: str | None, exc: Exception
    ) -> None:
        """An error nobody foresaw (a bug, a library that changed): the message goes back
        to the source to be tried again, and after ``max_unforeseen_errors`` tries it is
        dead-lettered ``InternalError`` with the exception, so no message ever stays in
        hand and none loops forever. The dispatcher goes on."""
        delivery = handles[-1].delivery
        log = self._scope.message_log(delivery, name)
        self._metrics.unforeseen(type(exc).__name__)
        count = self.unforeseen.get(delivery.identity, 0) + 1
        self.unforeseen[delivery.identity] = count
        limit = self._scope.settings.max_unforeseen_errors
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
                if await self.settle(handles=handles, decision=requeue, final=False):
                    return
                # The source cannot hand it out again now (a Kafka record is read again
                # only after a restart): dead-letter it rather than hold it.
            self.unforeseen.pop(delivery.identity, None)
            await self.settle(handles=handles, decision=dead, final=False)
        except Exception as again:
            log.error(
                "could not release the message either (%s); it returns to the source when "
                "its connection closes",
                again,
            )
