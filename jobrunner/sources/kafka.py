"""Kafka source on aiokafka: each record is a message whose identity is
(topic, partition, offset), so a replayed record finds the Job it already has.

* Commits only what is finished: per partition the committed offset is the lowest record
  still in hand (``kafka_offsets``), so a crash never skips unfinished work; records that
  finished after the last commit are replayed after a restart and adopt their Jobs
  (whose names come from the offsets) instead of running again.
* Backpressure without eviction: when ``max_in_hand`` records are in hand, every assigned
  partition is paused while ``getmany`` keeps polling, so hours-long Jobs never trip
  ``max.poll.interval.ms``.
* Rebalances: on revocation the partitions' watermarks are committed and their records
  are no longer settled here (the new owner replays and adopts them); on assignment
  consumption resumes from the committed offset.
* Dead letters go to a topic, with the reason in headers, in one Kafka transaction with
  the offset commit that settles their record (KIP-98, aiokafka's
  ``send_offsets_to_transaction``): a crash leaves either both or neither, so a replay
  never dead-letters a record twice. The transactional id is the partition's
  (``jobrunner.<group>.<topic>.<partition>``): a new owner of the partition opens its
  producer before reading the committed offset, which fences the previous owner and ends
  any transaction it left open (aborted, or committed if it was being committed), so the
  offset read is final. Consumers of the dead-letter topic must read committed
  (``isolation.level=read_committed``) to see each dead letter once.
* A function's outputs to Kafka topics on the same cluster, with the same credentials
  (``carries``), go in the same transaction as the offset commit of the record that
  ran the function (jobrunner.dispatch.outputs), so they too are published exactly once.
* The consumer reads ``read_committed``: a record of an aborted transaction (a
  function's output whose dispatcher died before the commit) is no message.
* Records settled above the committed offset (out of order) are named in the commit's
  metadata and skipped by a resumed consumer (``kafka_offsets``).
* Optional per-key ordering: a record is handed out only once the previous record with
  the same key has been settled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, ProducerFenced

from jobrunner.core.deadletters import DeadLetter, replay_headers
from jobrunner.core.failpoints import Failpoints
from jobrunner.core.models import Action, Decision, Delivery, Reply, ReplyAddress
from jobrunner.core.protocols import MessageHandle, MessageSink, ReplyRefused, SourceUnreachable
from jobrunner.core.redaction import addresses, describe_error
from jobrunner.core.settings import Settings
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.kafka import SASL_MECHANISMS, KafkaTrigger, topic_allowed
from jobrunner.sources.kafka_offsets import Mark, PartitionOffsets, decode_done

logger = logging.getLogger(__name__)


TRANSACTION_TRIES = 5
"""Tries of a settle transaction that meets a retriable Kafka error (about 8 s of
backoff in all) before the error is raised and the record left in hand."""


REPLY_TOPIC_HEADERS = ("reply-topic", "kafka_replyTopic")
CORRELATION_HEADERS = ("correlation-id", "kafka_correlationId")


def _short(exc: BaseException) -> str:
    """A Kafka failure in jobrunner's words: aiokafka's error class, which is the Kafka
    error's name (``TopicAuthorizationFailedError``), with the errno when the chain
    has one (jobrunner.core.redaction) — never the text, which may quote a broker's answer."""
    return describe_error(exc)


@dataclass
class KafkaHandle:
    delivery: Delivery
    partition: TopicPartition
    offset: int
    key: bytes | None
    generation: int
    """Assignment generation it was read in; a settle from an older one is stale."""


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace") if value is not None else ""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._source._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._source._assigned(set(assigned))


class KafkaSource:
    name = "kafka"

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        offset_reset: str = "latest",
        max_in_hand: int,
        dead_letter_topic: str,
        per_key_ordering: bool = False,
        client_options: Mapping[str, Any] | None = None,
        consumer_options: Mapping[str, Any] | None = None,
        scaledjob: str = "",
        failpoints: Failpoints | None = None,
        connection: tuple[str, ...] | None = None,
        reply_topics: tuple[str, ...] = (),
    ) -> None:
        self._servers = bootstrap_servers
        self.reply_topics = reply_topics
        """The trigger's ``replyTopics``: the only topics a reply may go to."""
        self.topic = topic
        self._failpoints = failpoints or Failpoints()
        self._connection = connection
        """The cluster and credentials (``connection_of``): outputs are carried only to
        a sink with the same ones."""
        self._group = group_id
        self._reset = offset_reset
        self._max_in_hand = max_in_hand
        self.dead_letter_topic = dead_letter_topic
        self._per_key = per_key_ordering
        self._options = dict(client_options or {})
        self._consumer_options = dict(consumer_options or {})
        self._scaledjob = scaledjob
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        """Idempotent, not transactional: dead letters of records already acked."""
        self._transactional: dict[TopicPartition, AIOKafkaProducer] = {}
        """One transactional producer per assigned partition: its dead letters."""
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._generation = 0
        self._busy_keys: set[tuple[TopicPartition, bytes]] = set()
        self._waiting: dict[tuple[TopicPartition, bytes], collections.deque[KafkaHandle]] = {}
        self._ready: collections.deque[KafkaHandle] = collections.deque()
        self._wakeup = asyncio.Event()
        self._paused = False
        self._stopped = False
        self._commit_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        try:
            await self._start()
        except KafkaError as exc:
            raise SourceUnreachable(f"Kafka at {addresses(self._servers)}: {_short(exc)}") from exc

    async def _start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._servers, acks="all", enable_idempotence=True, **self._options
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._servers,
            group_id=self._group,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset=self._reset,
            max_poll_records=max(1, min(500, self._max_in_hand)),
            **self._consumer_options,
            **self._options,
        )
        self._consumer.subscribe([self.topic], listener=_Listener(self))
        await self._consumer.start()

    @property
    def target(self) -> str:
        return f"topic {self.dead_letter_topic!r}"

    @property
    def connected(self) -> bool:
        return self._consumer is not None and not self._stopped

    async def close(self) -> None:
        self._stopped = True
        if self._consumer is not None:
            try:
                await self._commit_ready()
            except KafkaError as exc:
                logger.warning(
                    "final commit failed (%s); unfinished records will be replayed", _short(exc)
                )
            await self._consumer.stop()
        await self._close_transactional(set(self._transactional))
        if self._producer is not None:
            await self._producer.stop()

    async def stop_consuming(self) -> None:
        self._stopped = True
        if self._consumer is not None and self._offsets:
            self._consumer.pause(*self._offsets)

    # ------------------------------------------------------------------ rebalances
    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:  # the first join revokes nothing
            return
        self._generation += 1
        await self._commit_ready(only=revoked)
        for tp in revoked:
            self._offsets.pop(tp, None)
        self._ready = collections.deque(h for h in self._ready if h.partition not in revoked)
        for key in [k for k in self._waiting if k[0] in revoked]:
            del self._waiting[key]
        self._busy_keys = {k for k in self._busy_keys if k[0] not in revoked}
        await self._close_transactional(revoked)
        logger.info(
            "partitions revoked: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked)
        )

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        assert self._consumer is not None
        # Nothing is read from them until their offsets are set up below: a record
        # handed out before would have no partition to be settled in.
        self._consumer.pause(*assigned)
        # Fence the previous owners first (their open transactions end), then read the
        # committed offsets afresh: read before, they could miss a transaction's commit.
        for tp in sorted(assigned):
            try:
                await self._transactional_producer(tp)
            except KafkaError as exc:  # tried again at the partition's first dead letter
                logger.warning(
                    "transactional producer for %s/%d not ready (%s)",
                    tp.topic,
                    tp.partition,
                    _short(exc),
                )
        committed = await self._committed_offsets(assigned)
        if committed is None:
            return  # paused: the partitions are assigned again after the rejoin
        fresh = []
        for tp in assigned:
            meta = committed.get(tp)
            if meta is None or meta.offset < 0:
                fresh.append(tp)
                self._offsets[tp] = PartitionOffsets(start=await self._consumer.position(tp))
                continue
            self._consumer.seek(tp, meta.offset)
            self._offsets[tp] = PartitionOffsets(
                start=meta.offset, done=decode_done(meta.offset, meta.metadata)
            )
        self._consumer.resume(*assigned)
        self._paused = False
        logger.info(
            "partitions assigned: %s",
            sorted(f"{tp.topic}/{tp.partition}@{self._offsets[tp].start}" for tp in assigned),
        )
        if fresh:
            await self._note_fresh_start(fresh)

    async def _committed_offsets(self, assigned: set[TopicPartition]) -> dict[Any, Any] | None:
        """The group's committed offsets (with their metadata) of ``assigned``, tried for
        about 30 s; None when they cannot be read, after asking the group to rebalance
        (aiokafka swallows a failure of this listener: the partitions would stay paused,
        never read)."""
        assert self._consumer is not None
        delay = 0.5
        for _ in range(6):
            try:
                # aiokafka's consumer has no public call that returns the metadata.
                committed: dict[
                    Any, Any
                ] = await self._consumer._coordinator.fetch_committed_offsets(list(assigned))
                return committed
            except KafkaError as exc:
                logger.warning("reading the committed offsets failed (%s)", _short(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
        logger.error("could not read the committed offsets; rejoining the consumer group")
        self._consumer._coordinator.request_rejoin()
        return None

    async def _note_fresh_start(self, fresh: list[TopicPartition]) -> None:
        """A group with no committed offset starts where offsetResetPolicy says. At
        ``latest`` the records already in the topic are never processed, and silence
        looks like a broken dispatcher: say so, with how many."""
        assert self._consumer is not None
        where = ", ".join(sorted(f"{tp.topic}/{tp.partition}" for tp in fresh))
        if self._reset != "latest":
            logger.info(
                "consumer group %s has no committed offset on %s: starting from the "
                "earliest record (offsetResetPolicy %s)",
                self._group,
                where,
                self._reset,
            )
            return
        beginning = await self._consumer.beginning_offsets(fresh)
        skipped = sum(max(0, self._offsets[tp].start - beginning[tp]) for tp in fresh)
        logger.warning(
            "consumer group %s is new on %s: starting at the end (offsetResetPolicy latest, "
            "KEDA's default), so the %d record(s) already there will not be processed; "
            "only records published from now on are. Set offsetResetPolicy: earliest to "
            "take them",
            self._group,
            where,
            skipped,
            extra={"scaledjob": self._scaledjob, "source": self.name},
        )

    # ------------------------------------------------------------------ receive
    def _in_hand(self) -> int:
        return sum(p.in_hand for p in self._offsets.values())

    def _apply_backpressure(self) -> None:
        assert self._consumer is not None
        full = self._in_hand() >= self._max_in_hand or self._stopped
        partitions = list(self._offsets)
        if full and not self._paused and partitions:
            self._consumer.pause(*partitions)
            self._paused = True
        elif not full and self._paused:
            self._consumer.resume(*partitions)
            self._paused = False

    def _handle(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> KafkaHandle:
        headers = {k: _text(v) for k, v in (record.headers or ())}
        identity = f"{tp.topic}/{tp.partition}/{record.offset}"
        delivery = Delivery(
            source=self.name,
            identity=identity,
            body=record.value or b"",
            message_id=None,
            headers=headers,
            metadata={
                "topic": tp.topic,
                "partition": str(tp.partition),
                "offset": str(record.offset),
                "key": _text(record.key),
            },
            received_at=time.monotonic(),
            published_at=record.timestamp / 1000 if record.timestamp else None,
            positional=True,
        )
        return KafkaHandle(delivery, tp, record.offset, record.key, self._generation)

    async def deliveries(self) -> AsyncIterator[KafkaHandle]:
        assert self._consumer is not None
        while True:
            while self._ready:
                yield self._ready.popleft()
            self._apply_backpressure()
            # Keeps polling while paused: heartbeats and max.poll.interval stay happy.
            batch = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                offsets = self._offsets.get(tp)
                if offsets is None:
                    continue
                for record in records:
                    if not offsets.received(record.offset):
                        continue  # settled before the commit this consumer resumed from
                    handle = self._handle(tp, record)
                    if self._per_key and record.key is not None:
                        slot = (tp, record.key)
                        if slot in self._busy_keys:
                            self._waiting.setdefault(slot, collections.deque()).append(handle)
                            continue
                        self._busy_keys.add(slot)
                    self._ready.append(handle)

    # ------------------------------------------------------------------ settle
    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, KafkaHandle):
            raise TypeError(f"not a Kafka record: {handle!r}")
        offsets = self._offsets.get(handle.partition)
        if offsets is None or handle.generation != self._generation:
            # Revoked since: the partition's new owner replays the record and adopts.
            return False
        if decision.action is Action.REQUEUE:
            return False  # left uncommitted: read again after a restart or rebalance
        if decision.action is Action.DEAD_LETTER or decision.outputs:
            if not await self._settle_in_transaction(handle, offsets, decision):
                return False
        else:
            offsets.finished(handle.offset)
        if self._per_key and handle.key is not None:
            slot = (handle.partition, handle.key)
            waiting = self._waiting.get(slot)
            if waiting:
                self._ready.append(waiting.popleft())
                if not waiting:
                    del self._waiting[slot]
            else:
                self._busy_keys.discard(slot)
        await self._commit_ready()
        return True

    def is_durable(self, handle: MessageHandle) -> bool:
        if not isinstance(handle, KafkaHandle):
            return False
        offsets = self._offsets.get(handle.partition)
        if offsets is None or handle.generation != self._generation:
            return False  # revoked: the new owner replays it and needs its Job
        return offsets.is_settled(handle.offset)

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        metadata = dict(original.get("metadata") or {})
        key = metadata.get("key")
        await self._dead_letter(
            original["body"],
            key.encode() if key else None,
            dict(original.get("headers") or {}),
            metadata,
            decision,
        )

    # ------------------------------------------------------------------ replies
    def reply_address(self, message: Mapping[str, Any]) -> ReplyAddress | None:
        """The record's reply-topic header (``reply-topic``, or Spring Kafka's
        ``kafka_replyTopic``) and correlation header (``correlation-id``,
        ``kafka_correlationId``), as a topic of this cluster that the trigger's
        ``replyTopics`` allows; never the trigger's own topic or its dead-letter topic (a
        reply there would be a new message: a loop). ReplyRefused otherwise."""
        headers = message.get("headers") or {}
        topic = str(next((headers[h] for h in REPLY_TOPIC_HEADERS if headers.get(h)), ""))
        if not topic:
            return None
        correlation = str(next((headers[h] for h in CORRELATION_HEADERS if headers.get(h)), ""))
        shown = topic[:100]
        if not self.reply_topics:
            raise ReplyRefused(
                f"the message names reply topic {shown!r}, and this trigger allows none "
                "(metadata.replyTopics)"
            )
        if topic in (self.topic, self.dead_letter_topic):
            raise ReplyRefused(
                f"reply topic {shown!r} is the trigger's own topic or its dead-letter topic"
            )
        if not topic_allowed(topic, self.reply_topics):
            raise ReplyRefused(
                f"reply topic {shown!r} is not one metadata.replyTopics allows "
                f"({', '.join(self.reply_topics)})"
            )
        return ReplyAddress(destination=topic, correlation_id=correlation, kind="topic")

    async def send_reply(self, address: ReplyAddress, reply: Reply) -> None:
        """Produce the reply with the source's idempotent producer (acks=all): the
        CloudEvents attributes as ``ce_*`` headers (the Kafka binding's binary mode), the
        correlation id under both header names and as the record key."""
        if self._producer is None:
            raise ConnectionError("not connected")
        headers = [(f"ce_{k}", v.encode()) for k, v in reply.attributes.items()]
        headers += [("content-type", reply.content_type.encode())]
        headers += [("message-id", reply.reply_id.encode())]
        if reply.correlation_id:
            headers += [(h, reply.correlation_id.encode()) for h in CORRELATION_HEADERS]
        await self._producer.send_and_wait(
            address.destination,
            reply.body,
            key=reply.correlation_id.encode() or None,
            headers=headers,
        )

    def carries(self, sink: MessageSink) -> bool:
        """A Kafka sink on the same cluster with the same credentials: its messages can
        go in this source's transactions (one producer, one principal)."""
        return (
            isinstance(sink, KafkaSink)
            and self._connection is not None
            and sink.connection == self._connection
        )

    async def _settle_in_transaction(
        self, handle: KafkaHandle, offsets: PartitionOffsets, decision: Decision
    ) -> bool:
        """Publish a live record's outputs (``decision.outputs``), dead-letter it when
        so decided, and commit its partition's offsets (the record settled), all in one
        transaction. False when the partition moved to another consumer meanwhile
        (revoked, or this producer fenced): the transaction is aborted and the new owner
        replays the record. A retriable Kafka error (a broker restarting, a leader
        moving) aborts it and it is tried again, TRANSACTION_TRIES times in all with
        backoff; then, as any other Kafka error, it is raised, the record left in hand,
        unsettled."""
        tp = handle.partition
        async with self._commit_lock:
            # Held for the whole transaction: no plain commit of this consumer lands
            # between the transaction's offsets and its commit.
            delay = 0.5
            for attempt in range(1, TRANSACTION_TRIES + 1):
                if self._offsets.get(tp) is not offsets or handle.generation != self._generation:
                    return False
                mark = offsets.to_commit(besides=handle.offset)
                try:
                    producer = await self._transactional_producer(tp)
                    await self._transaction(producer, handle, decision, mark)
                    break
                except ProducerFenced:
                    logger.info(
                        "%s/%d moved to another consumer: its new owner settles the record",
                        tp.topic,
                        tp.partition,
                    )
                    return False
                except KafkaError as exc:
                    if not getattr(exc, "retriable", False) or attempt == TRANSACTION_TRIES:
                        raise
                    logger.warning(
                        "transaction on %s/%d failed (%s); trying again in %.1fs",
                        tp.topic,
                        tp.partition,
                        _short(exc),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 8.0)
            offsets.finished(handle.offset)
            if mark is not None:
                offsets.committed_as(mark)
        if decision.outputs:
            logger.info(
                "Job %s: published %d output message(s) in the transaction that commits its record",
                decision.job_name,
                len(decision.outputs),
                extra={"job_name": decision.job_name},
            )
        return True

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        handle: KafkaHandle,
        decision: Decision,
        mark: Mark | None,
    ) -> None:
        """One transaction: the outputs, the dead letter, the offsets, the commit;
        aborted (and the producer dropped) on any failure."""
        tp = handle.partition
        d = handle.delivery
        await producer.begin_transaction()
        try:
            for output in decision.outputs:
                sink = output.sink
                assert isinstance(sink, KafkaSink)  # carries() said so
                await producer.send_and_wait(
                    sink.topic, output.body, headers=[("message-id", output.message_id.encode())]
                )
            if decision.outputs:
                self._failpoints.hit("after-output-sent")
            if decision.action is Action.DEAD_LETTER:
                await self._dead_letter(
                    d.body,
                    handle.key,
                    dict(d.headers),
                    dict(d.metadata),
                    decision,
                    producer=producer,
                )
                self._failpoints.hit("after-dead-letter-sent")
            if mark is not None:
                await producer.send_offsets_to_transaction(
                    {tp: (mark.offset, mark.metadata)}, self._group
                )
            await producer.commit_transaction()
        except BaseException:
            await self._abort(tp, producer)
            raise

    async def _abort(self, tp: TopicPartition, producer: AIOKafkaProducer) -> None:
        """End a failed transaction; the producer is dropped (after some errors aiokafka
        keeps it unusable) and the partition's next dead letter opens a new one."""
        try:
            await asyncio.shield(producer.abort_transaction())
        except Exception as exc:  # the broker aborts it on its timeout anyway
            logger.debug("abort failed: %s", _short(exc))
        if self._transactional.get(tp) is producer:
            del self._transactional[tp]
        await asyncio.shield(producer.stop())

    def transactional_id(self, tp: TopicPartition) -> str:
        """The partition's transactional id: the same for every dispatcher of the
        consumer group, so that a new owner fences the previous one (KIP-98)."""
        return f"jobrunner.{self._group}.{tp.topic}.{tp.partition}"

    async def _transactional_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        """The partition's transactional producer, started and with its producer id (so
        the previous owner is fenced, its open transaction ended)."""
        producer = self._transactional.get(tp)
        if producer is not None:
            return producer
        producer = AIOKafkaProducer(
            bootstrap_servers=self._servers,
            transactional_id=self.transactional_id(tp),
            acks="all",
            enable_idempotence=True,
            **self._options,
        )
        try:
            await producer.start()
            # An empty transaction waits for InitProducerId, which fences the id's
            # previous producer and completes its open transaction; nothing is sent.
            await producer.begin_transaction()
            await producer.abort_transaction()
        except BaseException:
            await asyncio.shield(producer.stop())
            raise
        self._transactional[tp] = producer
        return producer

    async def _close_transactional(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            producer = self._transactional.pop(tp, None)
            if producer is not None:
                await producer.stop()

    async def _dead_letter(
        self,
        body: bytes,
        key: bytes | None,
        headers: dict[str, str],
        metadata: dict[str, str],
        decision: Decision,
        *,
        producer: AIOKafkaProducer | None = None,
    ) -> None:
        """Produce the dead letter (``producer``: in its open transaction)."""
        producer = producer or self._producer
        assert producer is not None
        headers.update(
            decision.reason_headers(
                scaledjob=self._scaledjob,
                source_topic=metadata.get("topic", self.topic),
                source_partition=metadata.get("partition", ""),
                source_offset=metadata.get("offset", ""),
            )
        )
        # acks=all: returns once the dead-letter topic holds the copy.
        await producer.send_and_wait(
            self.dead_letter_topic,
            value=body,
            key=key,
            headers=[(k, v.encode()) for k, v in headers.items()],
        )

    async def _commit_ready(self, only: set[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        async with self._commit_lock:
            marks: dict[TopicPartition, Mark] = {
                tp: mark
                for tp, part in self._offsets.items()
                if (only is None or tp in only) and (mark := part.to_commit()) is not None
            }
            if not marks:
                return
            await self._consumer.commit({tp: (m.offset, m.metadata) for tp, m in marks.items()})
            for tp, mark in marks.items():
                if tp in self._offsets:
                    self._offsets[tp].committed_as(mark)

    # ------------------------------------------------------------------ observability
    async def depth(self) -> int | None:
        lag = await self.partition_lag()
        return sum(lag.values()) if lag else None

    async def partition_lag(self) -> dict[str, int]:
        """Per partition: records after the committed watermark (the log end minus it)."""
        if self._consumer is None:
            return {}
        out = {}
        for tp, part in list(self._offsets.items()):
            end = self._consumer.highwater(tp)
            if end is not None:
                out[str(tp.partition)] = max(0, end - part.committed)
        return out


def client_options(trigger: KafkaTrigger) -> dict[str, Any]:
    """KEDA's kafka authentication parameters as aiokafka client options."""
    options: dict[str, Any] = {}
    if trigger.tls:
        context = ssl.create_default_context(cadata=trigger.ca or None)
        if trigger.cert and trigger.key:
            # ssl loads a client certificate only from a file.
            with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as pem:
                pem.write(trigger.cert + "\n" + trigger.key)
            try:
                context.load_cert_chain(pem.name)
            finally:
                os.unlink(pem.name)
        options["ssl_context"] = context
    if trigger.sasl != "none":
        options.update(
            security_protocol="SASL_SSL" if trigger.tls else "SASL_PLAINTEXT",
            sasl_mechanism=SASL_MECHANISMS[trigger.sasl],
            sasl_plain_username=trigger.username,
            sasl_plain_password=trigger.password,
        )
    elif trigger.tls:
        options["security_protocol"] = "SSL"
    return options


def open_source(trigger: KafkaTrigger, *, scaledjob: ScaledJob, settings: Settings) -> KafkaSource:
    """The source for a resolved ``kafka`` trigger (see jobrunner.manifest.triggers.kafka)."""
    spec = scaledjob.spec
    return KafkaSource(
        bootstrap_servers=trigger.bootstrap_servers,
        topic=trigger.topic,
        group_id=trigger.group_id,
        offset_reset=trigger.offset_reset,
        max_in_hand=spec.maxReplicaCount,
        dead_letter_topic=spec.deadLetter.topic or f"{trigger.topic}.dead-letter",
        per_key_ordering=spec.ordering == "perKey",
        client_options=client_options(trigger),
        consumer_options=settings.kafka.model_dump(),
        scaledjob=scaledjob.name,
        failpoints=Failpoints(settings.dispatcher.failpoints),
        connection=connection_of(trigger),
        reply_topics=trigger.reply_topics,
    )


def connection_of(trigger: KafkaTrigger) -> tuple[str, ...]:
    """What makes two triggers one client: the brokers and the credentials."""
    return (
        trigger.bootstrap_servers,
        trigger.sasl,
        str(trigger.tls),
        trigger.username,
        trigger.password,
        trigger.ca,
        trigger.cert,
        trigger.key,
    )


REPLAYED_SUFFIX = ".replayed"


class KafkaDeadLetters:
    """A dead-letter topic, for ``jobrunner dead-letters``. Read from the beginning by a
    consumer without a group (nothing is committed), ``read_committed``: a dead letter
    of a transaction that was aborted (its dispatcher died before the commit) is not
    listed, since the record it came from is dead-lettered again. A topic is a log that cannot lose
    a record, so a replay is remembered in ``<dead-letter topic>.replayed`` (key
    ``partition:offset``, value the replay's ``x-jobrunner-replay``), written after the
    copy is on the source topic; listings leave replayed records out. Like the
    dead-letter topic, it is created on first use when the brokers create topics
    automatically."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        topic: str,
        dead_letter_topic: str,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._servers = bootstrap_servers
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self._options = dict(client_options or {})
        self._producer: AIOKafkaProducer | None = None

    @property
    def where(self) -> str:
        return f"topic {self.dead_letter_topic} on Kafka {addresses(self._servers)}"

    @property
    def destination(self) -> str:
        return f"topic {self.topic}"

    async def read(self, *, limit: int) -> list[DeadLetter]:
        partitions = await self._partitions(
            [self.dead_letter_topic, self.dead_letter_topic + REPLAYED_SUFFIX]
        )
        if not partitions.get(self.dead_letter_topic):
            return []
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._servers,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=15_000,
            # Dead letters are produced in transactions: an aborted one is no dead letter.
            isolation_level="read_committed",
            **self._options,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise SourceUnreachable(f"Kafka at {addresses(self._servers)}: {_short(exc)}") from exc
        try:
            records = await _read_all(
                consumer, self.dead_letter_topic, partitions[self.dead_letter_topic]
            )
            replayed: dict[str, str] = {}
            markers = self.dead_letter_topic + REPLAYED_SUFFIX
            for marker in await _read_all(consumer, markers, partitions.get(markers, [])):
                if marker.key is not None:
                    replayed[_text(marker.key)] = _text(marker.value)
        finally:
            await consumer.stop()
        records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
        out = []
        for record in records:
            letter_id = f"{record.partition}:{record.offset}"
            out.append(
                DeadLetter(
                    id=letter_id,
                    body=record.value or b"",
                    headers={k: _text(v) for k, v in (record.headers or ())},
                    key=record.key,
                    when=record.timestamp / 1000 if record.timestamp else None,
                    replayed=replayed.get(letter_id),
                )
            )
        unreplayed = [d for d in out if d.replayed is None][:limit]
        return unreplayed + [d for d in out if d.replayed is not None][: limit - len(unreplayed)]

    async def _partitions(self, topics: list[str]) -> dict[str, list[int]]:
        """The partitions of those of ``topics`` that exist (asking does not create them)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self._servers, **self._options)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            wanted = [t for t in topics if t in existing]
            described = await admin.describe_topics(wanted) if wanted else []
        except KafkaError as exc:
            raise SourceUnreachable(f"Kafka at {addresses(self._servers)}: {_short(exc)}") from exc
        finally:
            await admin.close()
        return {
            d["topic"]: sorted(p["partition"] for p in d.get("partitions") or []) for d in described
        }

    async def replay(self, letters: Sequence[DeadLetter], *, value: str) -> int:
        if self._producer is None:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self._servers,
                acks="all",
                enable_idempotence=True,
                **self._options,
            )
            try:
                await self._producer.start()
            except KafkaError as exc:
                raise SourceUnreachable(
                    f"Kafka at {addresses(self._servers)}: {_short(exc)}"
                ) from exc
        for letter in letters:
            headers = replay_headers(letter.headers, value)
            await self._producer.send_and_wait(
                letter.source_header("topic") or self.topic,
                value=letter.body,
                key=letter.key,
                headers=[(k, v.encode()) for k, v in headers.items()],
            )
            await self._producer.send_and_wait(
                self.dead_letter_topic + REPLAYED_SUFFIX,
                key=letter.id.encode(),
                value=value.encode(),
            )
        return len(letters)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


async def _read_all(
    consumer: AIOKafkaConsumer, topic: str, numbers: list[int]
) -> list[ConsumerRecord[Any, Any]]:
    """Every record of the ``numbers`` partitions of ``topic`` up to their current end."""
    partitions = [TopicPartition(topic, p) for p in numbers]
    if not partitions:
        return []
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    ends = await consumer.end_offsets(partitions)
    out: list[ConsumerRecord[Any, Any]] = []
    pending = {tp for tp in partitions if ends[tp] > await consumer.position(tp)}
    deadline = time.monotonic() + 60
    while pending:
        if time.monotonic() > deadline:
            raise ConnectionError(f"Kafka: reading topic {topic} to its end took over 60 s")
        batch = await consumer.getmany(*pending, timeout_ms=1000)
        for tp, records in batch.items():
            out.extend(r for r in records if r.offset < ends[tp])
        pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    return out


def open_dead_letters(
    trigger: KafkaTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> KafkaDeadLetters:
    """The dead letters of a resolved ``kafka`` trigger: its ``deadLetter.topic`` or
    ``<topic>.dead-letter``."""
    return KafkaDeadLetters(
        bootstrap_servers=trigger.bootstrap_servers,
        topic=trigger.topic,
        dead_letter_topic=scaledjob.spec.deadLetter.topic or f"{trigger.topic}.dead-letter",
        client_options=client_options(trigger),
    )


class KafkaSink:
    """Publishes output-binding messages to a topic (``acks=all``), the deterministic
    output id in the ``message-id`` header."""

    def __init__(self, trigger: KafkaTrigger) -> None:
        self.topic = trigger.topic
        self.connection = connection_of(trigger)
        """Its cluster and credentials: a Kafka source with the same ones publishes its
        messages in the source's settle transaction instead (KafkaSource.carries)."""
        self._options = client_options(trigger)
        self._bootstrap = trigger.bootstrap_servers
        self._producer: AIOKafkaProducer | None = None

    async def publish(self, body: bytes, *, message_id: str) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                acks="all",
                enable_idempotence=True,
                **self._options,
            )
            await producer.start()
            self._producer = producer
        await self._producer.send_and_wait(
            self.topic, body, headers=[("message-id", message_id.encode())]
        )

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def open_sink(trigger: KafkaTrigger, *, settings: Settings) -> KafkaSink:
    return KafkaSink(trigger)
