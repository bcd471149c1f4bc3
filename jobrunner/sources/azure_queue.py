"""Azure Storage queue source on the ``azure-storage-queue`` async SDK (aiohttp), with
the same guarantees as the other sources.

A Storage queue has no push consumer and no broker-side acknowledgement: a receive
makes a message invisible for a *visibility timeout* and hands out a *pop receipt*;
only the holder of the newest receipt may delete it, and when the timeout lapses the
message becomes visible again with ``dequeue_count`` + 1. So:

* **One Job per message**: the message ``id`` is assigned by the service and never
  changes across dequeues, so it is the identity; ``dequeue_count > 1`` marks a
  redelivery, which adopts the Job the message already has.
* **Held for as long as its Job runs**: each message in hand is renewed (Update
  Message) every half visibility timeout, always with the newest pop receipt, which
  every renewal replaces (the Functions queue listener does the same with its fixed
  10-minute lease; a stale receipt is what made long Functions run twice,
  Azure/azure-sdk-for-net PR #22569). Hours-long Jobs are never handed out twice.
* **Deleted only once the outcome is durable**: the dispatcher settles after the Job
  succeeded (or its failure was recorded on the poison queue).
* **Failures go to ``<queue>-poison``** (the Functions convention, created when
  missing): a new message with the original text, as the Functions host writes it; the
  reason is on the Job (event, annotation) and in the log and metrics, since a Storage
  message has no headers to carry it. Copy first, then delete: a crash between the two
  can leave a second poison copy, never lose the message.
* **Decoded per message**: the receive asks for raw text and each message is decoded
  on its own (``messageEncoding: base64``, the Functions default, strictly; or
  ``none``), so one message that is not base64 is dead-lettered ``InvalidMessage``
  while its neighbours run (the SDK's decode policy would fail the whole receive after
  the page was already leased).
* **64 KiB**: the service takes at most 64 KiB of message text
  (learn.microsoft.com "Put Message"); a poison copy is the original text, so it fits.

When the dispatcher stops, the messages still in hand are made visible at once (as a
broker returns a closed channel's unacked messages); after a crash they come back when
their visibility timeout lapses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.storage.queue import QueueMessage
from azure.storage.queue.aio import QueueClient

from jobrunner.core.deadletters import DeadLetter
from jobrunner.core.models import Action, Decision, Delivery
from jobrunner.core.protocols import MessageHandle, OutputRefused, SourceError, SourceUnreachable
from jobrunner.core.redaction import describe_error, known_code
from jobrunner.core.settings import Settings
from jobrunner.core.tasks import start_guarded
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.azure_queue import AzureQueueTrigger

logger = logging.getLogger(__name__)

MESSAGE_TEXT_MAX = 64 * 1024
"""The most text one Storage queue message holds (API version 2011-08-18 and later)."""
_RECEIVE_MAX = 32
"""The most messages one Get Messages call returns."""
_SETTLE_TRIES = 8


def encode_text(body: bytes, encoding: str) -> str:
    """The message text for ``body``: base64 (the Functions default), or the body as
    UTF-8 text for ``none``. OutputRefused when it is over 64 KiB or, for ``none``, not
    UTF-8."""
    if encoding == "base64":
        text = base64.b64encode(body).decode("ascii")
    else:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise OutputRefused(
                "the message is not UTF-8 text, which messageEncoding none needs; use base64"
            ) from None
    size = len(text.encode("utf-8"))
    if size > MESSAGE_TEXT_MAX:
        raise OutputRefused(
            f"the message is {size} bytes as {encoding} text, over the 64 KiB a Storage "
            "queue message holds"
        )
    return text


def decode_text(text: str, encoding: str) -> tuple[bytes, str | None]:
    """(body, problem): the body a message's text stands for, or the text's bytes and
    why it cannot be decoded. base64 is decoded strictly (standard alphabet, padding),
    so plain text is not silently turned into other bytes."""
    if encoding != "base64":
        return text.encode("utf-8"), None
    try:
        return base64.b64decode(text.strip(), validate=True), None
    except (binascii.Error, ValueError) as exc:
        return text.encode("utf-8"), (
            f"the message text is not base64 ({exc}); the queue's messageEncoding is base64 "
            "(the Functions default): publish it base64-encoded, or set messageEncoding: none"
        )


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""


def trigger_metadata(message: QueueMessage, queue: str) -> dict[str, str]:
    """The queue trigger's metadata as the Functions host names it (QueueTriggerBinding.cs
    in the WebJobs Storage Queues extension): ``Id``, ``DequeueCount``,
    ``InsertionTime``, ``ExpirationTime``, ``NextVisibleTime``, ``PopReceipt``, plus
    ``queue``. Times are ISO 8601 with offset; values are text (Delivery metadata is)."""
    return {
        "queue": queue,
        "Id": message.id,
        "DequeueCount": str(message.dequeue_count or 0),
        "InsertionTime": _iso(message.inserted_on),
        "ExpirationTime": _iso(message.expires_on),
        "NextVisibleTime": _iso(message.next_visible_on),
        "PopReceipt": message.pop_receipt or "",
    }


@dataclass
class AzureQueueHandle:
    delivery: Delivery
    message_id: str
    text: str
    """The message text as received (still encoded): what a poison copy carries."""
    pop_receipt: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    renewer: asyncio.Task[None] | None = None
    lost: str | None = None
    """Why the lease was lost (the message reappeared and someone else took it)."""
    settled: bool = False
    poisoned: bool = False
    """Its poison copy is written (a retried settlement must not write a second)."""


_STORAGE_CODES = frozenset(
    {
        # learn.microsoft.com "Queue service error codes" and "Common REST API error
        # codes": the ones a queue client meets.
        "AccountIsDisabled",
        "AuthenticationFailed",
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "AuthorizationProtocolMismatch",
        "AuthorizationResourceTypeMismatch",
        "AuthorizationServiceMismatch",
        "AuthorizationSourceIPMismatch",
        "InsufficientAccountPermissions",
        "InternalError",
        "InvalidAuthenticationInfo",
        "InvalidHeaderValue",
        "InvalidQueryParameterValue",
        "InvalidResourceName",
        "InvalidUri",
        "KeyVaultEncryptionKeyNotFound",
        "MessageNotFound",
        "MessageTooLarge",
        "OperationTimedOut",
        "OutOfRangeInput",
        "PopReceiptMismatch",
        "QueueAlreadyExists",
        "QueueBeingDeleted",
        "QueueDisabled",
        "QueueNotEmpty",
        "QueueNotFound",
        "RequestBodyTooLarge",
        "ResourceNotFound",
        "ServerBusy",
        "UnsupportedHeader",
    }
)
"""Storage error codes that may be reported as they are; any other code a server sends
is not repeated (it could be any text of the server's choosing)."""


def _short(exc: BaseException) -> str:
    """A Storage failure in jobrunner's words: ``HTTP <status>`` and the service's error
    code when it is one of Storage's own, else the class and errno (jobrunner.core.redaction).
    Never the answer's text: the endpoint is the ScaledJob author's to choose."""
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        raw = getattr(exc, "error_code", None)
        code = known_code(getattr(raw, "value", raw), _STORAGE_CODES)
        return f"HTTP {exc.status_code}" + (f" {code}" if code else "")
    return describe_error(exc)


def _gone(exc: BaseException) -> bool:
    """The message is no longer ours: deleted, or its pop receipt is stale (404
    MessageNotFound, 400 PopReceiptMismatch)."""
    if isinstance(exc, ResourceNotFoundError):
        return True
    return isinstance(exc, HttpResponseError) and exc.status_code in (400, 404)


class AzureQueueSource:
    name = "azure-queue"

    def __init__(
        self,
        *,
        trigger: AzureQueueTrigger,
        prefetch: int,
        visibility_timeout: float,
        max_poll_interval: float,
        scaledjob: str = "",
    ) -> None:
        self._trigger = trigger
        self._queue_name = trigger.queue
        self.poison_queue = trigger.poison_queue
        self._prefetch = prefetch
        self._visibility = int(visibility_timeout)
        self._max_poll = max_poll_interval
        self._scaledjob = scaledjob
        self._client: QueueClient | None = None
        self._poison: QueueClient | None = None
        self._poison_ready = False
        self._in_hand: dict[str, AzureQueueHandle] = {}
        self._room = asyncio.Event()
        self._consuming = True
        self._reachable = False
        self.problem: str | None = None

    @property
    def where(self) -> str:
        return f"Azure Storage queue {self._queue_name!r} at {self._trigger.account}"

    async def start(self) -> None:
        """Connect and check the queue exists. SourceError, in one line saying what to do,
        when the service cannot be reached, refuses the credentials, or has no such queue."""
        self._client = QueueClient.from_connection_string(
            self._trigger.connection, self._queue_name
        )
        self._poison = QueueClient.from_connection_string(
            self._trigger.connection, self.poison_queue
        )
        try:
            await self._client.get_queue_properties()
        except ResourceNotFoundError:
            raise SourceError(
                f"{self.where} does not exist; create it (az storage queue create -n "
                f"{self._queue_name}) or fix metadata.queueName"
            ) from None
        except ClientAuthenticationError as exc:
            raise SourceError(
                f"{self.where} refused the credentials ({_short(exc)}); check the account "
                "key in the connection string"
            ) from None
        except (ServiceRequestError, OSError) as exc:
            raise SourceUnreachable(
                f"{self.where} is not reachable ({_short(exc)}); is it running?"
            ) from None
        except HttpResponseError as exc:
            raise SourceError(
                f"{self.where} answered {_short(exc)}; is it a Storage queue endpoint?"
            ) from None
        except AzureError as exc:
            raise SourceError(
                f"{self.where} failed ({_short(exc)}); is it a Storage queue endpoint?"
            ) from None
        self._reachable = True
        self._room.set()

    async def deliveries(self) -> AsyncIterator[AzureQueueHandle]:
        assert self._client is not None
        pause = 0.1
        while True:
            if not self._consuming:
                await asyncio.Event().wait()  # stopped: nothing more, until cancelled
            free = self._prefetch - len(self._in_hand)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                messages = [
                    m
                    async for m in self._client.receive_messages(
                        messages_per_page=min(free, _RECEIVE_MAX),
                        max_messages=free,
                        visibility_timeout=self._visibility,
                    )
                ]
                self._reachable = True
                self.problem = None
            except (AzureError, SyntaxError, ValueError) as exc:
                # SyntaxError: the SDK's XML parser met an answer that is not a Storage
                # service's (xml.etree's ParseError), from an endpoint that is not one.
                self._reachable = False
                self.problem = f"{self.where}: receiving failed ({_short(exc)})"
                logger.warning("%s; retrying in %.1fs", self.problem, self._max_poll)
                await asyncio.sleep(self._max_poll)
                continue
            if not messages:
                await asyncio.sleep(pause)
                pause = min(self._max_poll, pause * 2)
                continue
            pause = 0.1
            for message in messages:
                handle = self._handle(message)
                if handle.message_id in self._in_hand:
                    # Our own message again: its lease lapsed while we held it (a stalled
                    # loop). The newest receipt is the one that counts.
                    old = self._in_hand[handle.message_id]
                    old.pop_receipt = handle.pop_receipt
                    old.lost = None
                    continue
                self._in_hand[handle.message_id] = handle
                handle.renewer = start_guarded(
                    self._renew(handle), name=f"renew-{handle.message_id}", long_lived=False
                )
                yield handle

    def _handle(self, message: QueueMessage) -> AzureQueueHandle:
        text = message.content if isinstance(message.content, str) else str(message.content)
        body, problem = decode_text(text, self._trigger.encoding)
        delivery = Delivery(
            source=self.name,
            identity=message.id,
            body=body,
            message_id=message.id,
            headers={},
            redelivered=(message.dequeue_count or 1) > 1,
            delivery_count=max(1, message.dequeue_count or 1),
            metadata=trigger_metadata(message, self._queue_name),
            received_at=time.monotonic(),
            published_at=message.inserted_on.timestamp() if message.inserted_on else None,
            unreadable=problem,
        )
        return AzureQueueHandle(
            delivery=delivery,
            message_id=message.id,
            text=text,
            pop_receipt=message.pop_receipt or "",
        )

    async def _renew(self, handle: AzureQueueHandle) -> None:
        """Keep the message invisible while it is in hand, renewing at half the timeout
        and keeping the newest pop receipt."""
        assert self._client is not None
        interval = self._visibility / 2
        while True:
            await asyncio.sleep(interval)
            async with handle.lock:
                if handle.settled:
                    return
                try:
                    updated = await self._client.update_message(
                        handle.message_id,
                        pop_receipt=handle.pop_receipt,
                        visibility_timeout=self._visibility,
                    )
                except AzureError as exc:
                    if _gone(exc):
                        handle.lost = _short(exc)
                        logger.warning(
                            "message %s: lease lost (%s); it will be delivered again and "
                            "adopt its Job",
                            handle.message_id,
                            handle.lost,
                        )
                        return
                    # Transient: try again sooner, well within the lease.
                    logger.info("message %s: renewal failed (%s)", handle.message_id, _short(exc))
                    interval = max(1.0, self._visibility / 6)
                    continue
                if updated.pop_receipt:
                    handle.pop_receipt = updated.pop_receipt
                interval = self._visibility / 2

    @property
    def connected(self) -> bool:
        return self._client is not None and self._reachable

    async def depth(self) -> int | None:
        if self._client is None:
            return None
        try:
            properties = await self._client.get_queue_properties()
        except ResourceNotFoundError:
            self.problem = f"{self.where} no longer exists; create it again"
            logger.warning("%s", self.problem)
            return None
        except AzureError:
            return None
        self.problem = None
        return int(properties.approximate_message_count or 0)

    async def stop_consuming(self) -> None:
        self._consuming = False

    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, AzureQueueHandle):
            raise TypeError(f"not an Azure queue message: {handle!r}")
        if handle.settled:
            return True
        if handle.renewer is not None:
            handle.renewer.cancel()
        try:
            return await self._settle(handle, decision)
        finally:
            if handle.settled or handle.lost:
                handle.settled = True
                self._in_hand.pop(handle.message_id, None)
                self._room.set()

    async def _settle(self, handle: AzureQueueHandle, decision: Decision) -> bool:
        assert self._client is not None
        delay = 0.2
        for attempt in range(_SETTLE_TRIES):
            async with handle.lock:
                if handle.lost:
                    return False
                try:
                    if decision.action is Action.DEAD_LETTER and not handle.poisoned:
                        await self._send_poison(handle.text)
                        handle.poisoned = True
                        logger.warning(
                            "message %s moved to %s: %s %s",
                            handle.message_id,
                            self.poison_queue,
                            decision.reason,
                            decision.detail,
                        )
                    if decision.action is Action.REQUEUE:
                        await self._client.update_message(
                            handle.message_id, pop_receipt=handle.pop_receipt, visibility_timeout=0
                        )
                    else:
                        await self._client.delete_message(
                            handle.message_id, pop_receipt=handle.pop_receipt
                        )
                    handle.settled = True
                    return True
                except AzureError as exc:
                    if _gone(exc):
                        handle.lost = _short(exc)
                        logger.warning(
                            "message %s could not be settled (%s): it will be delivered "
                            "again and adopt its Job",
                            handle.message_id,
                            handle.lost,
                        )
                        return False
                    logger.info(
                        "settling message %s failed (%s); try %d of %d",
                        handle.message_id,
                        _short(exc),
                        attempt + 1,
                        _SETTLE_TRIES,
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        # Still held (the renewal has stopped): it reappears when the lease lapses.
        handle.lost = "the service did not answer"
        return False

    async def _send_poison(self, text: str) -> None:
        assert self._poison is not None
        if not self._poison_ready:
            with contextlib.suppress(ResourceExistsError):
                await self._poison.create_queue()
            self._poison_ready = True
        await self._poison.send_message(text)

    def is_durable(self, handle: MessageHandle) -> bool:
        return True  # a deletion the service took is final

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        """A poison copy of a message whose Job kept it (ack policy onJobCreation)."""
        try:
            text = encode_text(original["body"], self._trigger.encoding)
        except OutputRefused:
            text = base64.b64encode(original["body"]).decode("ascii")
        await self._send_poison(text)
        logger.warning(
            "message %s (kept by Job %s) moved to %s: %s %s",
            original.get("identity"),
            decision.job_name,
            self.poison_queue,
            decision.reason,
            decision.detail,
        )

    async def close(self) -> None:
        """Messages still in hand become visible at once, as a broker requeues a closed
        channel's unacked messages; their Jobs are adopted by the next dispatcher."""
        handles = [h for h in self._in_hand.values() if not h.settled]
        for handle in handles:
            if handle.renewer is not None:
                handle.renewer.cancel()
        if self._client is not None:
            for handle in handles:
                if handle.lost:
                    continue
                with contextlib.suppress(AzureError):
                    await self._client.update_message(
                        handle.message_id, pop_receipt=handle.pop_receipt, visibility_timeout=0
                    )
        self._in_hand.clear()
        for client in (self._client, self._poison):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        self._client = self._poison = None


class AzureQueueDeadLetters:
    """The poison queue, for ``jobrunner dead-letters``. A poison message is the original
    text alone (the Functions convention: no headers), so the reason is not listed here:
    it is on the Job and in the dispatcher's log. Listing peeks (at most 32 messages, the
    service's peek limit); a replay sends the text back to the source queue as a new
    message (a new id, so a new Job) and then deletes the poison copy."""

    def __init__(self, trigger: AzureQueueTrigger) -> None:
        self._trigger = trigger
        self.queue = trigger.queue
        self.poison_queue = trigger.poison_queue
        self._poison = QueueClient.from_connection_string(trigger.connection, trigger.poison_queue)
        self._source = QueueClient.from_connection_string(trigger.connection, trigger.queue)

    @property
    def where(self) -> str:
        return f"queue {self.poison_queue} at {self._trigger.account}"

    @property
    def destination(self) -> str:
        return f"queue {self.queue}"

    async def read(self, *, limit: int) -> list[DeadLetter]:
        try:
            messages = await self._poison.peek_messages(max_messages=min(limit, _RECEIVE_MAX))
        except ResourceNotFoundError:
            return []
        return [self._letter(m) for m in messages]

    def _letter(self, message: QueueMessage) -> DeadLetter:
        text = str(message.content)
        body, _ = decode_text(text, self._trigger.encoding)
        return DeadLetter(
            id=message.id,
            body=body,
            message_id=message.id,
            when=message.inserted_on.timestamp() if message.inserted_on else None,
        )

    async def replay(self, letters: Sequence[DeadLetter], *, value: str) -> int:
        wanted = {d.id for d in letters}
        done = 0
        async for message in self._poison.receive_messages(
            max_messages=_RECEIVE_MAX, visibility_timeout=60
        ):
            if message.id not in wanted:
                await self._poison.update_message(
                    message.id, pop_receipt=message.pop_receipt, visibility_timeout=0
                )
                continue
            await self._source.send_message(str(message.content))
            await self._poison.delete_message(message.id, pop_receipt=message.pop_receipt)
            done += 1
        return done

    async def close(self) -> None:
        for client in (self._poison, self._source):
            with contextlib.suppress(Exception):
                await client.close()


class AzureQueueSink:
    """Publishes output-binding messages to a Storage queue (created when missing, as the
    Functions queue output binding does), encoded as the binding's messageEncoding."""

    def __init__(self, trigger: AzureQueueTrigger) -> None:
        self._trigger = trigger
        self._client = QueueClient.from_connection_string(trigger.connection, trigger.queue)
        self._ready = False

    async def publish(self, body: bytes, *, message_id: str) -> None:
        # Storage queue messages have no settable id: the service assigns one.
        text = encode_text(body, self._trigger.encoding)
        if not self._ready:
            with contextlib.suppress(ResourceExistsError):
                await self._client.create_queue()
            self._ready = True
        await self._client.send_message(text)

    async def close(self) -> None:
        await self._client.close()


def open_source(
    trigger: AzureQueueTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> AzureQueueSource:
    """The source for a resolved ``azure-queue`` trigger (see
    jobrunner.manifest.triggers.azure_queue)."""
    return AzureQueueSource(
        trigger=trigger,
        prefetch=scaledjob.spec.maxReplicaCount,
        visibility_timeout=settings.azure_queue.visibility_timeout_seconds,
        max_poll_interval=settings.azure_queue.max_poll_interval_seconds,
        scaledjob=scaledjob.name,
    )


def open_dead_letters(
    trigger: AzureQueueTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> AzureQueueDeadLetters:
    """The poison queue of a resolved ``azure-queue`` trigger."""
    return AzureQueueDeadLetters(trigger)


def open_sink(trigger: AzureQueueTrigger, *, settings: Settings) -> AzureQueueSink:
    return AzureQueueSink(trigger)
