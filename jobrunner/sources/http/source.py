"""The MessageSource of one HTTP trigger: a POST becomes a message in hand whose request
waits for its settlement, which decides the answer (see jobrunner.sources.http)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from jobrunner.core.models import Action, Decision, Delivery, JobStatus
from jobrunner.core.naming import job_name
from jobrunner.core.protocols import TokenReviewer, TransientError
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.http import HttpTrigger
from jobrunner.sources.http.auth import Authenticator
from jobrunner.sources.http.binding import EventRejected, dead_letter_event, location, parse_event
from jobrunner.sources.http.deadletters import DeadLetterSink
from jobrunner.sources.http.listener import LISTENERS, Listener, Listeners, answer

logger = logging.getLogger(__name__)

DEAD_LETTER_REASONS = {
    "MessageTooLarge": 413,
    "MessageIdReused": 409,
    "DuplicateMessage": 409,
    "InvalidMessage": 400,
    "TemplateError": 422,
    "ApiRejected": 422,
    "MessageSecretConflict": 409,
}
"""How an event that can never become a Job is answered, by its dead letter's reason;
any other reason is a 500 (an internal error the caller may retry)."""


@dataclass(eq=False)
class HttpHandle:
    """An event in hand: its request waits on ``answer`` for the settlement."""

    delivery: Delivery
    answer: asyncio.Future[Decision] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


JobStatusReader = Callable[[str], Awaitable[JobStatus | None]]
"""Reads the status of the Job named (see HttpSource.bind_job_status)."""


class HttpSource:
    """The MessageSource of one HTTP trigger (one ScaledJob's path)."""

    name = "http"

    def __init__(
        self,
        trigger: HttpTrigger,
        *,
        scaledjob: ScaledJob,
        address: str,
        max_body: int,
        listeners: Listeners = LISTENERS,
    ) -> None:
        self.trigger = trigger
        self.scaledjob = scaledjob.name
        self.namespace = scaledjob.namespace
        self.address = address
        self.max_body = max_body
        self._listeners = listeners
        self._listener: Listener | None = None
        self._queue: asyncio.Queue[HttpHandle] = asyncio.Queue()
        self._pending: set[HttpHandle] = set()
        self._reading = 0
        """Requests whose body is being read (they count against maxPendingRequests)."""
        self._consuming = True
        self._reader: JobStatusReader | None = None
        self._auth = Authenticator(
            mode=trigger.auth,
            token=trigger.token,
            service_accounts=trigger.service_accounts,
            audience=trigger.audience,
        )
        self._sink = (
            DeadLetterSink(trigger.dead_letter_url, tenant=trigger.tenant, scaledjob=self.scaledjob)
            if trigger.dead_letter_url
            else None
        )

    # -- wiring by the runner
    def bind_job_status(self, reader: JobStatusReader) -> None:
        """How GET learns an event's Job status (the dispatcher's tracker, then the API)."""
        self._reader = reader

    def bind_token_reviewer(self, reviewer: TokenReviewer) -> None:
        """Who checks ServiceAccount tokens (``auth: tokenReview``)."""
        self._auth = Authenticator(
            mode=self._auth.mode,
            token=self._auth.token,
            service_accounts=self._auth.service_accounts,
            audience=self._auth.audience,
            reviewer=reviewer,
        )

    @property
    def port(self) -> int | None:
        """The port served on (for ``listenAddress`` port 0), once started."""
        return self._listener.port if self._listener is not None else None

    # -- MessageSource
    async def start(self) -> None:
        self._consuming = True
        self._listener = await self._listeners.add(self.address, self.trigger.path, self)
        logger.info(
            "serving HTTP events on %s:%s%s (auth %s)",
            self.address.rpartition(":")[0],
            self._listener.port,
            self.trigger.path,
            self.trigger.auth,
            extra={"scaledjob": self.scaledjob, "source": self.name},
        )

    async def deliveries(self) -> AsyncIterator[HttpHandle]:
        while True:
            yield await self._queue.get()

    @property
    def connected(self) -> bool:
        return self._listener is not None

    async def depth(self) -> int | None:
        # Received but not yet taken by the dispatcher (those it took are in hand).
        return self._queue.qsize()

    async def stop_consuming(self) -> None:
        self._consuming = False

    async def settle(self, handle: HttpHandle, decision: Decision) -> bool:
        if not handle.answer.done():
            handle.answer.set_result(decision)
        return True

    def is_durable(self, handle: HttpHandle) -> bool:
        return True

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        if self._sink is None:
            logger.warning(
                "Job %s failed (%s); no spec.deadLetter.url is set, so its event is answered "
                "on its Location only",
                decision.job_name,
                decision.reason,
                extra={"scaledjob": self.scaledjob, "source": self.name},
            )
            return
        await self._sink.post(
            dead_letter_event(
                original, decision, namespace=self.namespace, scaledjob=self.scaledjob
            )
        )

    async def close(self) -> None:
        self._consuming = False
        # Answer the requests still waiting first (503: nothing durable was made for
        # them here; a retry finds the Job if one was made after all), so the server's
        # shutdown does not wait on them.
        for handle in list(self._pending):
            if not handle.answer.done():
                handle.answer.set_result(Decision(Action.REQUEUE, reason="Stopping"))
        if self._listener is not None:
            await self._listeners.remove(self.address, self.trigger.path, self)
            self._listener = None
        if self._sink is not None:
            await self._sink.close()

    # -- requests
    async def post(self, request: web.BaseRequest) -> web.StreamResponse:
        retry = str(self.trigger.retry_after_seconds)
        try:
            await self._auth.check(request.headers.get("Authorization"))
            if not self._consuming:
                raise EventRejected(503, "Stopping", "the dispatcher is stopping; retry")
            if self._reading + len(self._pending) >= self.trigger.max_pending:
                # Bodies still arriving count too: at most maxPendingRequests bodies of
                # maxMessageBytes are ever held, however many connections are open.
                return answer(
                    429,
                    "TooManyRequests",
                    f"{self._reading + len(self._pending)} events are already being "
                    "received or wait for a free Job slot; retry",
                    retry_after=retry,
                )
            self._reading += 1
            try:
                body = await self._read_body(request)
            finally:
                self._reading -= 1
            delivery = parse_event(
                path=self.trigger.path,
                headers=request.headers,
                body=body,
                forward=self.trigger.forward_headers,
            )
        except EventRejected as exc:
            extra = {"retry_after": retry} if exc.status == 503 else {}
            return answer(exc.status, exc.reason, exc.text, **extra)
        handle = HttpHandle(delivery)
        self._pending.add(handle)
        try:
            self._queue.put_nowait(handle)
            decision = await handle.answer
        finally:
            self._pending.discard(handle)
        return self._answer_decision(delivery, decision)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        declared = request.content_length
        if declared is not None and declared > self.max_body:
            raise EventRejected(
                413, "MessageTooLarge", f"the body is larger than {self.max_body} bytes"
            )
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.trigger.body_timeout_seconds):
                while chunk := await request.content.read(64 * 1024):
                    size += len(chunk)
                    if size > self.max_body:
                        raise EventRejected(
                            413, "MessageTooLarge", f"the body is larger than {self.max_body} bytes"
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise EventRejected(408, "RequestTimeout", "the body took too long to arrive") from None
        return b"".join(chunks)

    def _answer_decision(self, delivery: Delivery, decision: Decision) -> web.Response:
        where = location(self.trigger.path, delivery.identity)
        if decision.action is Action.ACK:
            return web.json_response(
                {"status": "accepted", "job": decision.job_name, "location": where},
                status=202,
                headers={"Location": where},
            )
        retry = str(self.trigger.retry_after_seconds)
        if decision.action is Action.REQUEUE:
            return answer(
                503, decision.reason or "Unavailable", "not accepted; retry", retry_after=retry
            )
        status = DEAD_LETTER_REASONS.get(decision.reason, 500)
        return answer(status, decision.reason, decision.detail[:1000])

    async def get(self, request: web.BaseRequest, identity: str) -> web.StreamResponse:
        try:
            await self._auth.check(request.headers.get("Authorization"))
        except EventRejected as exc:
            return answer(exc.status, exc.reason, exc.text)
        name = job_name(self.scaledjob, identity)
        if any(h.delivery.identity == identity for h in self._pending):
            return web.json_response({"status": "pending", "job": name}, status=202)
        try:
            status = await self._reader(name) if self._reader is not None else None
        except TransientError:
            return answer(
                503,
                "Unavailable",
                "the Job cannot be read now; retry",
                retry_after=str(self.trigger.retry_after_seconds),
            )
        if status is None:
            return answer(404, "NotFound", "no Job is known for this event")
        body: dict[str, Any] = {"status": status.phase, "job": name}
        if status.reason:
            body["reason"] = status.reason
        # Not the condition's message: the local executor's holds the last log lines,
        # which may hold what the Job printed of its Secrets. The reason, the exit code
        # and what the Job chose to report (its termination message) are the sender's.
        if status.result is not None:
            body["result"] = status.result
        code = {"succeeded": 200, "failed": 400}.get(status.phase, 202)
        return web.json_response(body, status=code)

    # -- dead letters
