"""The HTTP trigger: events POSTed to the dispatcher (the CloudEvents HTTP protocol
binding, binary or structured mode, or a plain body), each one Job.

There is no broker, so the Job is the event's durable copy (as Knative's JobSink keeps
it): a POST is answered only once its Job (and its message Secret) exists, or once it is
clear that it never will:

* ``202 Accepted`` with ``Location: <path>/<event id>``: the Job exists. The same event
  again (the CloudEvents identity, ``source`` + ``id``; or an ``Idempotency-Key``; or the
  body's digest) is the same Job, however often and however concurrently it comes (its
  name is derived from the identity, and a second delivery in hand joins the first);
* ``GET <path>/<event id>``: ``202`` while its Job waits or runs, ``200`` with the
  outcome once it succeeded, ``400`` with the reason once it failed (JobSink's codes),
  ``404`` when no Job of that event is known (never made, or cleaned up);
* ``413`` past ``spec.messageDelivery.maxMessageBytes``; ``429`` with ``Retry-After``
  when ``maxPendingRequests`` events already wait for their Job (every slot under
  ``maxReplicaCount`` is taken); ``408`` for a body slower than ``bodyTimeoutSeconds``;
  ``503`` with ``Retry-After`` while the dispatcher stops or an error nobody foresaw
  released the event (a retry is safe: it finds the same Job); ``400``/``409``/``422``
  for an event that can never become a Job (malformed, its id reused for another body,
  refused by the template or the API server), with the reason;
* ``401``/``403`` before anything else is read: a bearer token compared in constant
  time, or a ServiceAccount token checked by a Kubernetes TokenReview and matched
  against the allowed ServiceAccounts.

A Job that fails after its ``202`` is dead-lettered from the copy it keeps (ack policy
``onJobCreation``): POSTed to ``spec.deadLetter.url`` as a structured CloudEvent with
the reason, retried until the sink answers 2xx (the Job's finalizer holds it meanwhile).

One aiohttp server per listen address is shared by every HTTP trigger of the process
(the operator serves all its ScaledJobs on one Service); each trigger owns its path.
Why aiohttp: asyncio-native (the dispatcher's loop serves it), already in the dependency
tree through aiobotocore, with bounded request lines and headers; its keep-alive timeout
also closes a connection that never completes a request (a slow client).

Why not the ``cloudevents`` SDK for parsing: the binding is a few header and JSON rules
that jobrunner must bound itself (sizes, which headers reach the Job); the tests check
this parser against the SDK's own ``to_binary``/``to_structured``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from jobrunner.core.models import Action, Decision, Delivery, JobStatus
from jobrunner.core.naming import job_name, message_identity
from jobrunner.core.protocols import SourceError, TokenReviewer, TransientError
from jobrunner.core.settings import Executor, Settings
from jobrunner.manifest.scaledjob import ManifestError, ScaledJob
from jobrunner.manifest.triggers.http import HttpTrigger

logger = logging.getLogger(__name__)

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
ID_MAX = 1024
"""The longest CloudEvents ``id``, ``source`` or ``Idempotency-Key`` taken (the spec sets
none; each goes into the Job's annotations and the Location)."""
CE_HEADERS_MAX = 64
"""The most ``ce-*`` attributes (headers) of one event passed to its Job."""
KEEPALIVE_SECONDS = 15.0
"""An idle (or never completed) connection is closed after this long."""
DEAD_LETTER_TIMEOUT_SECONDS = 10.0
DEAD_LETTER_TRIES = 8
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
_REQUIRED = ("id", "source", "specversion", "type")


class EventRejected(Exception):
    """An HTTP request that cannot become an event: answered ``status`` with ``text``."""

    def __init__(self, status: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.text = text


@dataclass(eq=False)
class HttpHandle:
    """An event in hand: its request waits on ``answer`` for the settlement."""

    delivery: Delivery
    answer: asyncio.Future[Decision] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


# ---------------------------------------------------------------------- the binding
def parse_event(
    *,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
) -> Delivery:
    """The Delivery of one POST: a CloudEvent in binary mode (``ce-*`` headers), in
    structured mode (``application/cloudevents+json``), or a plain body (its id from
    ``Idempotency-Key``, else the body's digest). EventRejected (400/415) for a request
    that breaks the binding. Only ``ce-*`` attributes, the content type and the trace
    context (``traceparent``, ``tracestate``) reach the Job, never ``Authorization``."""
    content_type = headers.get("Content-Type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == BATCH:
        raise EventRejected(
            415, "BatchNotSupported", "batched CloudEvents are not taken: send each event alone"
        )
    trace = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    if media == STRUCTURED:
        return _structured(path, body, trace)
    attributes = {k.lower()[3:]: v for k, v in headers.items() if k.lower().startswith("ce-")}
    if attributes:
        return _binary(path, attributes, body, content_type or None, trace)
    key = headers.get("Idempotency-Key") or None
    if key is not None and len(key) > ID_MAX:
        raise EventRejected(400, "InvalidMessage", f"Idempotency-Key longer than {ID_MAX}")
    identity = message_identity(key, body, {})
    return Delivery(
        source="http",
        identity=identity,
        body=body,
        message_id=key,
        headers=trace,
        content_type=content_type or None,
        metadata={"path": path},
        received_at=time.monotonic(),
        positional=True,
    )


def _binary(
    path: str,
    attributes: dict[str, str],
    body: bytes,
    content_type: str | None,
    trace: dict[str, str],
) -> Delivery:
    if len(attributes) > CE_HEADERS_MAX:
        raise EventRejected(400, "InvalidMessage", f"more than {CE_HEADERS_MAX} ce- headers")
    return _event(path, attributes, body, content_type, trace)


def _structured(path: str, body: bytes, trace: dict[str, str]) -> Delivery:
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EventRejected(400, "InvalidMessage", "a structured CloudEvent must be JSON") from None
    if not isinstance(event, dict):
        raise EventRejected(400, "InvalidMessage", "a structured CloudEvent is a JSON object")
    if "data" in event and "data_base64" in event:
        raise EventRejected(400, "InvalidMessage", "an event has data or data_base64, not both")
    content_type = event.get("datacontenttype")
    if "data_base64" in event:
        try:
            data = base64.b64decode(str(event["data_base64"]), validate=True)
        except ValueError:
            raise EventRejected(400, "InvalidMessage", "data_base64 is not base64") from None
    elif "data" not in event or event["data"] is None:
        data = b""
    elif isinstance(event["data"], str) and not _is_json(content_type):
        data = event["data"].encode()
    else:
        data = json.dumps(event["data"], separators=(",", ":")).encode()
        content_type = content_type or "application/json"
    attributes = {}
    for key, value in event.items():
        if key in ("data", "data_base64"):
            continue
        if not isinstance(value, str | int | bool):
            raise EventRejected(400, "InvalidMessage", f"attribute {key[:40]!r} is not a scalar")
        attributes[str(key).lower()] = value if isinstance(value, str) else json.dumps(value)
    if len(attributes) > CE_HEADERS_MAX:
        raise EventRejected(400, "InvalidMessage", f"more than {CE_HEADERS_MAX} attributes")
    return _event(path, attributes, data, content_type, trace)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _event(
    path: str,
    attributes: Mapping[str, str],
    body: bytes,
    content_type: str | None,
    trace: dict[str, str],
) -> Delivery:
    missing = [a for a in _REQUIRED if not attributes.get(a)]
    if missing:
        raise EventRejected(
            400, "InvalidMessage", f"a CloudEvent needs {', '.join(missing)}; add the ce- header(s)"
        )
    if attributes["specversion"] not in ("1.0", "0.3"):
        raise EventRejected(400, "InvalidMessage", "specversion 1.0 (or 0.3) is supported")
    event_id, source = attributes["id"], attributes["source"]
    if len(event_id) > ID_MAX or len(source) > ID_MAX:
        raise EventRejected(400, "InvalidMessage", f"id and source are at most {ID_MAX} each")
    headers = {f"ce-{k}": v for k, v in attributes.items() if k != "datacontenttype"}
    headers.update(trace)
    return Delivery(
        source="http",
        # The CloudEvents identity: source + id is unique per distinct event (spec, "id").
        identity=f"{source}#{event_id}",
        body=body,
        message_id=event_id,
        headers=headers,
        content_type=attributes.get("datacontenttype") or content_type,
        metadata={"path": path, "ce-source": source, "ce-type": attributes["type"]},
        received_at=time.monotonic(),
        published_at=_epoch(attributes.get("time")),
        positional=True,
    )


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def location(path: str, identity: str) -> str:
    """Where the status of the event ``identity`` is read."""
    return f"{path.rstrip('/')}/{urllib.parse.quote(identity, safe='')}"


# ---------------------------------------------------------------------- authentication
@dataclass(frozen=True)
class Authenticator:
    """Who may POST and GET on one path: a bearer token, or ServiceAccounts checked by
    TokenReview, or (``--local`` only) anyone."""

    mode: str
    token: str = ""
    service_accounts: tuple[str, ...] = ()
    audience: str = ""
    reviewer: TokenReviewer | None = None

    async def check(self, authorization: str | None) -> None:
        """Return when the caller may; EventRejected 401/403 otherwise."""
        if self.mode == "none":
            return
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise EventRejected(401, "Unauthorized", "a bearer token is required")
        credential = credential.strip()
        if self.mode == "bearer":
            if not hmac.compare_digest(credential.encode(), self.token.encode()):
                raise EventRejected(401, "Unauthorized", "the token is not valid here")
            return
        if self.reviewer is None:
            raise EventRejected(503, "Unavailable", "tokens cannot be reviewed now")
        try:
            review = await self.reviewer.review_token(
                credential, audiences=(self.audience,) if self.audience else ()
            )
        except TransientError:
            raise EventRejected(503, "Unavailable", "tokens cannot be reviewed now") from None
        if not review.authenticated:
            raise EventRejected(401, "Unauthorized", "the token is not valid here")
        if not self._allowed(review.username):
            raise EventRejected(403, "Forbidden", "this ServiceAccount may not post here")

    def _allowed(self, username: str) -> bool:
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            return False
        namespace, name = parts[2], parts[3]
        return any(
            allowed in (f"{namespace}:{name}", f"{namespace}:*")
            for allowed in self.service_accounts
        )


# ---------------------------------------------------------------------- the listener
class Listener:
    """One HTTP server on one address, serving the paths of every HTTP source of the
    process that listens there."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.routes: dict[str, HttpSource] = {}
        self._runner: web.ServerRunner | None = None
        self.port: int | None = None
        """The port bound (the given one, or the one the system picked for port 0)."""

    async def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        server = web.Server(
            self._handle,
            handler_cancellation=False,
            access_log=None,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        runner = web.ServerRunner(server)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SourceError(
                f"cannot listen on {self.address} for the HTTP trigger ({exc.strerror}): "
                "free the port or set metadata.listenAddress"
            ) from None
        self._runner = runner
        bound = runner.addresses
        self.port = int(bound[0][1]) if bound else int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = urllib.parse.unquote(request.raw_path.split("?", 1)[0])
        raw = request.raw_path.split("?", 1)[0]
        source = self.routes.get(path.rstrip("/") or "/")
        if source is not None:
            if request.method != "POST":
                return _answer(405, "MethodNotAllowed", "POST events here", allow="POST")
            return await source.post(request)
        prefix, _, quoted = raw.rstrip("/").rpartition("/")
        source = self.routes.get(urllib.parse.unquote(prefix) or "/")
        if source is not None and quoted:
            if request.method not in ("GET", "HEAD"):
                return _answer(405, "MethodNotAllowed", "GET an event's status", allow="GET")
            return await source.get(request, urllib.parse.unquote(quoted))
        return _answer(404, "NotFound", "no HTTP trigger serves this path")


class Listeners:
    """The process's listeners, by address; each stops when its last path goes."""

    def __init__(self) -> None:
        self._by_address: dict[str, Listener] = {}
        self._lock = asyncio.Lock()

    async def add(self, address: str, path: str, source: HttpSource) -> Listener:
        async with self._lock:
            listener = self._by_address.get(address)
            if listener is None:
                listener = Listener(address)
                await listener.start()
                self._by_address[address] = listener
            holder = listener.routes.get(path)
            if holder is not None and holder is not source:
                raise SourceError(
                    f"path {path} on {address} is already served by ScaledJob "
                    f"{holder.scaledjob}: give this ScaledJob another metadata.path"
                )
            listener.routes[path] = source
            return listener

    async def remove(self, address: str, path: str, source: HttpSource) -> None:
        async with self._lock:
            listener = self._by_address.get(address)
            if listener is None or listener.routes.get(path) is not source:
                return
            del listener.routes[path]
            if not listener.routes:
                del self._by_address[address]
                await listener.stop()


LISTENERS = Listeners()
"""This process's listeners (one per address, shared by its HTTP triggers)."""


def _answer(status: int, reason: str, text: str, **headers: str) -> web.Response:
    names = {"retry_after": "Retry-After", "allow": "Allow", "location": "Location"}
    extra = {names.get(k, k): v for k, v in headers.items()}
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return web.json_response(
        {"status": status, "reason": reason, "message": text}, status=status, headers=extra
    )


# ---------------------------------------------------------------------- the source
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
        self._consuming = True
        self._reader: JobStatusReader | None = None
        self._auth = Authenticator(
            mode=trigger.auth,
            token=trigger.token,
            service_accounts=trigger.service_accounts,
            audience=trigger.audience,
        )
        self._http: aiohttp.ClientSession | None = None

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
            "serving HTTP events on %s%s (auth %s)",
            self.address,
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
        return len(self._pending)

    async def stop_consuming(self) -> None:
        self._consuming = False

    async def settle(self, handle: HttpHandle, decision: Decision) -> bool:
        if not handle.answer.done():
            handle.answer.set_result(decision)
        return True

    def is_durable(self, handle: HttpHandle) -> bool:
        return True

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        url = self.trigger.dead_letter_url
        if not url:
            logger.warning(
                "Job %s failed (%s); no spec.deadLetter.url is set, so its event is answered "
                "on its Location only",
                decision.job_name,
                decision.reason,
                extra={"scaledjob": self.scaledjob, "source": self.name},
            )
            return
        await self._post_dead_letter(url, _dead_letter_event(original, decision, self))

    async def close(self) -> None:
        self._consuming = False
        if self._listener is not None:
            await self._listeners.remove(self.address, self.trigger.path, self)
            self._listener = None
        for handle in list(self._pending):
            if not handle.answer.done():
                handle.answer.set_result(Decision(Action.REQUEUE, reason="Stopping"))
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- requests
    async def post(self, request: web.BaseRequest) -> web.StreamResponse:
        retry = str(self.trigger.retry_after_seconds)
        try:
            await self._auth.check(request.headers.get("Authorization"))
            if not self._consuming:
                raise EventRejected(503, "Stopping", "the dispatcher is stopping; retry")
            body = await self._read_body(request)
            if len(self._pending) >= self.trigger.max_pending:
                return _answer(
                    429,
                    "TooManyRequests",
                    f"{len(self._pending)} events already wait for a free Job slot; retry",
                    retry_after=retry,
                )
            delivery = parse_event(path=self.trigger.path, headers=request.headers, body=body)
        except EventRejected as exc:
            extra = {"retry_after": retry} if exc.status == 503 else {}
            return _answer(exc.status, exc.reason, exc.text, **extra)
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
            return _answer(
                503, decision.reason or "Unavailable", "not accepted; retry", retry_after=retry
            )
        status = DEAD_LETTER_REASONS.get(decision.reason, 500)
        return _answer(status, decision.reason, decision.detail[:1000])

    async def get(self, request: web.BaseRequest, identity: str) -> web.StreamResponse:
        try:
            await self._auth.check(request.headers.get("Authorization"))
        except EventRejected as exc:
            return _answer(exc.status, exc.reason, exc.text)
        name = job_name(self.scaledjob, identity)
        if any(h.delivery.identity == identity for h in self._pending):
            return web.json_response({"status": "pending", "job": name}, status=202)
        try:
            status = await self._reader(name) if self._reader is not None else None
        except TransientError:
            return _answer(
                503,
                "Unavailable",
                "the Job cannot be read now; retry",
                retry_after=str(self.trigger.retry_after_seconds),
            )
        if status is None:
            return _answer(404, "NotFound", "no Job is known for this event")
        body: dict[str, Any] = {"status": status.phase, "job": name}
        if status.reason:
            body["reason"] = status.reason
        if status.message:
            body["message"] = status.message[:1000]
        if status.result is not None:
            body["result"] = status.result
        code = {"succeeded": 200, "failed": 400}.get(status.phase, 202)
        return web.json_response(body, status=code)

    # -- dead letters
    async def _post_dead_letter(self, url: str, event: dict[str, Any]) -> None:
        """POST until the sink answers 2xx (bounded tries, then SourceError: the Job's
        finalizer keeps the event for the next dispatcher). Only the status code of the
        answer is ever reported."""
        if self.trigger.tenant:
            await _refuse_internal(url)
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=DEAD_LETTER_TIMEOUT_SECONDS)
            )
        delay = 0.5
        for _ in range(DEAD_LETTER_TRIES):
            try:
                async with self._http.post(
                    url,
                    data=json.dumps(event).encode(),
                    headers={"Content-Type": STRUCTURED},
                    allow_redirects=False,
                ) as response:
                    if 200 <= response.status < 300:
                        return
                    what = f"answered {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                what = f"unreachable ({type(exc).__name__})"
            logger.warning(
                "dead-letter sink %s %s; retrying in %.1fs",
                urllib.parse.urlsplit(url).netloc,
                what,
                delay,
                extra={"scaledjob": self.scaledjob, "source": self.name},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise SourceError(
            f"the dead-letter sink {urllib.parse.urlsplit(url).netloc} did not take the failed "
            f"event after {DEAD_LETTER_TRIES} tries; its Job keeps it and it is sent again "
            "when a dispatcher restarts"
        )


def _dead_letter_event(
    original: Mapping[str, Any], decision: Decision, source: HttpSource
) -> dict[str, Any]:
    """The structured CloudEvent of a failed event: its data as received, the reason in
    extension attributes (lower-case alphanumerics of at most 20 characters, as the
    CloudEvents spec advises), its id deterministic per Job so a sink can drop a repeat."""
    headers = original.get("headers") or {}
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"{decision.job_name}/dead-letter",
        "source": f"/jobrunner/{source.namespace}/{source.scaledjob}",
        "type": "dev.jobrunner.event.deadlettered",
        "subject": str(original.get("identity") or ""),
        "jobrunnerreason": decision.reason,
        "jobrunnerdetail": decision.detail[:4000],
        "jobrunnerjob": decision.job_name or "",
    }
    if headers.get("ce-source"):
        event["jobrunnereventsource"] = headers["ce-source"]
    if headers.get("ce-id"):
        event["jobrunnereventid"] = headers["ce-id"]
    if headers.get("ce-type"):
        event["jobrunnereventtype"] = headers["ce-type"]
    if original.get("content_type"):
        event["datacontenttype"] = original["content_type"]
    if original.get("body") is not None:
        event["data_base64"] = original["body"]
    return event


async def _refuse_internal(url: str) -> None:
    """A tenant's dead-letter URL must not reach the operator's own host or the cloud's
    metadata service: loopback, link-local (169.254.169.254), unspecified and multicast
    addresses are refused (checked on every POST, so a DNS name cannot be repointed)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    port = urllib.parse.urlsplit(url).port or 443
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # unreachable: the POST fails and is retried
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if (
            address.is_loopback
            or address.is_link_local
            or address.is_unspecified
            or address.is_multicast
        ):
            raise SourceError(
                f"the dead-letter URL's host {host} is an address the operator does not post "
                "to (loopback, link-local, unspecified or multicast); give a Service or an "
                "external URL"
            )


def open_source(trigger: HttpTrigger, *, scaledjob: ScaledJob, settings: Settings) -> HttpSource:
    """The source for a resolved ``http`` trigger (see jobrunner.manifest.triggers.http).
    Outside ``--local`` an unauthenticated trigger is refused."""
    local = settings.executor is Executor.LOCAL
    if trigger.auth == "none" and not local:
        raise ManifestError(
            f"ScaledJob {scaledjob.name}: field spec.triggers[0].metadata.auth: the http "
            "trigger needs authentication outside --local: give a TriggerAuthentication "
            "with a token parameter (a Secret), or metadata auth: tokenReview"
        )
    address = trigger.listen_address or (
        settings.http.local_listen_address if local else settings.http.listen_address
    )
    if trigger.tenant:
        address = settings.http.listen_address
    return HttpSource(
        trigger,
        scaledjob=scaledjob,
        address=address,
        max_body=scaledjob.spec.messageDelivery.maxMessageBytes,
    )
