"""A function's outputs, published when its message is settled: the collaborator the
dispatcher calls in its settle step for a ScaledJob with ``spec.function``.

The in-Job invoker (jobrunner.functions.invoker) records the function's result on the
Job, in the annotation ``jobrunner.dev/function-result``: ``{"status": "succeeded",
"outputs": {binding: [base64 message, ...]}}`` or ``{"status": "failed", "error":
"..."}``. The Job is the durable record: it survives the dispatcher, and a restarted
dispatcher adopts it when the message is delivered again.

**Exactly once, tied to the settlement.** Before a successful message is acked,
``before_settle`` publishes each output message in order, and after each one records
how many are out on the Job (``jobrunner.dev/outputs-published``); only then is the
message acked. Where a crash can fall:

* after the Job succeeded, before publishing: the message was not acked, so it comes
  back, adopts the finished Job, and the outputs are published then: once;
* after publishing and recording, before the ack: it comes back, adopts the Job, finds
  every output recorded as published, publishes nothing, acks: once;
* after the ack: settled; nothing left to do;
* a message whose Job keeps it (ack policy ``onJobCreation``, or handed over) is
  settled from the Job by whichever dispatcher sees it finish: the same steps;
* the one window left is between a destination confirming a message and the record
  of it (one API write): a crash exactly there publishes that one message again on
  recovery — except where the source carries them (``CarriesOutputs``: a Kafka
  source and Kafka outputs on the same cluster with the same credentials): then a live
  message's outputs are handed to the source in the decision (``Decision.outputs``) and
  published in the one transaction that commits the record's offset, so a crash
  leaves all of them and the settlement, or none (jobrunner.sources.kafka). Every
  output carries the deterministic id ``<job>/<binding>/<index>`` (AMQP message_id, a
  Kafka header, the embedded queue's message id; a Storage queue message has no
  settable id), so that one copy can be recognised, and the embedded queue drops it
  itself (it publishes only an id it does not hold).

A failed function's ``error`` replaces the Job's own failure text in the dead letter:
reason ``FunctionFailed``, detail the invoker's text (a handler's status and body, an
exception's type and message) and the Job's reason.

**Only authenticated records count** (jobrunner.core.marks): the result and the outputs
count are trusted when their MAC verifies under the Job's own key. A record that does not
(forged, or copied from another Job) is ignored with a Warning Event ``UnverifiedMark``.
A Job that completed without a verified result is dead-lettered
``FunctionResultUnverified``, not acked: the invoker never exits 0 without recording one,
so its outputs are unknown, and acking would drop them silently, while a dead letter can
be replayed to run the function again. A failed Job with no verified result is
dead-lettered with its own reason, as any failed Job. An outputs count that does not
verify counts as none published: outputs carry deterministic ids, so publishing one
twice can be recognised, and leaving one out cannot.

A destination that refuses an output for good (OutputRefused: over a Storage message's
64 KiB, say) dead-letters the message ``OutputBindingFailed``; anything else (the broker
is down) is retried with backoff while the message stays in hand, as a down API server
is.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from jobrunner.core import marks
from jobrunner.core.failpoints import Failpoints
from jobrunner.core.marks import JobMarks
from jobrunner.core.models import Action, Decision, OutputMessage
from jobrunner.core.protocols import (
    ApiRejected,
    CarriesOutputs,
    JobClient,
    MessageSink,
    OutputRefused,
)
from jobrunner.core.retrying import retry_transient

logger = logging.getLogger(__name__)
T = TypeVar("T")

RESULT_ANNOTATION = marks.RESULT_ANNOTATION
PUBLISHED_ANNOTATION = marks.PUBLISHED_ANNOTATION
"""How many of the Job's output messages are published (a count, as text)."""
UNVERIFIED = "FunctionResultUnverified"


def output_id(job_name: str, binding: str, index: int) -> str:
    """The deterministic id of one output message."""
    return f"{job_name}/{binding}/{index}"


def function_result(raw: str | None) -> dict[str, Any] | None:
    """The invoker's result record from its annotation's text, or None (no record, or
    not a JSON object)."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FunctionResults:
    """The settle hook for one ScaledJob's function: publishes outputs before an ack,
    explains failures in dead letters. ``sinks``: output binding name -> where its
    messages go."""

    def __init__(
        self,
        *,
        jobs: JobClient,
        namespace: str,
        function: str,
        sinks: Mapping[str, MessageSink],
        marks: JobMarks | None = None,
        failpoints: Failpoints | None = None,
        retry_ceiling: float = 30.0,
    ) -> None:
        self._jobs = jobs
        self.marks = marks or JobMarks(jobs=jobs, namespace=namespace)
        """Verifies the Jobs' records and signs the outputs count."""
        self._namespace = namespace
        self.function = function
        self.sinks = dict(sinks)
        self._failpoints = failpoints or Failpoints()
        self._retry_ceiling = retry_ceiling
        self.carrier: CarriesOutputs | None = None
        """The source, when it can publish outputs in its settle transaction."""

    async def before_settle(
        self, decision: Decision, *, live: bool = False, message: Mapping[str, Any] | None = None
    ) -> Decision:
        """The decision to carry out: ``decision`` itself once a success's outputs are
        out, or with them in ``outputs`` for the source to publish (``live`` and every
        one carried by the source), a dead letter explained by the function's error, or
        ``OutputBindingFailed``."""
        name = decision.job_name
        if not name or decision.action is Action.REQUEUE:
            return decision
        job = await self._retry(lambda: self._jobs.get_job(self._namespace, name))
        if job is None:
            return decision
        mark = await self._retry(lambda: self.marks.verify(job, RESULT_ANNOTATION))
        result = function_result(mark.trusted)
        if result and result.get("status") == "failed" and result.get("error"):
            job_said = f"{decision.reason} {decision.detail}".strip() or "Complete"
            return Decision.dead_letter(
                "FunctionFailed", f"{result['error']} (Job: {job_said})", name
            )
        if decision.action is Action.DEAD_LETTER:
            return decision
        if result is None or result.get("status") != "succeeded":
            return Decision.dead_letter(UNVERIFIED, self._unverified(name, mark, result), name)
        try:
            carried = await self._publish(job, name, result, live=live)
        except OutputRefused as exc:
            return Decision.dead_letter("OutputBindingFailed", str(exc), name)
        if carried:
            return replace(decision, outputs=carried)
        return decision

    @staticmethod
    def _unverified(name: str, mark: marks.Mark, result: Mapping[str, Any] | None) -> str:
        if mark.value is None:
            why = f"has no {RESULT_ANNOTATION}"
        elif mark.problem is not None:
            why = f"has a {RESULT_ANNOTATION} that is not trusted ({mark.problem})"
        elif result is None:
            why = f"has a {RESULT_ANNOTATION} that is not a JSON object"
        else:
            why = f"has a {RESULT_ANNOTATION} whose status is {result.get('status')!r}"
        return (
            f"Job {name} completed but {why}: the function's outputs are unknown, so the "
            "message is dead-lettered rather than acked without them; replay it to run the "
            "function again"
        )

    async def _publish(
        self, job: Mapping[str, Any], name: str, result: Mapping[str, Any], *, live: bool
    ) -> tuple[OutputMessage, ...]:
        """Publish the outputs not yet recorded as published; or, for a live message
        whose remaining outputs the source all carries, return them for the source to
        publish in its settle transaction (nothing is published here then)."""
        outputs = result.get("outputs") or {}
        messages = [
            (binding, index, base64.b64decode(body))
            for binding, bodies in sorted(outputs.items())
            for index, body in enumerate(bodies)
        ]
        published = await self._retry(lambda: self.marks.verify(job, PUBLISHED_ANNOTATION))
        try:
            done = int(published.trusted or 0)
        except ValueError:
            done = 0
        uid = str((job.get("metadata") or {}).get("uid", ""))
        missing = sorted({b for b, _, _ in messages if b not in self.sinks})
        if missing:
            raise OutputRefused(
                f"function {self.function} produced output for {', '.join(missing)}, which "
                "spec.function.outputs does not name"
            )
        if done >= len(messages):
            if messages:
                logger.info(
                    "Job %s: its %d output message(s) were published before; not again",
                    name,
                    len(messages),
                    extra={"job_name": name},
                )
            return ()
        carrier = self.carrier
        if (
            live
            and carrier is not None
            and all(carrier.carries(self.sinks[b]) for b, _, _ in messages[done:])
        ):
            return tuple(
                OutputMessage(self.sinks[binding], body, output_id(name, binding, index))
                for binding, index, body in messages[done:]
            )
        for position, (binding, index, body) in enumerate(messages):
            if position < done:
                continue
            await self._send(self.sinks[binding], body, output_id(name, binding, index))
            self._failpoints.hit("after-output-sent")
            await self._record(name, uid, position + 1)
        logger.info(
            "Job %s: published %d output message(s) (%s)",
            name,
            len(messages) - done,
            ", ".join(sorted({b for b, _, _ in messages})),
            extra={"job_name": name},
        )
        self._failpoints.hit("after-outputs-published")
        return ()

    async def _record(self, name: str, uid: str, count: int) -> None:
        signed = await self._retry(
            lambda: self.marks.sign(name, uid, {PUBLISHED_ANNOTATION: str(count)})
        )
        await self._retry(lambda: self._jobs.annotate_job(self._namespace, name, signed))

    async def _send(self, sink: MessageSink, body: bytes, message_id: str) -> None:
        delay = 0.2
        while True:
            try:
                await sink.publish(body, message_id=message_id)
                return
            except (OutputRefused, asyncio.CancelledError):
                raise
            except Exception as exc:
                pause = delay * (0.5 + random.random() / 2)
                logger.warning(
                    "output %s could not be published (%s: %s); retrying in %.1fs",
                    message_id,
                    type(exc).__name__,
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)
                delay = min(self._retry_ceiling, delay * 2)

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await retry_transient(call, ceiling=self._retry_ceiling, log=logger)
        except ApiRejected as exc:
            if exc.status == 404:
                raise OutputRefused(f"the Job is gone: {exc}") from None
            raise

    async def close(self) -> None:
        for sink in self.sinks.values():
            try:
                await sink.close()
            except Exception as exc:
                logger.info("closing an output destination failed: %s", exc)
