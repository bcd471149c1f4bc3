"""Redis Streams source on redis-py (asyncio): one consumer of a consumer group per
dispatcher process, XACK only once the outcome is durable.

Rules, from the Redis streams documentation (XREADGROUP, XCLAIM, XAUTOCLAIM):

* An entry read with ``XREADGROUP ... >`` stays in the group's pending entries list (PEL),
  owned by this consumer, until XACK. Nothing in Redis redelivers it by itself.
* A dispatcher that dies leaves its entries pending. Every live dispatcher runs
  ``XAUTOCLAIM`` with ``claimMinIdleSeconds`` (default 60 s): entries idle that long
  change owner and come back as redeliveries, adopting the Jobs they already have.
* So the live owner must never look idle: every quarter of that time it resets the idle
  time of each entry it holds (``XCLAIM <id> ... 0 JUSTID`` to itself, in a Lua script
  that first checks it still owns the entry, so a heartbeat never takes an entry back
  from a dispatcher that claimed it). A Job may therefore run for hours without being
  claimed, and an entry of a dead dispatcher waits at most about ``claimMinIdleSeconds``.
* The identity is the stream entry id, which names one XADD: positional, like a Kafka
  offset.
* The body is the entry's ``body`` field when it has one (the other fields are headers);
  otherwise it is the JSON object of all its fields, so a template reads
  ``message.json.<field>``.
* A dead letter is an XADD to the dead-letter stream (the original fields plus
  ``x-jobrunner-*`` reason fields and ``x-jobrunner-source-id``) in one MULTI/EXEC with
  the XACK: both happen or neither.
* Consumers that have held nothing for ten times ``claimMinIdleSeconds`` are deleted
  from the group (dispatchers are named per process, so dead ones would pile up).

Durability of an XACK or a dead letter is Redis's: with ``appendfsync always`` (the local
stack) a write that returned survives a crash; with Redis's defaults the last second or
snapshot interval can be lost, and a lost XACK means a redelivery that adopts its Job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeout

from jobrunner.core.models import Action, Decision, Delivery
from jobrunner.core.protocols import MessageHandle, SourceError, SourceUnreachable
from jobrunner.core.redaction import address, describe_error, known_code
from jobrunner.core.settings import Settings
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.redis_streams import RedisStreamsTrigger

logger = logging.getLogger(__name__)

_DOWN = (RedisConnectionError, RedisTimeout, OSError)
REDIS_ERROR_CODES = frozenset(
    {
        # The first word of Redis's error replies (redis.io "Redis serialization
        # protocol", and the server's own: errors.h, t_stream.c, acl.c).
        "ERR",
        "WRONGTYPE",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
        "NOGROUP",
        "BUSYGROUP",
        "NOSCRIPT",
        "BUSY",
        "LOADING",
        "READONLY",
        "MASTERDOWN",
        "MISCONF",
        "OOM",
        "EXECABORT",
        "NOREPLICAS",
        "NOPROTO",
        "CROSSSLOT",
        "CLUSTERDOWN",
        "MOVED",
        "ASK",
        "TRYAGAIN",
        "UNKILLABLE",
    }
)
"""Error codes reported as they are; the rest of an error reply is the server's text."""


def _short(exc: BaseException) -> str:
    """A Redis failure in jobrunner's words: an error reply by its code (``NOGROUP``),
    anything else by class and errno (jobrunner.core.redaction) — never the reply's text, nor
    what a server that is not Redis answered (redis-py quotes it in a protocol error)."""
    if isinstance(exc, ResponseError):
        words = str(exc).split(maxsplit=1)
        code = known_code(words[0] if words else "", REDIS_ERROR_CODES)
        return f"{type(exc).__name__} {code}" if code else type(exc).__name__
    return describe_error(exc)


# KEYS[1] stream; ARGV: group, consumer, ids... Resets the idle time of each id this
# consumer still owns; returns the ids it no longer owns.
_HEARTBEAT = """
local lost = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if entry[1] and entry[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""


@dataclass
class RedisHandle:
    delivery: Delivery
    entry_id: str
    fields: dict[str, str]


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class RedisStreamsSource:
    name = "redis-streams"

    def __init__(
        self,
        *,
        trigger: RedisStreamsTrigger,
        max_in_hand: int,
        dead_letter_stream: str,
        scaledjob: str = "",
        consumer: str | None = None,
    ) -> None:
        self._trigger = trigger
        self.stream = trigger.stream
        self.group = trigger.group
        # One consumer per process: a restarted dispatcher never mistakes a dead one's
        # entries for its own; they are claimed once idle.
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.dead_letter_stream = dead_letter_stream
        self._max_in_hand = max_in_hand
        self._scaledjob = scaledjob
        self._min_idle = trigger.claim_min_idle
        self._redis: aioredis.Redis | None = None
        self._in_hand: dict[str, RedisHandle] = {}
        self._incoming: asyncio.Queue[RedisHandle] = asyncio.Queue()
        self._slot_freed = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._connected = False
        self._stopping = False

    @property
    def where(self) -> str:
        return f"Redis at {address(self._trigger.address)}"

    @property
    def hold_limit_seconds(self) -> float | None:
        return None  # the heartbeat keeps an entry ours for as long as its Job runs

    @property
    def heartbeat_seconds(self) -> float:
        return self._min_idle / 4

    # ------------------------------------------------------------------ lifecycle
    def _client(self) -> aioredis.Redis:
        t = self._trigger
        options: dict[str, Any] = {}
        if t.tls:
            options["ssl"] = True
            options["ssl_ca_data"] = t.ca or None
            if t.unsafe_ssl:
                options["ssl_cert_reqs"] = ssl.CERT_NONE
                options["ssl_check_hostname"] = False
        return aioredis.Redis(
            host=t.host,
            port=t.port,
            db=t.database,
            username=t.username,
            password=t.password,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=15,
            **options,
        )

    async def start(self) -> None:
        self._redis = self._client()
        try:
            groups = await self._redis.xinfo_groups(self.stream)
        except AuthenticationError as exc:
            raise SourceError(
                f"{self.where}: credentials refused ({_short(exc)}); check the username and "
                "password of the TriggerAuthentication"
            ) from None
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                raise SourceError(
                    f"{self.where}: stream {self.stream!r} does not exist; create it with its "
                    f"group: XGROUP CREATE {self.stream} {self.group} $ MKSTREAM"
                ) from None
            if "noauth" in str(exc).lower() or "wrongpass" in str(exc).lower():
                raise SourceError(
                    f"{self.where}: credentials refused ({_short(exc)}); check the "
                    "TriggerAuthentication"
                ) from None
            raise SourceError(f"{self.where}: stream {self.stream!r}: {_short(exc)}") from None
        except _DOWN as exc:
            raise SourceUnreachable(f"{self.where} is not reachable ({_short(exc)})") from None
        except RedisError as exc:
            # A server that does not speak Redis (an HTTP service, say): redis-py's
            # protocol error quotes what it answered, so only the class is said.
            raise SourceError(
                f"{self.where} did not answer as Redis does ({_short(exc)}); is it a Redis server?"
            ) from None
        if not any(_text(g.get("name")) == self.group for g in groups):
            raise SourceError(
                f"{self.where}: stream {self.stream!r} has no consumer group {self.group!r}; "
                f"create it: XGROUP CREATE {self.stream} {self.group} $ (or 0 to read the "
                "stream from its start)"
            )
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._connected = True
        self._stopping = False
        self._tasks = [
            start_guarded(self._read_loop(), name=f"redis-read-{self.stream}", long_lived=False),
            start_guarded(self._heartbeat_loop(), name=f"redis-heartbeat-{self.stream}"),
        ]
        logger.info(
            "Redis stream %s, group %s, consumer %s: claims entries idle %.0fs, heartbeat "
            "every %.1fs; dead letters to stream %s",
            self.stream,
            self.group,
            self.consumer,
            self._min_idle,
            self.heartbeat_seconds,
            self.dead_letter_stream,
        )

    async def stop_consuming(self) -> None:
        self._stopping = True
        if self._tasks:
            self._tasks[0].cancel()

    async def close(self) -> None:
        await stop_tasks(self._tasks, grace=0)
        self._tasks = []
        self._connected = False
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def connected(self) -> bool:
        return self._redis is not None and self._connected

    # ------------------------------------------------------------------ receive
    async def deliveries(self) -> AsyncIterator[RedisHandle]:
        while True:
            yield await self._incoming.get()

    async def _read_loop(self) -> None:
        """New entries (``>``) while slots are free; and, every heartbeat, entries of
        dead consumers idle past ``claimMinIdleSeconds`` (XAUTOCLAIM)."""
        assert self._redis is not None
        delay, next_claim = 0.5, 0.0
        block_ms = int(min(2.0, self.heartbeat_seconds) * 1000)
        while not self._stopping:
            free = self._max_in_hand - len(self._in_hand)
            if free <= 0:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), timeout=self.heartbeat_seconds)
                continue
            try:
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.heartbeat_seconds
                    free -= await self._claim(free)
                    if free <= 0:
                        continue
                answer: Any = await self._redis.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=free, block=block_ms
                )
            except _DOWN as exc:
                self._connected = False
                logger.warning(
                    "%s: reading failed (%s); retrying in %.1fs", self.where, _short(exc), delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            except RedisError as exc:
                # ResponseError: the group or stream was deleted under us; any other
                # (a protocol error): the server answered what Redis would not.
                self._connected = False
                logger.error(
                    "%s: stream %s: %s; retrying in 5s", self.where, self.stream, _short(exc)
                )
                await asyncio.sleep(5)
                continue
            self._connected, delay = True, 0.5
            for _stream, entries in answer or []:
                for entry_id, fields in entries:
                    self._accept(_text(entry_id), fields, redelivered=False, deliveries=1)

    async def _claim(self, count: int) -> int:
        assert self._redis is not None
        claimed = 0
        start = "0-0"
        while claimed < count:
            answer = await self._redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=int(self._min_idle * 1000),
                start_id=start,
                count=count - claimed,
            )
            start, entries = _text(answer[0]), answer[1]
            for entry_id, fields in entries:
                if fields is None:
                    continue
                claimed += 1
                logger.info(
                    "claimed entry %s of stream %s from a consumer idle %.0fs or more",
                    _text(entry_id),
                    self.stream,
                    self._min_idle,
                )
                self._accept(
                    _text(entry_id),
                    fields,
                    redelivered=True,
                    deliveries=await self._times_delivered(_text(entry_id)),
                )
            if len(answer) > 2 and answer[2]:
                logger.warning(
                    "stream %s: pending entries %s were trimmed from the stream before they "
                    "were settled; Redis dropped them from the group",
                    self.stream,
                    [_text(i) for i in answer[2]],
                )
            if start == "0-0":
                break
        if claimed == 0:
            await self._forget_idle_consumers()
        return claimed

    async def _times_delivered(self, entry_id: str) -> int:
        """The group's delivery counter of a pending entry (XPENDING's fourth field,
        which XREADGROUP and XAUTOCLAIM raise and the heartbeat's ``JUSTID`` claims
        leave alone); 2 when the server does not say (it was claimed, so delivered
        twice at least)."""
        assert self._redis is not None
        rows = await self._redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        for row in rows or []:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                return max(1, int(row["times_delivered"]))
        return 2

    async def _forget_idle_consumers(self) -> None:
        assert self._redis is not None
        for info in await self._redis.xinfo_consumers(self.stream, self.group):
            name = _text(info.get("name"))
            if (
                name != self.consumer
                and int(info.get("pending", 0)) == 0
                and int(info.get("idle", 0)) > self._min_idle * 10_000
            ):
                await self._redis.xgroup_delconsumer(self.stream, self.group, name)

    def _accept(
        self, entry_id: str, raw: Mapping[Any, Any], *, redelivered: bool, deliveries: int
    ) -> None:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if "body" in fields:
            body_raw = raw.get(b"body", raw.get("body"))
            body = body_raw if isinstance(body_raw, bytes) else fields["body"].encode()
            headers = {k: v for k, v in fields.items() if k != "body"}
        else:
            body = json.dumps(fields).encode()
            headers = {}
        millis = entry_id.split("-", 1)[0]
        delivery = Delivery(
            source=self.name,
            identity=f"{self.stream}/{entry_id}",
            body=body,
            message_id=entry_id,
            headers=headers,
            redelivered=redelivered,
            delivery_count=deliveries,
            metadata={"stream": self.stream, "group": self.group, "entry_id": entry_id},
            received_at=time.monotonic(),
            published_at=int(millis) / 1000 if millis.isdigit() else None,
            positional=True,
        )
        handle = RedisHandle(delivery, entry_id, fields)
        self._in_hand[entry_id] = handle
        self._incoming.put_nowait(handle)

    # ------------------------------------------------------------------ keep alive
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            ids = list(self._in_hand)
            if not ids or self._redis is None:
                continue
            try:
                lost = await self._heartbeat(
                    keys=[self.stream], args=[self.group, self.consumer, *ids]
                )
            except (*_DOWN, ResponseError) as exc:
                logger.warning("%s: heartbeat failed (%s); will retry", self.where, _short(exc))
                continue
            for entry_id in lost or []:
                logger.warning(
                    "entry %s of stream %s is no longer this consumer's (claimed elsewhere or "
                    "acked); its new owner adopts the Job",
                    _text(entry_id),
                    self.stream,
                )

    # ------------------------------------------------------------------ settle
    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, RedisHandle):
            raise TypeError(f"not a Redis stream entry: {handle!r}")
        assert self._redis is not None
        try:
            if decision.action is Action.REQUEUE:
                # No nack in Redis: stop heartbeating it, so it is claimed again (by any
                # dispatcher, this one included) once idle past claimMinIdleSeconds.
                self._release(handle.entry_id)
                return True
            async with self._redis.pipeline(transaction=True) as pipe:
                if decision.action is Action.DEAD_LETTER:
                    fields = self._dead_fields(handle.fields, handle.entry_id, decision)
                    pipe.xadd(self.dead_letter_stream, fields)  # type: ignore[arg-type]
                pipe.xack(self.stream, self.group, handle.entry_id)
                await pipe.execute()
        except _DOWN as exc:
            logger.warning(
                "entry %s could not be settled (%s): it stays pending and adopts its Job when "
                "claimed again",
                handle.entry_id,
                _short(exc),
            )
            self._release(handle.entry_id)
            return False
        self._release(handle.entry_id)
        return True

    def _dead_fields(
        self, fields: Mapping[str, str], entry_id: str, decision: Decision
    ) -> dict[str, str]:
        out = {k: v for k, v in fields.items() if not k.startswith("x-jobrunner-")}
        out.update(
            decision.reason_headers(
                source_stream=self.stream, source_id=entry_id, scaledjob=self._scaledjob
            )
        )
        return out

    def _release(self, entry_id: str) -> None:
        if self._in_hand.pop(entry_id, None) is not None:
            self._slot_freed.set()

    def is_durable(self, handle: MessageHandle) -> bool:
        return True  # an XACK that returned is Redis's to keep (see the module docstring)

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        assert self._redis is not None
        metadata = original.get("metadata") or {}
        headers = dict(original.get("headers") or {})
        body = bytes(original["body"])
        fields = {**headers, "body": body.decode("utf-8", errors="replace")}
        entry_id = str(metadata.get("entry_id") or "")
        dead = self._dead_fields(fields, entry_id, decision)
        await self._redis.xadd(self.dead_letter_stream, dead)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ observability
    async def depth(self) -> int | None:
        """Entries not yet delivered to the group (its ``lag``, Redis 7), else None."""
        if self._redis is None:
            return None
        try:
            groups = await self._redis.xinfo_groups(self.stream)
        except (*_DOWN, RedisError):
            return None
        for group in groups:
            if _text(group.get("name")) == self.group and group.get("lag") is not None:
                return int(group["lag"])
        return None


def open_source(
    trigger: RedisStreamsTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> RedisStreamsSource:
    """The source for a resolved ``redis-streams`` trigger."""
    return RedisStreamsSource(
        trigger=trigger,
        max_in_hand=scaledjob.spec.maxReplicaCount,
        dead_letter_stream=scaledjob.spec.deadLetter.stream or f"{trigger.stream}.dead-letter",
        scaledjob=scaledjob.name,
    )
