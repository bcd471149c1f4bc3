"""AWS SQS source on aiobotocore: long polling, visibility kept up while a Job runs, delete
with the newest receipt handle, dead letters with the reason in message attributes.

Rules, from the SQS Developer Guide:

* A received message is hidden for the queue's visibility timeout; ``ChangeMessageVisibility``
  renews it. Every message in hand is renewed a third of the way into its timeout, so a
  Job of any length keeps its message hidden — up to SQS's cap of 12 h after the receive,
  which no renewal can pass. The dispatcher hands the message over to its Job before
  that cap (``hold_limit_seconds``): it is deleted and the Job keeps the copy.
* Each receive returns a new receipt handle and only the newest one deletes reliably;
  the source remembers the newest per message id and settles with it.
* FIFO queues: SQS returns no message of a message group while others of it are in
  flight, but one receive may return several of a group; the source hands those out
  one at a time, in order, each after the previous one's settlement, so a group's Jobs
  run one after another. The identity is the deduplication id (a producer's retry after
  SQS's 5-minute deduplication window finds the Job it already has); on a standard queue
  it is the message id, which names one send.
* Dead letters: a copy (``SendMessage``, with ``x-jobrunner-*`` reason attributes, the
  SQS message id in ``x-jobrunner-source-message-id``) to
  ``deadLetter.queue``, else the queue's redrive-policy target, else ``<queue>-dead-letter``
  (created, FIFO when the queue is); only then is the original deleted. SQS allows 10
  message attributes: when the originals and ours would pass that, the originals travel
  as one JSON attribute ``x-jobrunner-original-attributes``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from jobrunner.core.models import Action, Decision, Delivery
from jobrunner.core.protocols import MessageHandle, SourceError, SourceUnreachable
from jobrunner.core.redaction import address, describe_error, known_code
from jobrunner.core.settings import Settings
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.sqs import SQS_HOLD_CAP_SECONDS, SQSTrigger

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import ChangeMessageVisibilityBatchRequestEntryTypeDef

logger = logging.getLogger(__name__)

_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}
_REFUSED = {
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSecurity",
}
_GONE = {
    "ReceiptHandleIsInvalid",
    "AWS.SimpleQueueService.MessageNotInflight",
    "InvalidParameterValue",
}
_CODES = (
    _MISSING_QUEUE
    | _REFUSED
    | _GONE
    | {
        # The SQS API Reference's error codes (common and per action) worth telling apart.
        "AWS.SimpleQueueService.NonExistentQueue",
        "ExpiredToken",
        "IncompleteSignature",
        "InternalFailure",
        "InvalidAction",
        "InvalidAddress",
        "InvalidClientTokenId",
        "InvalidParameterCombination",
        "MissingParameter",
        "OptInRequired",
        "OverLimit",
        "QueueDeletedRecently",
        "RequestExpired",
        "RequestThrottled",
        "ServiceUnavailable",
        "ThrottlingException",
        "KmsAccessDenied",
        "KmsDisabled",
        "KmsNotFound",
        "KmsThrottled",
    }
)
"""Error codes reported as they are; any other code, and every message, is the server's
text and is not repeated."""
MAX_ATTRIBUTES = 10
"""Message attributes SQS accepts on one message."""
POLL_SECONDS = 20
"""Long polling: the longest ``WaitTimeSeconds`` SQS allows."""


@dataclass
class SQSHandle:
    delivery: Delivery
    message_id: str
    received_at: float
    """``time.monotonic()`` of the receive that started SQS's 12-hour clock."""
    renewed_at: float = 0.0
    stale: bool = False
    """SQS no longer knows this receipt (a renewal failed): it is visible again."""


@dataclass
class _InHand:
    receipt: str
    handle: SQSHandle
    group_id: str | None = None
    dedup_id: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    handed_out: bool = False
    """Given to the dispatcher (FIFO: only a message group's oldest in hand is)."""


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _short(exc: BaseException) -> str:
    """An SQS failure in jobrunner's words: the HTTP status and SQS's error code when it
    is one of SQS's own, else the class and errno (jobrunner.core.redaction) — never the
    answer's message (the endpoint is the ScaledJob author's to choose)."""
    if isinstance(exc, ClientError):
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = known_code(_error_code(exc), _CODES)
        words = [f"HTTP {status}" if isinstance(status, int) else "", code or ""]
        return " ".join(w for w in words if w) or type(exc).__name__
    return describe_error(exc)


def _queue_name_of(url: str) -> str:
    """A queue URL's last part when it is an SQS queue name, for logs (the URL came from
    the server's answer)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,80}(\.fifo)?", name) else "<not a queue name>"


def _attribute_text(value: Mapping[str, Any]) -> str:
    if "StringValue" in value:
        return str(value["StringValue"])
    if "BinaryValue" in value:
        return base64.b64encode(value["BinaryValue"]).decode()
    return ""


class SQSSource:
    name = "aws-sqs-queue"

    def __init__(
        self,
        *,
        trigger: SQSTrigger,
        max_in_hand: int,
        dead_letter_queue: str | None = None,
        scaledjob: str = "",
    ) -> None:
        self._trigger = trigger
        self._max_in_hand = max_in_hand
        self._dead_letter_setting = dead_letter_queue
        self._scaledjob = scaledjob
        self._stack = contextlib.AsyncExitStack()
        self._client: SQSClient | None = None
        self.queue_url = ""
        self.dead_letter_url = ""
        self.fifo = False
        self._visibility = 30
        self._incoming: asyncio.Queue[SQSHandle] = asyncio.Queue()
        self._in_hand: dict[str, _InHand] = {}
        self._group_head: dict[str, str] = {}
        """FIFO: message group -> the message id handed out (its Job runs now)."""
        self._group_waiting: dict[str, collections.deque[str]] = {}
        """FIFO: message group -> message ids in hand waiting their turn, in order."""
        self._slot_freed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._stopping = False

    @property
    def where(self) -> str:
        if self._trigger.endpoint:
            return f"SQS at {address(self._trigger.endpoint)}"
        return f"SQS in {self._trigger.region}"

    @property
    def hold_limit_seconds(self) -> float | None:
        return SQS_HOLD_CAP_SECONDS

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        t = self._trigger
        session = get_session()
        config = AioConfig(
            connect_timeout=5, read_timeout=POLL_SECONDS + 10, retries={"max_attempts": 2}
        )
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "sqs",
                region_name=t.region,
                endpoint_url=t.endpoint,
                aws_access_key_id=t.access_key_id,
                aws_secret_access_key=t.secret_access_key,
                aws_session_token=t.session_token,
                config=config,
            )
        )
        try:
            await self._discover()
        except NoCredentialsError as exc:
            raise SourceError(
                f"{self.where}: no AWS credentials ({_short(exc)}); give awsAccessKeyID and "
                "awsSecretAccessKey in the TriggerAuthentication, or pod identity"
            ) from None
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING_QUEUE:
                raise SourceError(
                    f"{self.where}: queue {t.queue_name} does not exist; create it "
                    f"(aws sqs create-queue --queue-name {t.queue_name}) or fix queueURL"
                ) from None
            if code in _REFUSED:
                raise SourceError(
                    f"{self.where}: credentials refused for queue {t.queue_name} ({code}); "
                    "check the TriggerAuthentication's keys and the queue's policy"
                ) from None
            raise SourceError(f"{self.where}: queue {t.queue_name}: {_short(exc)}") from None
        except (BotoCoreError, OSError) as exc:
            raise SourceUnreachable(f"{self.where} is not reachable ({_short(exc)})") from None
        self._connected = True
        self._stopping = False
        self._tasks = [
            start_guarded(
                self._receive_loop(), name=f"sqs-receive-{t.queue_name}", long_lived=False
            ),
            start_guarded(self._renew_loop(), name=f"sqs-renew-{t.queue_name}"),
        ]
        logger.info(
            "SQS queue %s (%s, visibility %ss); dead letters to %s",
            t.queue_name,
            "FIFO" if self.fifo else "standard",
            self._visibility,
            _queue_name_of(self.dead_letter_url),
        )

    async def _discover(self) -> None:
        assert self._client is not None
        t = self._trigger
        if "://" in t.queue:
            self.queue_url = t.queue
        else:
            self.queue_url = (await self._client.get_queue_url(QueueName=t.queue))["QueueUrl"]
        attributes = (
            await self._client.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["All"])
        ).get("Attributes", {})
        self.fifo = attributes.get("FifoQueue") == "true" or t.queue_name.endswith(".fifo")
        self._visibility = t.visibility_timeout or int(attributes.get("VisibilityTimeout", 30))
        self.dead_letter_url = await self._dead_letter_queue(attributes.get("RedrivePolicy"))

    async def _dead_letter_queue(self, redrive: str | None) -> str:
        """The dead-letter queue's URL: the configured one, the redrive policy's target,
        or ``<queue>-dead-letter`` (created when missing)."""
        assert self._client is not None
        name = self._dead_letter_setting
        if name and "://" in name:
            return name
        if not name and redrive:
            arn = str(json.loads(redrive).get("deadLetterTargetArn", ""))
            name = arn.rsplit(":", 1)[-1] or None
        if name:
            return (await self._client.get_queue_url(QueueName=name))["QueueUrl"]
        base = self._trigger.queue_name.removesuffix(".fifo")
        name = f"{base}-dead-letter" + (".fifo" if self.fifo else "")
        if self.fifo:
            created = await self._client.create_queue(
                QueueName=name, Attributes={"FifoQueue": "true"}
            )
        else:
            created = await self._client.create_queue(QueueName=name)
        return created["QueueUrl"]

    async def close(self) -> None:
        await self._stop_tasks()
        self._connected = False
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        self._client = None

    async def _stop_tasks(self) -> None:
        await stop_tasks(self._tasks, grace=0)
        self._tasks = []

    async def stop_consuming(self) -> None:
        # A poll cancelled mid-way may have hidden messages it never returned: they are
        # visible again after the queue's visibility timeout. The renewer keeps running
        # for the messages in hand.
        self._stopping = True
        if self._tasks:
            self._tasks[0].cancel()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._connected

    # ------------------------------------------------------------------ receive
    async def deliveries(self) -> AsyncIterator[SQSHandle]:
        while True:
            yield await self._incoming.get()

    async def _receive_loop(self) -> None:
        assert self._client is not None
        delay = 0.5
        while not self._stopping:
            free = self._max_in_hand - len(self._in_hand)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                answer = await self._client.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=min(10, free),
                    WaitTimeSeconds=POLL_SECONDS,
                    VisibilityTimeout=self._visibility,
                    MessageSystemAttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
            except (ClientError, BotoCoreError, OSError) as exc:
                self._connected = False
                logger.warning(
                    "%s: receiving failed (%s); retrying in %.1fs", self.where, _short(exc), delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._connected, delay = True, 0.5
            for message in answer.get("Messages", []):
                self._accept(dict(message))

    def _accept(self, message: dict[str, Any]) -> None:
        system = message.get("Attributes", {})
        attributes = dict(message.get("MessageAttributes", {}))
        message_id = str(message["MessageId"])
        now = time.monotonic()
        known = self._in_hand.get(message_id)
        if known is not None:
            # Visible again while in hand (a renewal came too late): keep the newest
            # receipt, which alone deletes reliably; the dispatcher joins the delivery.
            known.receipt = message["ReceiptHandle"]
            known.handle.stale = False
            known.handle.received_at = now  # a new receive starts a new 12-hour clock
            if not known.handed_out:
                return  # still waiting its turn in its message group
        dedup = system.get("MessageDeduplicationId")
        group = system.get("MessageGroupId")
        sent = system.get("SentTimestamp")
        count = int(system.get("ApproximateReceiveCount", "1"))
        delivery = Delivery(
            source=self.name,
            identity=(dedup if self.fifo and dedup else message_id),
            body=str(message.get("Body", "")).encode(),
            message_id=message_id,
            headers={k: _attribute_text(v) for k, v in attributes.items()},
            redelivered=count > 1,
            delivery_count=max(1, count),
            metadata={
                "queue": self._trigger.queue_name,
                "queue_url": self.queue_url,
                "message_group_id": group or "",
                "deduplication_id": dedup or "",
                "receive_count": str(count),
            },
            received_at=now,
            published_at=int(sent) / 1000 if sent else None,
            # A standard queue's message id names one send; a FIFO deduplication id can
            # be reused by a later send, so only a redelivery adopts a finished Job.
            positional=not self.fifo,
        )
        handle = SQSHandle(delivery, message_id, received_at=now, renewed_at=now)
        if known is None:
            item = _InHand(message["ReceiptHandle"], handle, group, dedup, attributes)
            self._in_hand[message_id] = item
            if self.fifo and group:
                # SQS may return several messages of one group in one receive (and then
                # none of that group until they are deleted): hand them out one at a
                # time, in order, so a group's Jobs run one after another.
                if group in self._group_head:
                    self._group_waiting.setdefault(group, collections.deque()).append(message_id)
                    return
                self._group_head[group] = message_id
            item.handed_out = True
        self._incoming.put_nowait(handle)

    def _next_in_group(self, group: str) -> None:
        waiting = self._group_waiting.get(group)
        while waiting:
            item = self._in_hand.get(waiting.popleft())
            if item is not None:
                self._group_head[group] = item.handle.message_id
                item.handed_out = True
                self._incoming.put_nowait(item.handle)
                break
        if not waiting:
            self._group_waiting.pop(group, None)

    def _take_waiting(self, group: str | None) -> list[_InHand]:
        """FIFO: the messages of ``group`` waiting their turn, no longer held."""
        taken = []
        for message_id in self._group_waiting.pop(group or "", ()):
            item = self._in_hand.pop(message_id, None)
            if item is not None:
                taken.append(item)
        if taken:
            self._slot_freed.set()
        return taken

    # ------------------------------------------------------------------ keep alive
    async def _renew_loop(self) -> None:
        """Renews the visibility of every message in hand a third of the way into it."""
        period = max(1.0, self._visibility / 3)
        while True:
            await asyncio.sleep(min(period, 10.0))
            now = time.monotonic()
            due = [
                item
                for item in self._in_hand.values()
                if now - item.handle.renewed_at >= period and not item.handle.stale
            ]
            for start in range(0, len(due), 10):
                await self._renew(due[start : start + 10], now)

    async def _renew(self, batch: list[_InHand], now: float) -> None:
        assert self._client is not None
        entries: list[ChangeMessageVisibilityBatchRequestEntryTypeDef] = []
        for i, item in enumerate(batch):
            left = SQS_HOLD_CAP_SECONDS - (now - item.handle.received_at)
            if left < 1:
                continue  # SQS's 12-hour cap: it will be visible again (and adopt its Job)
            timeout = int(min(self._visibility, left))
            entries.append(
                {"Id": str(i), "ReceiptHandle": item.receipt, "VisibilityTimeout": timeout}
            )
        if not entries:
            return
        try:
            answer = await self._client.change_message_visibility_batch(
                QueueUrl=self.queue_url, Entries=entries
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            self._connected = False
            logger.warning(
                "%s: renewing visibility failed (%s); will retry", self.where, _short(exc)
            )
            return
        self._connected = True
        for ok in answer.get("Successful", []):
            batch[int(ok["Id"])].handle.renewed_at = now
        for failed in answer.get("Failed", []):
            item = batch[int(failed["Id"])]
            item.handle.stale = True
            logger.warning(
                "message %s: visibility could not be renewed (%s); SQS will deliver it again "
                "and it will adopt its Job",
                item.handle.delivery.identity,
                known_code(failed.get("Code"), _CODES) or "an error code",
            )

    # ------------------------------------------------------------------ settle
    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, SQSHandle):
            raise TypeError(f"not an SQS message: {handle!r}")
        item = self._in_hand.get(handle.message_id)
        if item is None:
            return False  # settled already through a newer delivery
        assert self._client is not None
        try:
            if decision.action is Action.REQUEUE:
                # FIFO: the group's later messages go back with it, or they would run
                # before it.
                later = self._take_waiting(item.group_id if self.fifo else None)
                for released in [item, *later]:
                    await self._client.change_message_visibility(
                        QueueUrl=self.queue_url,
                        ReceiptHandle=released.receipt,
                        VisibilityTimeout=0,
                    )
            else:
                if decision.action is Action.DEAD_LETTER:
                    await self._send_dead_letter(
                        body=handle.delivery.body.decode(),
                        attributes=item.attributes,
                        message_id=handle.message_id,
                        group_id=item.group_id,
                        dedup_id=item.dedup_id,
                        decision=decision,
                    )
                await self._client.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=item.receipt
                )
        except ClientError as exc:
            if _error_code(exc) not in _GONE:
                raise
            logger.warning(
                "message %s could not be settled (%s): SQS will deliver it again",
                handle.delivery.identity,
                _short(exc),
            )
            self._release(handle.message_id)
            return False
        except (BotoCoreError, OSError) as exc:
            logger.warning(
                "message %s could not be settled (%s): SQS will deliver it again",
                handle.delivery.identity,
                _short(exc),
            )
            self._release(handle.message_id)
            return False
        self._release(handle.message_id)
        return True

    def _release(self, message_id: str) -> None:
        item = self._in_hand.pop(message_id, None)
        if item is None:
            return
        self._slot_freed.set()
        group = item.group_id
        if group and self._group_head.get(group) == message_id:
            del self._group_head[group]
            self._next_in_group(group)

    def is_durable(self, handle: MessageHandle) -> bool:
        return True  # a delete SQS answered is final

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        metadata = original.get("metadata") or {}
        headers = original.get("headers") or {}
        await self._send_dead_letter(
            body=bytes(original["body"]).decode(errors="replace"),
            attributes={
                str(k): {"DataType": "String", "StringValue": str(v)} for k, v in headers.items()
            },
            message_id=str(original.get("message_id") or ""),
            group_id=metadata.get("message_group_id") or None,
            dedup_id=metadata.get("deduplication_id") or None,
            decision=decision,
        )

    async def _send_dead_letter(
        self,
        *,
        body: str,
        attributes: Mapping[str, Any],
        message_id: str,
        group_id: str | None,
        dedup_id: str | None,
        decision: Decision,
    ) -> None:
        assert self._client is not None
        ours = decision.reason_headers(
            source_queue=self._trigger.queue_name, source_message_id=message_id
        )
        ours["x-jobrunner-scaledjob"] = self._scaledjob
        ours = {k: v for k, v in ours.items() if v}
        merged: dict[str, Any] = {
            k: {"DataType": "String", "StringValue": v} for k, v in ours.items()
        }
        originals = {k: v for k, v in attributes.items() if not k.startswith("x-jobrunner-")}
        if len(merged) + len(originals) <= MAX_ATTRIBUTES:
            merged.update(originals)
        elif originals:
            merged["x-jobrunner-original-attributes"] = {
                "DataType": "String",
                "StringValue": json.dumps({k: _attribute_text(v) for k, v in originals.items()}),
            }
        request: dict[str, Any] = {
            "QueueUrl": self.dead_letter_url,
            "MessageBody": body,
            "MessageAttributes": merged,
        }
        if self.dead_letter_url.endswith(".fifo"):
            # Same group (order kept), same deduplication id: a dead letter sent again
            # after a crash within SQS's 5-minute window is stored once.
            request["MessageGroupId"] = group_id or "jobrunner"
            request["MessageDeduplicationId"] = dedup_id or message_id
        await self._client.send_message(**request)

    # ------------------------------------------------------------------ observability
    async def depth(self) -> int | None:
        if self._client is None:
            return None
        try:
            answer = await self._client.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
            )
        except (ClientError, BotoCoreError, OSError):
            return None
        return int(answer.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))


def open_source(trigger: SQSTrigger, *, scaledjob: ScaledJob, settings: Settings) -> SQSSource:
    """The source for a resolved ``aws-sqs-queue`` trigger (see jobrunner.manifest.triggers.sqs)."""
    return SQSSource(
        trigger=trigger,
        max_in_hand=scaledjob.spec.maxReplicaCount,
        dead_letter_queue=scaledjob.spec.deadLetter.queue,
        scaledjob=scaledjob.name,
    )
