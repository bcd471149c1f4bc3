"""NATS JetStream source on nats-py: a durable pull consumer, in-progress acks while Jobs
run, dead letters to a subject that a stream stores.

Rules, from the JetStream consumer documentation:

* A delivered message must be acked within the consumer's ``AckWait`` or it is delivered
  again. ``+WPI`` (in progress) restarts that timer, so every message in hand gets one a
  third of the way into ``AckWait``: a Job of any length keeps its message, and a
  dispatcher that dies lets its messages go after at most ``AckWait``. In-progress acks
  do not count as deliveries.
* ``MaxDeliver``: after that many deliveries JetStream stops delivering a message and
  publishes the ``MAX_DELIVERIES`` advisory. A message that would be released (``Nak``)
  on its last delivery is dead-lettered (``MaxDeliverReached``) instead, and the
  dispatchers of a consumer listen to the advisory (as one queue group) and dead-letter
  the message it names, so nothing is dropped in silence.
* Settling: success is ``+ACK`` sent as a request, so the server's answer confirms it
  (``ack_sync``); a dead letter is published to the dead-letter subject and awaited
  (the stream's PubAck), then the original is terminated with ``+TERM <reason>`` (never
  redelivered; the reason shows in the server's TERMINATED advisory); a release is
  ``Nak`` (delivered again at once).
* The identity is the stream sequence, which names one publish: positional, like a
  Kafka offset. ``Nats-Msg-Id`` (the publisher's deduplication id) is the message id.
* The dead-letter subject (``deadLetter.subject``, default
  ``jobrunner.dead-letter.<stream>``) must be stored by a stream: when none stores it,
  the stream ``<stream>-dead-letter`` is created for it; a dead-letter subject stored by
  the source stream itself is refused (dead letters would come back as work).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATSClient
from nats.aio.client import RawCredentials
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from jobrunner.core.models import Action, Decision, Delivery
from jobrunner.core.protocols import MessageHandle, SourceError, SourceUnreachable
from jobrunner.core.redaction import address, describe_error
from jobrunner.core.settings import Settings
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.nats_jetstream import NatsJetStreamTrigger

logger = logging.getLogger(__name__)

_DOWN = (nats.errors.Error, OSError, asyncio.TimeoutError)
FIRST_CONNECT_SECONDS = 15.0
"""How long the first connect may take (seconds) before the runner tries again."""
DEFAULT_ACK_WAIT = 30.0
"""AckWait of a consumer jobrunner creates (JetStream's default)."""


def _short(exc: BaseException) -> str:
    """A NATS failure in jobrunner's words: a JetStream API error by its class and
    numeric codes, anything else by class and errno (jobrunner.core.redaction) — never the
    server's description or an error line's text."""
    if isinstance(exc, nats.js.errors.APIError):
        codes = [
            f"{label} {value}"
            for label, value in (("code", exc.code), ("err_code", exc.err_code))
            if isinstance(value, int)
        ]
        return type(exc).__name__ + (f" ({', '.join(codes)})" if codes else "")
    return describe_error(exc)


@dataclass
class NatsHandle:
    delivery: Delivery
    msg: Msg
    sequence: int
    deliveries: int


class NatsJetStreamSource:
    name = "nats-jetstream"

    def __init__(
        self,
        *,
        trigger: NatsJetStreamTrigger,
        max_in_hand: int,
        dead_letter_subject: str,
        scaledjob: str = "",
    ) -> None:
        self._trigger = trigger
        self.stream = trigger.stream
        self.consumer = trigger.consumer
        self.dead_letter_subject = dead_letter_subject
        self._max_in_hand = max_in_hand
        self._scaledjob = scaledjob
        self._nc: NATSClient | None = None
        self._js: Any = None
        self._sub: Any = None
        self.ack_wait = DEFAULT_ACK_WAIT
        self.max_deliver = -1
        self._in_hand: dict[int, NatsHandle] = {}
        self._incoming: asyncio.Queue[NatsHandle] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False

    @property
    def where(self) -> str:
        return f"NATS at {address(self._trigger.server, default_port=4222)}"

    @property
    def hold_limit_seconds(self) -> float | None:
        return None  # in-progress acks keep a message for as long as its Job runs

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect, bind the durable consumer, and start fetching."""
        nc = await self._connect()
        self._js = nc.jetstream()
        try:
            await self._bind()
        except nats.js.errors.NotFoundError:
            raise SourceError(
                f"{self.where}: stream {self.stream!r} does not exist; create it (nats stream "
                f"add {self.stream} --subjects ...)"
            ) from None
        except nats.js.errors.APIError as exc:
            raise SourceError(f"{self.where}: stream {self.stream!r}: {_short(exc)}") from None
        self._stopping = False
        self._tasks = [
            start_guarded(self._fetch_loop(), name=f"nats-fetch-{self.stream}", long_lived=False),
            start_guarded(self._progress_loop(), name=f"nats-progress-{self.stream}"),
        ]
        logger.info(
            "JetStream stream %s, consumer %s (AckWait %.0fs, MaxDeliver %s); dead letters "
            "to subject %s",
            self.stream,
            self.consumer,
            self.ack_wait,
            self.max_deliver,
            self.dead_letter_subject,
        )

    async def _connect(self) -> NATSClient:
        """The client, connected within FIRST_CONNECT_SECONDS: SourceError when the
        credentials are refused, SourceUnreachable when no server answers as NATS."""
        t = self._trigger
        options: dict[str, Any] = {}
        if t.ca or t.server.startswith("tls://"):
            options["tls"] = ssl.create_default_context(cadata=t.ca or None)
        if t.creds:
            options["user_credentials"] = RawCredentials(t.creds)
        try:
            # nats-py retries the first connect without end when reconnects are unlimited
            # (a server that answers but is not NATS keeps it there): bounded here, so the
            # runner's retry, with its line on /readyz and in status, takes over.
            # The client is made first so that a connect cut short is closed, not left
            # reconnecting in the background.
            self._nc = NATSClient()
            async with asyncio.timeout(FIRST_CONNECT_SECONDS):
                await self._nc.connect(
                    servers=[t.server],
                    user=t.username,
                    password=t.password,
                    token=t.token,
                    connect_timeout=5,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    # The first connect is retried by the runner, with its line on /readyz.
                    error_cb=self._on_error,
                    **options,
                )
        except (nats.errors.AuthorizationError, nats.errors.InvalidUserCredentialsError) as exc:
            raise SourceError(
                f"{self.where}: credentials refused ({_short(exc)}); check the "
                "TriggerAuthentication"
            ) from None
        except _DOWN as exc:
            # NoServersError, a refused connection, a server that is not NATS: the
            # runner tries again with its line on /readyz.
            raise SourceUnreachable(f"{self.where} is not reachable ({_short(exc)})") from None
        return self._nc

    async def _on_error(self, exc: Exception) -> None:
        logger.warning("%s: %s", self.where, _short(exc))

    async def _bind(self) -> None:
        js = self._js
        await js.stream_info(self.stream)
        try:
            info = await js.consumer_info(self.stream, self.consumer)
        except nats.js.errors.NotFoundError:
            info = await js.add_consumer(
                self.stream,
                ConsumerConfig(
                    durable_name=self.consumer,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=DEFAULT_ACK_WAIT,
                ),
            )
            logger.info("created durable pull consumer %s on stream %s", self.consumer, self.stream)
        config = info.config
        if config.deliver_subject:
            raise SourceError(
                f"{self.where}: consumer {self.consumer!r} of stream {self.stream!r} is a push "
                "consumer; jobrunner needs a pull consumer (create one with a new name)"
            )
        if config.ack_policy not in (AckPolicy.EXPLICIT, None):
            raise SourceError(
                f"{self.where}: consumer {self.consumer!r} acks {config.ack_policy}; jobrunner "
                "settles each message itself and needs ack policy explicit"
            )
        self.ack_wait = float(config.ack_wait or DEFAULT_ACK_WAIT)
        self.max_deliver = int(config.max_deliver or -1)
        await self._dead_letter_stream()
        self._sub = await js.pull_subscribe_bind(durable=self.consumer, stream=self.stream)
        assert self._nc is not None
        advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.stream}.{self.consumer}"
        await self._nc.subscribe(
            advisory, queue=f"jobrunner-{self.consumer}", cb=self._on_max_deliveries
        )

    async def _dead_letter_stream(self) -> None:
        js = self._js
        try:
            holder = await js.find_stream_name_by_subject(self.dead_letter_subject)
        except nats.js.errors.NotFoundError:
            name = f"{self.stream}-dead-letter"
            await js.add_stream(
                StreamConfig(
                    name=name, subjects=[self.dead_letter_subject], storage=StorageType.FILE
                )
            )
            logger.info(
                "created stream %s for dead-letter subject %s", name, self.dead_letter_subject
            )
            return
        if holder == self.stream:
            raise SourceError(
                f"{self.where}: dead-letter subject {self.dead_letter_subject!r} is stored by "
                f"stream {self.stream!r} itself (dead letters would come back as work); set "
                "deadLetter.subject to a subject outside it"
            )

    async def stop_consuming(self) -> None:
        self._stopping = True
        if self._tasks:
            self._tasks[0].cancel()

    async def close(self) -> None:
        await stop_tasks(self._tasks, grace=0)
        self._tasks = []
        if self._nc is not None:
            try:
                await self._nc.close()
            except _DOWN as exc:
                logger.info("closing the NATS connection: %s", _short(exc))
            self._nc = None

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # ------------------------------------------------------------------ receive
    async def deliveries(self) -> AsyncIterator[NatsHandle]:
        while True:
            yield await self._incoming.get()

    async def _fetch_loop(self) -> None:
        delay = 0.5
        while not self._stopping:
            free = self._max_in_hand - len(self._in_hand)
            if free <= 0:
                await asyncio.sleep(0.05)
                continue
            try:
                messages = await self._sub.fetch(batch=free, timeout=2)
            except nats.errors.TimeoutError:
                continue  # nothing waiting
            except _DOWN as exc:
                logger.warning(
                    "%s: fetch failed (%s); retrying in %.1fs", self.where, _short(exc), delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 0.5
            for msg in messages:
                self._accept(msg)

    def _accept(self, msg: Msg) -> None:
        meta = msg.metadata
        sequence = int(meta.sequence.stream)
        headers = {str(k): str(v) for k, v in (msg.headers or {}).items()}
        delivery = Delivery(
            source=self.name,
            identity=f"{self.stream}/{sequence}",
            body=msg.data,
            message_id=headers.get("Nats-Msg-Id"),
            headers=headers,
            redelivered=meta.num_delivered > 1,
            delivery_count=max(1, meta.num_delivered),
            metadata={
                "stream": self.stream,
                "consumer": self.consumer,
                "subject": msg.subject,
                "sequence": str(sequence),
                "deliveries": str(meta.num_delivered),
            },
            received_at=time.monotonic(),
            published_at=meta.timestamp.timestamp() if meta.timestamp else None,
            positional=True,
        )
        handle = NatsHandle(delivery, msg, sequence, meta.num_delivered)
        self._in_hand[sequence] = handle
        self._incoming.put_nowait(handle)

    # ------------------------------------------------------------------ keep alive
    async def _progress_loop(self) -> None:
        """``+WPI`` for every message in hand, a third of the way into AckWait."""
        while True:
            await asyncio.sleep(max(0.5, self.ack_wait / 3))
            for handle in list(self._in_hand.values()):
                try:
                    await handle.msg.in_progress()
                except _DOWN as exc:
                    logger.warning(
                        "%s: in-progress ack failed (%s); will retry", self.where, _short(exc)
                    )
                    break

    # ------------------------------------------------------------------ settle
    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, NatsHandle):
            raise TypeError(f"not a JetStream message: {handle!r}")
        if self._in_hand.get(handle.sequence) is not handle:
            return False  # an older delivery of a message in hand again: the newer settles
        try:
            if decision.action is Action.REQUEUE:
                if 0 < self.max_deliver <= handle.deliveries:
                    # A Nak on the last delivery would drop it in silence.
                    decision = Decision.dead_letter(
                        "MaxDeliverReached",
                        f"released on delivery {handle.deliveries} of the consumer's "
                        f"MaxDeliver {self.max_deliver} ({decision.reason})",
                        decision.job_name,
                    )
                else:
                    await handle.msg.nak()
                    return True
            if decision.action is Action.DEAD_LETTER:
                d = handle.delivery
                await self._publish_dead_letter(d.body, dict(d.headers), dict(d.metadata), decision)
                await self._confirmed(handle.msg, b"+TERM " + decision.reason.encode()[:200])
            else:
                await handle.msg.ack_sync(timeout=10)
        except nats.errors.MsgAlreadyAckdError:
            return True
        except _DOWN as exc:
            logger.warning(
                "message %s could not be settled (%s): JetStream delivers it again after "
                "AckWait and it adopts its Job",
                handle.delivery.identity,
                _short(exc),
            )
            return False
        finally:
            if self._in_hand.get(handle.sequence) is handle:
                del self._in_hand[handle.sequence]
        return True

    async def _confirmed(self, msg: Msg, ack: bytes) -> None:
        """An ack sent as a request: the server's answer confirms it was applied."""
        assert self._nc is not None
        await self._nc.request(msg.reply, ack, timeout=10)

    def is_durable(self, handle: MessageHandle) -> bool:
        return True  # the server confirmed the ack

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        await self._publish_dead_letter(
            bytes(original["body"]),
            dict(original.get("headers") or {}),
            dict(original.get("metadata") or {}),
            decision,
        )

    async def _publish_dead_letter(
        self, body: bytes, headers: dict[str, str], metadata: dict[str, str], decision: Decision
    ) -> None:
        headers = {k: v for k, v in headers.items() if not k.startswith("x-jobrunner-")}
        # Nats-Msg-Id would make the dead-letter stream drop it as a duplicate of nothing
        # related; it travels as x-jobrunner-source-msg-id instead.
        where = {
            "scaledjob": self._scaledjob,
            "source_stream": metadata.get("stream", self.stream),
            "source_sequence": metadata.get("sequence", ""),
            "source_subject": metadata.get("subject", ""),
            "source_msg_id": headers.pop("Nats-Msg-Id", ""),
        }
        headers.update(decision.reason_headers(**{k: v for k, v in where.items() if v}))
        # Awaits the PubAck: the dead-letter stream holds the copy.
        await self._js.publish(self.dead_letter_subject, body, headers=headers, timeout=10)

    async def _on_max_deliveries(self, advisory: Msg) -> None:
        """JetStream gave up on a message (MaxDeliver): dead-letter it with the reason."""
        try:
            event = json.loads(advisory.data)
            sequence = int(event["stream_seq"])
            stored = await self._js.get_msg(self.stream, sequence)
            decision = Decision.dead_letter(
                "MaxDeliverExceeded",
                f"JetStream stopped delivering it after {event.get('deliveries')} deliveries "
                f"(consumer {self.consumer} MaxDeliver {self.max_deliver})",
            )
            await self._publish_dead_letter(
                stored.data or b"",
                {str(k): str(v) for k, v in (stored.headers or {}).items()},
                {"stream": self.stream, "sequence": str(sequence), "subject": stored.subject},
                decision,
            )
            logger.warning(
                "message %s/%s dead-lettered: %s", self.stream, sequence, decision.detail
            )
        except (*_DOWN, KeyError, ValueError) as exc:
            logger.error("MAX_DELIVERIES advisory could not be dead-lettered: %s", _short(exc))

    # ------------------------------------------------------------------ observability
    async def depth(self) -> int | None:
        """Messages the consumer has not delivered yet (``num_pending``)."""
        if self._js is None or not self.connected:
            return None
        try:
            info = await self._js.consumer_info(self.stream, self.consumer)
        except _DOWN:
            return None
        return int(info.num_pending or 0)


def open_source(
    trigger: NatsJetStreamTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> NatsJetStreamSource:
    """The source for a resolved ``nats-jetstream`` trigger."""
    return NatsJetStreamSource(
        trigger=trigger,
        max_in_hand=scaledjob.spec.maxReplicaCount,
        dead_letter_subject=scaledjob.spec.deadLetter.subject
        or f"jobrunner.dead-letter.{trigger.stream}",
        scaledjob=scaledjob.name,
    )
