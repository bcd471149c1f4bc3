"""RabbitMQ source on aio-pika: push consumption with prefetch as backpressure, and the
broker side of settling (ack, requeue, dead-letter with the reason in headers).

Dead-lettering publishes a copy carrying ``x-jobrunner-*`` reason headers, confirmed by
the broker, and only then acks the original, so a crash in between can duplicate a
dead-lettered copy but never lose the message. The copy goes to the configured exchange,
else the queue's own dead-letter exchange (read through the management API), else a
durable ``<queue>.dead-letter`` queue.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from jobrunner.core.deadletters import DeadLetter, replay_headers
from jobrunner.core.models import Action, Decision, Delivery, Reply, ReplyAddress
from jobrunner.core.naming import message_identity
from jobrunner.core.protocols import (
    MessageHandle,
    ReplyRefused,
    SourceError,
    SourceUnreachable,
)
from jobrunner.core.redaction import address, describe_error
from jobrunner.core.settings import Settings
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.rabbitmq import RabbitMQTrigger

logger = logging.getLogger(__name__)

_GONE = (
    aio_pika.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.ChannelClosed,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
)


@dataclass(frozen=True)
class DeadLetterTarget:
    exchange: str
    routing_key: str | None
    """None: the message's own routing key."""
    declare_queue: str | None = None

    def describe(self) -> str:
        if self.declare_queue:
            return f"queue {self.declare_queue!r}"
        return f"exchange {self.exchange!r} (routing key {self.routing_key or '<original>'})"


@dataclass
class RabbitMQHandle:
    delivery: Delivery
    message: aio_pika.abc.AbstractIncomingMessage


def _header_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


@dataclass(frozen=True)
class QueueSettings:
    """What the broker applies to the queue, from its arguments or its policy (arguments
    win, as RabbitMQ resolves them)."""

    queue_type: str = "classic"
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    delivery_limit: int | None = None
    """Quorum queues: returns a message survives; past them the broker drops it (or
    dead-letters it itself). None: unlimited (see ``delivery_limit``)."""
    broker_version: str = ""
    """The broker's ``rabbitmq_version`` (``GET /api/overview``); "" when unknown."""


RABBITMQ_4_DELIVERY_LIMIT = 20
"""The delivery limit RabbitMQ 4.0 and later give a quorum queue that sets none
(``?DEFAULT_DELIVERY_LIMIT`` in rabbit_quorum_queue.erl; 3.x has no default). A negative
limit (``-1``) turns it off there."""


def _limit_value(value: Any) -> int | None:
    """A delivery limit as the broker reads it: an integer (a digit string from a policy
    set through the HTTP API too), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


_VERSION = re.compile(r"\d{1,4}(\.\d{1,6}){0,3}")


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def delivery_limit(
    *,
    queue_type: str,
    version: str,
    argument: Any = None,
    policy: Any = None,
    reported: Any = None,
) -> int | None:
    """The delivery limit the broker applies to a queue, by RabbitMQ's own rules
    (rabbit_quorum_queue.erl, ``gather_policy_config`` and ``resolve_delivery_limit``):
    only quorum queues have one; the limit the queue reports in its statistics
    (``delivery_limit``, 4.x: a number or ``unlimited``) when it does; else of the
    ``x-delivery-limit`` argument and the policy's ``delivery-limit`` the smaller (the
    larger when one is negative); a negative limit is none (4.x); neither set: none on
    3.x, ``RABBITMQ_4_DELIVERY_LIMIT`` on 4.x — and on a broker of unknown version too,
    since assuming a limit that is not there costs only an early hand-over, while
    assuming none where there is one can lose messages. None: unlimited."""
    if queue_type != "quorum":
        return None
    if reported == "unlimited":
        return None
    known = _limit_value(reported)
    if known is not None:
        return None if known < 0 else known
    limits = [v for v in (_limit_value(argument), _limit_value(policy)) if v is not None]
    if limits:
        limit = max(limits) if any(v < 0 for v in limits) else min(limits)
        return None if limit < 0 else limit
    major = _major(version)
    if major is not None and major < 4:
        return None
    return RABBITMQ_4_DELIVERY_LIMIT


MANAGEMENT_ANSWER_MAX = 1024 * 1024
"""The most of a management API answer read (a queue's description is a few KiB)."""
_QUEUE_TYPES = ("classic", "quorum", "stream")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would resend the Authorization header to wherever
    it points, https or not."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def management_queue_settings(
    management_url: str,
    vhost: str,
    queue: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    credentials: tuple[str, str] | None = None,
) -> QueueSettings:
    """The queue's type, dead-letter exchange and delivery limit, read through the
    management API (``GET /api/queues/<vhost>/<queue>``, and ``GET /api/overview`` for
    the broker's version, which decides the default limit: ``delivery_limit``) at
    ``management_url``
    (``scheme://host:port``; https verified with ``ssl_context``), with Basic auth when
    ``credentials`` (user, password) are given. Redirects are refused and at most
    ``MANAGEMENT_ANSWER_MAX`` bytes are read. Raises ``urllib.error.URLError`` (an
    ``HTTPError`` for a non-2xx answer), ``OSError`` or ``ValueError`` (not JSON)."""
    path = f"/api/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
    info = _management_get(management_url, path, ssl_context=ssl_context, credentials=credentials)
    try:
        # The broker's generation decides a quorum queue's default delivery limit.
        overview = _management_get(
            management_url, "/api/overview", ssl_context=ssl_context, credentials=credentials
        )
        version = str(overview.get("rabbitmq_version") or "")
    except (OSError, ValueError):
        version = ""
    # Kept (and logged) only as jobrunner parses it: digits and dots, never the answer.
    version = version if _VERSION.fullmatch(version) else ""
    arguments = info.get("arguments") or {}
    policy = info.get("effective_policy_definition") or {}
    queue_type = str(info.get("type") or arguments.get("x-queue-type") or "classic")
    queue_type = queue_type if queue_type in _QUEUE_TYPES else "classic"
    return QueueSettings(
        queue_type=queue_type,
        dead_letter_exchange=arguments.get(
            "x-dead-letter-exchange", policy.get("dead-letter-exchange")
        ),
        dead_letter_routing_key=arguments.get(
            "x-dead-letter-routing-key", policy.get("dead-letter-routing-key")
        ),
        delivery_limit=delivery_limit(
            queue_type=queue_type,
            version=version,
            argument=arguments.get("x-delivery-limit"),
            policy=policy.get("delivery-limit"),
            reported=info.get("delivery_limit"),
        ),
        broker_version=version,
    )


def _management_get(
    management_url: str,
    path: str,
    *,
    ssl_context: ssl.SSLContext | None,
    credentials: tuple[str, str] | None,
) -> dict[str, Any]:
    """One management API answer, a JSON object (see ``management_queue_settings``)."""
    parsed = urllib.parse.urlsplit(management_url)
    default_port = 15671 if parsed.scheme == "https" else 15672
    host = f"[{parsed.hostname}]" if ":" in (parsed.hostname or "") else parsed.hostname
    request = urllib.request.Request(
        f"{parsed.scheme}://{host}:{parsed.port or default_port}{path}"
    )
    if credentials is not None:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode())
        request.add_header("Authorization", f"Basic {token.decode()}")
    opener = urllib.request.build_opener(
        _NoRedirects(), urllib.request.HTTPSHandler(context=ssl_context)
    )
    with opener.open(request, timeout=5) as response:
        info = json.loads(response.read(MANAGEMENT_ANSWER_MAX))
    if not isinstance(info, dict):
        raise ValueError("the management API's answer is not a JSON object")
    return info


def _http_words(exc: BaseException) -> str:
    """A failed management lookup in jobrunner's words: the HTTP status, never the
    answer's reason phrase or body."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return describe_error(exc.reason)
    return describe_error(exc)


def _ssl_cause(exc: BaseException) -> str | None:
    """The TLS failure inside a connection error, when that is what it was."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate not trusted: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return seen.reason or "handshake failed"  # an OpenSSL reason code
        for arg in getattr(seen, "args", ()):
            if isinstance(arg, ssl.SSLError):
                return _ssl_cause(arg)
        seen = seen.__cause__ or seen.__context__
    return None


AMQP_REPLY_CODES = {
    311: "CONTENT_TOO_LARGE",
    312: "NO_ROUTE",
    313: "NO_CONSUMERS",
    320: "CONNECTION_FORCED",
    402: "INVALID_PATH",
    403: "ACCESS_REFUSED",
    404: "NOT_FOUND",
    405: "RESOURCE_LOCKED",
    406: "PRECONDITION_FAILED",
    501: "FRAME_ERROR",
    502: "SYNTAX_ERROR",
    503: "COMMAND_INVALID",
    504: "CHANNEL_ERROR",
    505: "UNEXPECTED_FRAME",
    506: "RESOURCE_ERROR",
    530: "NOT_ALLOWED",
    540: "NOT_IMPLEMENTED",
    541: "INTERNAL_ERROR",
}
"""AMQP 0-9-1's reply codes (the specification's constants): what is reported of a
broker's close, rather than its reply text."""


def _short(exc: BaseException) -> str:
    """An AMQP failure in jobrunner's words: the reply code and its name from the
    specification when the broker closed with one, else the class and errno
    (jobrunner.core.redaction) — never the broker's reply text."""
    if isinstance(exc, aiormq.exceptions.AMQPError):
        code = next((a for a in exc.args if isinstance(a, int)), None)
        if code is None:
            frame = next((a for a in exc.args if hasattr(a, "reply_code")), None)
            code = getattr(frame, "reply_code", None)
        if isinstance(code, int) and code in AMQP_REPLY_CODES:
            return f"{type(exc).__name__}: AMQP {code} {AMQP_REPLY_CODES[code]}"
    return describe_error(exc)


def _published_at(message: aio_pika.abc.AbstractIncomingMessage) -> float | None:
    """The producer's clock: RabbitMQ's ``timestamp_in_ms`` header (message-timestamp
    plugin) or the AMQP ``timestamp`` property (whole seconds)."""
    millis = (message.headers or {}).get("timestamp_in_ms")
    if isinstance(millis, int | float):
        return float(millis) / 1000
    if message.timestamp is not None:
        return message.timestamp.timestamp()
    return None


class RabbitMQSource:
    name = "rabbitmq"

    def __init__(
        self,
        *,
        url: str,
        queue: str,
        prefetch: int,
        dead_letter_exchange: str | None = None,
        dead_letter_routing_key: str | None = None,
        dead_letter_queue: str | None = None,
        management_url: str | None = None,
        scaledjob: str = "",
        ssl_context: ssl.SSLContext | None = None,
        management_ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._url = url
        self._ssl = ssl_context
        self._queue_name = queue
        self._prefetch = prefetch
        self._dlx = dead_letter_exchange
        self._dlx_key = dead_letter_routing_key
        self._dlq = dead_letter_queue or f"{queue}.dead-letter"
        self._management_url = management_url
        self._management_ssl = management_ssl_context or ssl_context
        self._scaledjob = scaledjob
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._consume_channel: aio_pika.abc.AbstractChannel | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._reply_channel: aio_pika.abc.AbstractChannel | None = None
        """Confirms and returns (``mandatory``): replies alone use it."""
        self._incoming: asyncio.Queue[RabbitMQHandle] = asyncio.Queue()
        self._consumer_tag: str | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self.target: DeadLetterTarget | None = None
        self.vhost = urllib.parse.unquote(urllib.parse.urlsplit(url).path.lstrip("/")) or "/"
        self._user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "guest")
        self.problem: str | None = None
        """Why the source cannot consume now, noticed after it started (for /readyz)."""
        self.settings = QueueSettings()

    @property
    def broker(self) -> str:
        """The broker's address without credentials, for messages."""
        default = 5671 if urllib.parse.urlsplit(self._url).scheme == "amqps" else 5672
        return address(self._url, default_port=default)

    async def start(self) -> None:
        """Connect and start consuming. SourceError, in one line naming the broker, the
        vhost and the queue and saying what to do, when the broker cannot be reached,
        refuses the credentials, or has no such vhost or queue."""
        try:
            await self._start()
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise SourceError(
                f"RabbitMQ at {self.broker}: queue {self._queue_name!r} does not exist in "
                f"vhost {self.vhost!r}; declare it (rabbitmqadmin declare queue "
                f"name={self._queue_name} durable=true) or fix metadata.queueName"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise SourceError(
                f"RabbitMQ at {self.broker}: user {self._user!r} may not read queue "
                f"{self._queue_name!r} in vhost {self.vhost!r} ({_short(exc)}); grant it "
                "(rabbitmqctl set_permissions)"
            ) from None
        except aiormq.exceptions.ProbableAuthenticationError:
            raise SourceError(
                f"RabbitMQ at {self.broker} refused the credentials of user {self._user!r}; "
                "check the password in the host URL or the TriggerAuthentication"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(
                f"RabbitMQ at {self.broker}: its TLS certificate is not trusted "
                f"({exc.verify_message}); give the CA that signed it (TriggerAuthentication "
                "parameter ca)"
            ) from None
        except aiormq.exceptions.AMQPConnectionError as exc:
            cause = _ssl_cause(exc)
            if cause is not None:
                raise SourceError(
                    f"RabbitMQ at {self.broker}: TLS failed ({cause}); check the CA (parameter "
                    "ca) and the client certificate (cert, key)"
                ) from None
            raise SourceUnreachable(
                f"RabbitMQ at {self.broker} is not reachable ({_short(exc)}); is it running?"
            ) from None
        except aiormq.exceptions.AMQPError as exc:
            # Closing the connection while it opens: a vhost that does not exist, or one
            # the user may not use.
            raise SourceError(
                f"RabbitMQ at {self.broker} refused to open vhost {self.vhost!r} for user "
                f"{self._user!r} ({_short(exc)}); does the vhost exist, and may the user "
                "use it? (rabbitmqctl list_vhosts, list_permissions)"
            ) from None

    async def _start(self) -> None:
        self._connection = await aio_pika.connect_robust(
            self._url, fail_fast=True, ssl_context=self._ssl
        )
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        self._consume_channel = await self._connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=self._prefetch)
        # Passive: the queue (with its arguments and dead-letter settings) is the user's.
        self._queue = await self._consume_channel.get_queue(self._queue_name, ensure=True)
        self.settings = await self._queue_settings()
        self.target = await self._resolve_target()
        logger.info("dead-letter target for queue %s: %s", self._queue_name, self.target.describe())
        if self.settings.delivery_limit is not None:
            logger.warning(
                "queue %s is a %s queue with delivery limit %d (RabbitMQ %s): the broker "
                "drops (or dead-letters) a message returned more often than that, which "
                "repeated dispatcher crashes could cause; a message with one return left is "
                "handed over to its Job as soon as the Job exists",
                self._queue_name,
                self.settings.queue_type,
                self.settings.delivery_limit,
                self.settings.broker_version or "of unknown version: 4.x's default assumed",
            )
        self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)

    @property
    def management_url(self) -> str:
        """Where the management API is asked for the queue's settings: the trigger's
        ``managementURL``, else the broker's host at ``https://…:15671`` when the AMQP
        link is amqps (verified with the link's TLS settings), ``http://…:15672`` when
        it is plain amqp (its credentials already cross that network in clear)."""
        if self._management_url:
            return self._management_url
        parsed = urllib.parse.urlsplit(self._url)
        host = f"[{parsed.hostname}]" if ":" in (parsed.hostname or "") else parsed.hostname
        if parsed.scheme == "amqps":
            return f"https://{host}:15671/"
        return f"http://{host}:15672/"

    def _management_credentials(self) -> tuple[str, str] | None:
        """The management URL's own userinfo, else the AMQP link's (as KEDA's http
        protocol uses the host URL's); None when neither has any."""
        for url in (self._management_url or "", self._url):
            parsed = urllib.parse.urlsplit(url)
            if parsed.username:
                return (
                    urllib.parse.unquote(parsed.username),
                    urllib.parse.unquote(parsed.password or ""),
                )
        return None

    async def _queue_settings(self) -> QueueSettings:
        management = self.management_url
        try:
            return await asyncio.to_thread(
                management_queue_settings,
                management,
                self.vhost,
                self._queue_name,
                ssl_context=self._management_ssl,
                credentials=self._management_credentials(),
            )
        except Exception as exc:
            logger.info(
                "could not read queue %s arguments from the management API at %s (%s); "
                "assuming no dead-letter exchange and no delivery limit",
                self._queue_name,
                address(management),
                _http_words(exc),
            )
            return QueueSettings()

    async def _resolve_target(self) -> DeadLetterTarget:
        if self._dlx is not None:
            return DeadLetterTarget(self._dlx, self._dlx_key)
        if self.settings.dead_letter_exchange is not None:
            return DeadLetterTarget(
                self.settings.dead_letter_exchange, self.settings.dead_letter_routing_key
            )
        assert self._publish_channel is not None
        await self._publish_channel.declare_queue(self._dlq, durable=True)
        return DeadLetterTarget("", self._dlq, declare_queue=self._dlq)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        headers = {str(k): _header_text(v) for k, v in (message.headers or {}).items()}
        delivery = Delivery(
            source=self.name,
            identity=message_identity(message.message_id, message.body, headers),
            body=message.body,
            message_id=message.message_id,
            headers=headers,
            content_type=message.content_type,
            redelivered=bool(message.redelivered),
            delivery_count=_delivery_count(message),
            returns_left=self._returns_left(message),
            metadata={
                "queue": self._queue_name,
                "exchange": message.exchange or "",
                "routing_key": message.routing_key or "",
                "vhost": self.vhost,
                # RabbitMQ's RPC pattern: where the producer waits for the result.
                **({"reply_to": message.reply_to} if message.reply_to else {}),
                **({"correlation_id": message.correlation_id} if message.correlation_id else {}),
            },
            received_at=time.monotonic(),
            published_at=_published_at(message),
        )
        await self._incoming.put(RabbitMQHandle(delivery=delivery, message=message))

    def _returns_left(self, message: aio_pika.abc.AbstractIncomingMessage) -> int | None:
        """Quorum queues count each return of a message in ``x-delivery-count`` and drop
        it once the count exceeds the queue's delivery limit."""
        limit = self.settings.delivery_limit
        if limit is None:
            return None
        count = (message.headers or {}).get("x-delivery-count", 0)
        return limit - int(count) if isinstance(count, int) else limit

    async def deliveries(self) -> AsyncIterator[RabbitMQHandle]:
        while True:
            yield await self._incoming.get()

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def depth(self) -> int | None:
        """Messages ready in the queue; also notices a queue deleted under us (the
        problem then shows on /readyz until it exists again)."""
        if self._publish_channel is None or not self.connected:
            return None
        try:
            queue = await self._publish_channel.declare_queue(self._queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self.problem = (
                f"RabbitMQ at {self.broker}: queue {self._queue_name!r} no longer exists in "
                f"vhost {self.vhost!r}; declare it again"
            )
            logger.warning("%s", self.problem)
            return None
        except _GONE:
            return None
        self.problem = None
        return queue.declaration_result.message_count

    async def stop_consuming(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except _GONE as exc:
                logger.info(
                    "cancelling the consumer failed (%s); the channel is gone anyway", _short(exc)
                )
            self._consumer_tag = None

    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, RabbitMQHandle):
            raise TypeError(f"not a RabbitMQ message: {handle!r}")
        message = handle.message
        try:
            if decision.action is Action.ACK:
                await message.ack()
            elif decision.action is Action.REQUEUE:
                await message.nack(requeue=True)
            else:
                await self._publish_dead_letter(
                    body=message.body,
                    message_id=message.message_id,
                    content_type=message.content_type,
                    headers={**(message.headers or {})},
                    routing_key=message.routing_key or self._queue_name,
                    decision=decision,
                )
                await message.ack()
        except _GONE as exc:
            logger.warning(
                "message %s could not be settled (%s): the broker will redeliver it",
                handle.delivery.identity,
                _short(exc),
            )
            return False
        return True

    def is_durable(self, handle: MessageHandle) -> bool:
        return True  # an ack the broker took is final

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        metadata = original.get("metadata") or {}
        await self._publish_dead_letter(
            body=original["body"],
            message_id=original.get("message_id"),
            content_type=original.get("content_type"),
            headers=dict(original.get("headers") or {}),
            routing_key=metadata.get("routing_key") or self._queue_name,
            decision=decision,
        )

    async def _publish_dead_letter(
        self,
        *,
        body: bytes,
        message_id: str | None,
        content_type: str | None,
        headers: dict[str, Any],
        routing_key: str,
        decision: Decision,
    ) -> None:
        assert self._publish_channel is not None
        assert self.target is not None
        headers.update(
            decision.reason_headers(source_queue=self._queue_name, scaledjob=self._scaledjob)
        )
        copy = aio_pika.Message(
            body,
            message_id=message_id,
            content_type=content_type,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            # When it was dead-lettered, for `jobrunner dead-letters`.
            timestamp=datetime.datetime.now(datetime.UTC),
        )
        if self.target.exchange:
            exchange = await self._publish_channel.get_exchange(self.target.exchange, ensure=False)
        else:
            exchange = self._publish_channel.default_exchange
        key = self.target.routing_key or routing_key
        # With publisher confirms this returns once the broker has taken the copy.
        await exchange.publish(copy, routing_key=key)

    # ------------------------------------------------------------------ replies
    def reply_address(self, message: Mapping[str, Any]) -> ReplyAddress | None:
        """The message's ``reply_to`` as a queue of this connection's vhost, reached
        through the default exchange (``check_reply_queue`` says what is refused)."""
        metadata = message.get("metadata") or {}
        reply_to = str(metadata.get("reply_to") or "")
        if not reply_to:
            return None
        check_reply_queue(reply_to, own=(self._queue_name, self._dlq))
        return ReplyAddress(
            destination=reply_to,
            correlation_id=str(metadata.get("correlation_id") or ""),
            kind="queue",
        )

    async def send_reply(self, address: ReplyAddress, reply: Reply) -> None:
        """Publish to the default exchange, routing key the reply queue, ``mandatory``
        with publisher confirms on this source's own connection: a queue that does not
        exist (deleted, or its exclusive owner gone) makes the broker return the reply,
        which is ReplyRefused. Not persistent: a reply queue is its client's, and
        usually exclusive."""
        if self._connection is None:
            raise ConnectionError("not connected")
        if self._reply_channel is None or self._reply_channel.is_closed:
            self._reply_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        headers: dict[str, Any] = {f"cloudEvents:{k}": v for k, v in reply.attributes.items()}
        message = aio_pika.Message(
            reply.body,
            message_id=reply.reply_id,
            correlation_id=reply.correlation_id or None,
            content_type=reply.content_type,
            headers=headers,
            type=reply.attributes.get("type"),
            app_id="jobrunner",
            timestamp=datetime.datetime.now(datetime.UTC),
        )
        try:
            await self._reply_channel.default_exchange.publish(
                message, routing_key=address.destination, mandatory=True
            )
        except aio_pika.exceptions.PublishError:
            raise ReplyRefused(
                f"no queue {address.destination!r} in vhost {self.vhost!r} (the broker "
                "returned the reply as unroutable: deleted, or its client gone)"
            ) from None

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._reply_channel = None
        self._queue = self._consumer_tag = None
        if connection is not None:
            await connection.close()


REPLY_QUEUE_MAX = 255
"""Bytes of a queue name (an AMQP short string)."""
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
"""RabbitMQ's direct reply-to pseudo-queue: a client consuming from it gets a
``reply_to`` starting with this (``amq.rabbitmq.reply-to.<token>``)."""
_SERVER_NAMED = ("amq.gen-", DIRECT_REPLY_TO)
"""``amq.*`` names a reply may use: a server-named queue (declared with an empty name, as
an RPC client's exclusive reply queue is) and direct reply-to; no client can declare any
other ``amq.*`` queue."""


def check_reply_queue(reply_to: str, *, own: Sequence[str]) -> None:
    """Refuse (ReplyRefused) a ``reply_to`` that is not a plain queue name for the
    default exchange of the trigger's own vhost: a hostile publisher must not make
    jobrunner publish anywhere else. Refused: an exchange named in it (``exchange/key``,
    as Spring AMQP's Address syntax writes one, or an ``amqp://`` address: another
    broker), a name RabbitMQ reserves (``amq.*``, but a server-named queue and direct
    reply-to), the trigger's own queue or dead-letter queue (a reply there would be a new
    message: a loop), a name over 255 bytes or with control characters. The vhost is the
    tenancy boundary: any queue of the trigger's vhost the connection's user may write is
    a reply queue."""
    if "/" in reply_to or ":" in reply_to:
        raise ReplyRefused(
            "reply_to may only name a queue of the trigger's vhost (no exchange, no other "
            "broker: 'exchange/key' and URLs are refused)"
        )
    if len(reply_to.encode()) > REPLY_QUEUE_MAX or any(ord(c) < 32 for c in reply_to):
        raise ReplyRefused("reply_to is not a queue name (over 255 bytes, or control characters)")
    if reply_to.startswith("amq.") and not reply_to.startswith(_SERVER_NAMED):
        raise ReplyRefused(f"reply_to {reply_to!r} is a name RabbitMQ reserves (amq.*)")
    if reply_to in own:
        raise ReplyRefused(
            f"reply_to {reply_to!r} is the trigger's own queue or its dead-letter queue"
        )


def ssl_context(trigger: RabbitMQTrigger) -> ssl.SSLContext | None:
    """The TLS context for an amqps:// broker: the trigger's CA (else the system's), its
    client certificate when given, verification off only with ``unsafeSsl``."""
    if not trigger.tls:
        return None
    context = ssl.create_default_context(cadata=trigger.ca or None)
    if trigger.unsafe_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if trigger.cert and trigger.key:
        # ssl loads a client certificate only from a file.
        with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as pem:
            pem.write(trigger.cert + "\n" + trigger.key)
        try:
            context.load_cert_chain(pem.name, password=trigger.key_password or None)
        finally:
            os.unlink(pem.name)
    return context


def open_source(
    trigger: RabbitMQTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> RabbitMQSource:
    """The source for a resolved ``rabbitmq`` trigger (see jobrunner.manifest.triggers.rabbitmq)."""
    spec = scaledjob.spec
    link_tls = ssl_context(trigger)
    management_tls = link_tls
    if link_tls is None and trigger.management_url.startswith("https:"):
        management_tls = ssl.create_default_context(cadata=trigger.ca or None)
    return RabbitMQSource(
        url=trigger.url,
        queue=trigger.queue,
        management_url=trigger.management_url or None,
        ssl_context=link_tls,
        management_ssl_context=management_tls,
        prefetch=spec.maxReplicaCount,
        dead_letter_exchange=spec.deadLetter.exchange,
        dead_letter_routing_key=spec.deadLetter.routingKey,
        dead_letter_queue=spec.deadLetter.queue,
        scaledjob=scaledjob.name,
    )


class RabbitMQDeadLetters:
    """A dead-letter queue, for ``jobrunner dead-letters``. Listing takes the messages
    with ``basic.get`` and does not ack them, so closing the channel puts them back where
    they were; a replay publishes a copy to the source queue (confirmed by the broker)
    and only then acks the dead letter, so a crash in between can duplicate the replay,
    never lose it."""

    def __init__(self, *, url: str, queue: str, dead_letter_queue: str) -> None:
        self._url = url
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue
        self._host = address(url, default_port=5672)
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._held: dict[int, aio_pika.abc.AbstractIncomingMessage] = {}

    @property
    def where(self) -> str:
        return f"queue {self.dead_letter_queue} on RabbitMQ {self._host}"

    @property
    def destination(self) -> str:
        return f"queue {self.queue}"

    async def _open(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None:
            try:
                self._connection = await aio_pika.connect(self._url, timeout=10)
            except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
                raise SourceUnreachable(f"RabbitMQ at {self._host}: {_short(exc)}") from exc
            self._channel = await self._connection.channel(publisher_confirms=True)
        return self._channel

    async def read(self, *, limit: int) -> list[DeadLetter]:
        channel = await self._open()
        try:
            queue = await channel.get_queue(self.dead_letter_queue, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            self._channel = None  # the broker closed it
            return []
        out: list[DeadLetter] = []
        while len(out) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            headers = {str(k): _header_text(v) for k, v in (message.headers or {}).items()}
            letter = DeadLetter(
                id=message.message_id or message_identity(None, message.body, headers)[:19],
                body=message.body,
                headers=headers,
                message_id=message.message_id,
                content_type=message.content_type,
                when=message.timestamp.timestamp() if message.timestamp else None,
            )
            self._held[id(letter)] = message
            out.append(letter)
        return out

    async def replay(self, letters: Sequence[DeadLetter], *, value: str) -> int:
        channel = await self._open()
        done = 0
        for letter in letters:
            message = self._held.pop(id(letter), None)
            if message is None:
                continue
            copy = aio_pika.Message(
                letter.body,
                message_id=letter.message_id,
                content_type=letter.content_type,
                headers=dict(replay_headers(letter.headers, value)),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=datetime.datetime.now(datetime.UTC),
            )
            target = letter.source_header("queue") or self.queue
            await channel.default_exchange.publish(copy, routing_key=target)
            await message.ack()
            done += 1
        return done

    async def close(self) -> None:
        """What was listed and not replayed goes back to the dead-letter queue."""
        self._held.clear()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
            self._channel = None


def open_dead_letters(
    trigger: RabbitMQTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> RabbitMQDeadLetters:
    """The dead letters of a resolved ``rabbitmq`` trigger: its ``deadLetter.queue`` or
    ``<queueName>.dead-letter`` (dead letters sent to an exchange land wherever it
    routes them; ``jobrunner dead-letters --dead-letter-queue`` names that queue)."""
    return RabbitMQDeadLetters(
        url=trigger.url,
        queue=trigger.queue,
        dead_letter_queue=scaledjob.spec.deadLetter.queue or f"{trigger.queue}.dead-letter",
    )


class RabbitMQSink:
    """Publishes output-binding messages to a queue through the default exchange, with
    publisher confirms, persistent, the deterministic output id as ``message_id``. The
    queue is declared (durable) when it does not exist."""

    def __init__(self, trigger: RabbitMQTrigger) -> None:
        self._url = trigger.url
        self._queue = trigger.queue
        self._ssl = ssl_context(trigger)
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def publish(self, body: bytes, *, message_id: str) -> None:
        if self._channel is None or self._channel.is_closed:
            if self._connection is None:
                self._connection = await aio_pika.connect_robust(
                    self._url, fail_fast=True, ssl_context=self._ssl
                )
            self._channel = await self._connection.channel(publisher_confirms=True)
            try:
                await self._channel.declare_queue(self._queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self._channel = await self._connection.channel(publisher_confirms=True)
                await self._channel.declare_queue(self._queue, durable=True)
        message = aio_pika.Message(
            body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self._channel.default_exchange.publish(message, routing_key=self._queue)

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()


def open_sink(trigger: RabbitMQTrigger, *, settings: Settings) -> RabbitMQSink:
    return RabbitMQSink(trigger)


def _delivery_count(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """Which delivery this is: a quorum queue's ``x-delivery-count`` (the returns it
    counted so far) + 1; the broker's ``redelivered`` flag makes it 2 at least (a classic
    queue counts nothing more, and RabbitMQ 4 does not count a return by a lost channel);
    else 1. Source: RabbitMQ docs, "Quorum Queues: poison message handling"."""
    least = 2 if message.redelivered else 1
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return max(least, count + 1)
    return least
