"""Results back to the producer: the settle hook that publishes a Job's result to the
reply address its message carries (RabbitMQ's RPC pattern: ``reply_to`` +
``correlation_id``; a Kafka reply-topic header), before the message is settled.

**Where in the settlement.** The Job's finished condition, on a Job that jobrunner's
finalizer keeps, is the durable outcome. The reply is published after it (the Job has
finished) and before the trigger message is settled and the finalizer released:

* a crash before the reply: the message comes back (or the Job that keeps it is seen
  finished again), the Job is adopted, the reply is published then;
* a crash after the broker confirmed the reply, before it is recorded on the Job
  (``jobrunner.dev/replied``): published again, with the same id — the one duplicate
  a consumer can drop by ``id`` / ``message_id``;
* after the record: a settlement that runs again finds it and publishes nothing.

Published after the release instead, a crash between the two would leave no Job to
adopt and the reply would never go: republishing with a deterministic id is the price
of never losing it. The id is ``<job name>/reply/<outcome>``; the Job's name is
deterministic from the message, so every dispatcher computes the same one.

**Never blocking the trigger.** A reply the source refuses (ReplyRefused: a deleted
reply queue, an address it does not allow) or cannot publish within
``give_up_seconds`` turns the decision into a dead letter ``ReplyFailed`` whose detail
names the reply address, why, and the Job's outcome: the trigger message is settled at
once, and the result is not lost silently.

**What a reply says** (``reply_body``): JSON with the outcome, reason, exit code,
duration, Job name and the Job's result (its container's termination message, at most
``RESULT_LIMIT`` bytes), and CloudEvents context attributes for the source to put in
its binding's headers. Only reasons (Kubernetes' and jobrunner's CamelCase words) and
what the Job itself wrote go in: never a dead letter's detail, a log line, a server's
text or a credential.

Imports, of the dispatch modules, none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from jobrunner.core.failpoints import Failpoints
from jobrunner.core.models import (
    ANNOTATION_REPLIED,
    TERMINATION_MESSAGE_LIMIT,
    Action,
    Decision,
    JobResult,
    Reply,
    ReplyAddress,
)
from jobrunner.core.naming import message_secret_name
from jobrunner.core.protocols import (
    ApiRejected,
    JobClient,
    ReadsResults,
    ReplyRefused,
    SendsReplies,
)
from jobrunner.core.retrying import retry_transient
from jobrunner.rendering.renderer import ANNOTATION_ORIGINAL_MESSAGE, original_message

logger = logging.getLogger(__name__)
T = TypeVar("T")

REPLY_FAILED = "ReplyFailed"
RESULT_LIMIT = TERMINATION_MESSAGE_LIMIT
"""Bytes of the Job's result a reply carries: the kubelet keeps no more of a termination
message; anything longer (a forged status) is cut and said so (``resultTruncated``)."""
CORRELATION_LIMIT = 256
"""Characters of a correlation id echoed (an AMQP short string holds 255 bytes)."""
REPLY_TYPE = "dev.jobrunner.job.{outcome}"


def reply_id(job_name: str, outcome: str) -> str:
    """The deterministic id of the reply to Job ``job_name``'s ``outcome``."""
    return f"{job_name}/reply/{outcome}"


def reply_body(
    *,
    decision: Decision,
    result: JobResult | None,
    address: ReplyAddress,
    message_id: str,
    scaledjob: str,
    namespace: str,
) -> Reply:
    """The reply for a settled message: the outcome is the decision's (a function's
    failure or a success), the rest the Job's own (``result``; None: the executor could
    not say, only the outcome and reason are sent)."""
    job_name = decision.job_name or ""
    succeeded = decision.action is Action.ACK
    outcome = "succeeded" if succeeded else "failed"
    reason = decision.reason or (result.reason if result is not None else "") or "Complete"
    payload = (result.payload if result is not None else "").encode()
    text = payload[:RESULT_LIMIT].decode("utf-8", errors="ignore")
    correlation = address.correlation_id[:CORRELATION_LIMIT]
    ident = reply_id(job_name, outcome)
    body = {
        "id": ident,
        "correlationId": correlation,
        "messageId": message_id,
        "scaledJob": scaledjob,
        "jobName": job_name,
        "outcome": outcome,
        "reason": reason,
        "exitCode": result.exit_code if result is not None else None,
        "durationSeconds": (
            None
            if result is None or result.duration_seconds is None
            else round(result.duration_seconds, 3)
        ),
        "result": text,
        "resultTruncated": len(payload) > RESULT_LIMIT,
    }
    attributes = {
        "specversion": "1.0",
        "id": ident,
        "source": f"/jobrunner/{namespace}/{scaledjob}",
        "type": REPLY_TYPE.format(outcome=outcome),
        "subject": job_name,
        "datacontenttype": "application/json",
    }
    return Reply(
        body=json.dumps(body, sort_keys=True).encode(),
        reply_id=ident,
        correlation_id=correlation,
        attributes=attributes,
    )


def reply_failed(decision: Decision, address: str, why: str) -> Decision:
    """The trigger message's dead letter when its reply cannot go: ``ReplyFailed``, the
    detail naming the reply address, why, and what the Job came to."""
    came_to = (
        "succeeded"
        if decision.action is Action.ACK
        else f"failed ({decision.reason}{': ' + decision.detail if decision.detail else ''})"
    )
    return replace(
        decision,
        action=Action.DEAD_LETTER,
        reason=REPLY_FAILED,
        detail=f"the reply to {address} could not be delivered: {why}; the Job {came_to}",
    )


class Replies:
    """The settle hook for one ScaledJob whose source answers producers
    (``SendsReplies``). ``jobs``: read for the Job's result (``ReadsResults``; without
    it a reply carries outcome and reason only) and written for the ``replied`` record."""

    def __init__(
        self,
        *,
        jobs: JobClient,
        namespace: str,
        scaledjob: str,
        source: SendsReplies,
        secret_first: bool = False,
        give_up_seconds: float = 30.0,
        retry_ceiling: float = 30.0,
        failpoints: Failpoints | None = None,
    ) -> None:
        self._jobs = jobs
        self._namespace = namespace
        self._scaledjob = scaledjob
        self._source = source
        self._secret_first = secret_first
        """Read the message's copy from its Secret even when an annotation has one (with
        Job marks: a pod may write its Job's annotations, never its Secret)."""
        self.give_up_seconds = give_up_seconds
        """How long a reply is retried (broker unreachable, no confirm) before the
        message is dead-lettered ReplyFailed instead."""
        self._retry_ceiling = retry_ceiling
        self._failpoints = failpoints or Failpoints()

    async def before_settle(
        self, decision: Decision, *, live: bool = False, message: Mapping[str, Any] | None = None
    ) -> Decision:
        name = decision.job_name
        if not name or decision.action is Action.REQUEUE:
            return decision
        job: Mapping[str, Any] | None = None
        if message is None:
            job = await self._retry(lambda: self._jobs.get_job(self._namespace, name))
            if job is None:
                return decision
            message = await self._kept_copy(job)
            if message is None:
                return decision
        try:
            address = self._source.reply_address(message)
        except ReplyRefused as exc:
            return self._failed(decision, "its reply address", str(exc))
        if address is None:
            return decision
        where = f"{address.kind or 'destination'} {address.destination!r}"
        if job is None:
            job = await self._retry(lambda: self._jobs.get_job(self._namespace, name))
        if job is None:
            return decision  # gone (someone deleted it past the finalizer): no result
        result = await self._result(name)
        message_id = str(message.get("message_id") or message.get("identity") or "")
        reply = reply_body(
            decision=decision,
            result=result,
            address=address,
            message_id=message_id,
            scaledjob=self._scaledjob,
            namespace=self._namespace,
        )
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        if annotations.get(ANNOTATION_REPLIED) == reply.reply_id:
            logger.info(
                "Job %s: its reply %s was published before; not again",
                name,
                reply.reply_id,
                extra={"job_name": name},
            )
            return decision
        try:
            await self._send(address, reply)
        except ReplyRefused as exc:
            return self._failed(decision, where, str(exc))
        self._failpoints.hit("after-reply-sent")
        await self._record(name, reply.reply_id)
        logger.info(
            "Job %s: replied %s to %s (correlation id %r)",
            name,
            reply.reply_id,
            where,
            reply.correlation_id,
            extra={"job_name": name},
        )
        return decision

    def _failed(self, decision: Decision, where: str, why: str) -> Decision:
        logger.warning(
            "Job %s: the reply to %s failed (%s); dead-lettering its message %s",
            decision.job_name,
            where,
            why,
            REPLY_FAILED,
            extra={"job_name": decision.job_name},
        )
        return reply_failed(decision, where, why)

    async def _kept_copy(self, job: Mapping[str, Any]) -> dict[str, Any] | None:
        name = str((job.get("metadata") or {}).get("name", ""))
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        secret = None
        if self._secret_first or ANNOTATION_ORIGINAL_MESSAGE not in annotations:
            secret = await self._retry(
                lambda: self._jobs.read_secret(self._namespace, message_secret_name(name))
            )
        return original_message(job, secret)

    async def _result(self, name: str) -> JobResult | None:
        if not isinstance(self._jobs, ReadsResults):
            return None
        jobs = self._jobs
        try:
            return await self._retry(lambda: jobs.job_result(self._namespace, name))
        except ApiRejected as exc:
            logger.info("Job %s: its result could not be read (%s)", name, exc)
            return None

    async def _send(self, address: ReplyAddress, reply: Reply) -> None:
        """Publish, retrying what may pass (a connection lost) for ``give_up_seconds``;
        then ReplyRefused."""
        end = time.monotonic() + self.give_up_seconds
        delay = 0.2
        while True:
            try:
                await asyncio.wait_for(
                    self._source.send_reply(address, reply),
                    timeout=max(0.1, end - time.monotonic()),
                )
                return
            except (ReplyRefused, asyncio.CancelledError):
                raise
            except Exception as exc:
                words = (
                    "no confirm in time" if isinstance(exc, TimeoutError) else type(exc).__name__
                )
                pause = delay * (0.5 + random.random() / 2)
                if time.monotonic() + pause >= end:
                    raise ReplyRefused(
                        f"not published within {self.give_up_seconds:g} s ({words})"
                    ) from None
                logger.warning(
                    "reply %s could not be published (%s); retrying in %.1fs",
                    reply.reply_id,
                    words,
                    pause,
                )
                await asyncio.sleep(pause)
                delay = min(self._retry_ceiling, delay * 2)

    async def _record(self, name: str, ident: str) -> None:
        try:
            await self._retry(
                lambda: self._jobs.annotate_job(self._namespace, name, {ANNOTATION_REPLIED: ident})
            )
        except ApiRejected as exc:
            # The reply is out; without the record a rerun publishes it again, same id.
            logger.warning("Job %s: its reply could not be recorded (%s)", name, exc)

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(call, ceiling=self._retry_ceiling, log=logger)
