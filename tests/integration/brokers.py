"""One kit per broker of the newer sources (SQS on ElasticMQ, Redis Streams, NATS
JetStream, MQTT on Mosquitto), so the same behaviour tests run on each real server.

A kit creates a fresh queue/stream/topic for one test, with the broker's redelivery timer
shortened to ``TIMER`` seconds where it has one (SQS visibility timeout, Redis claim
min-idle, JetStream AckWait), publishes, reads dead letters, says what the broker still
holds, and restarts the broker through ``deploy/local/stack-restart.sh``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from tests import services

TIMER = 4
"""Seconds of the broker's redelivery timer in these tests (the brokers' defaults are
30-60 s): a dispatcher that keeps no message alive is caught within a Job's run."""


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, str]


async def restart_part(part: str) -> None:
    script = services.setting("JOBRUNNER_TEST_STACK_RESTART")
    if not script:
        services.missing(
            "the local stack's restart script", "JOBRUNNER_TEST_STACK_RESTART is unset"
        )
    await asyncio.to_thread(
        subprocess.run, ["bash", str(script), part], check=True, capture_output=True, timeout=300
    )


@dataclass
class Kit:
    """The shared shape; each broker fills it in."""

    name: str = field(default_factory=lambda: f"jr{uuid.uuid4().hex[:10]}")
    has_timer: bool = True
    env: dict[str, str] = field(default_factory=dict)
    """Environment for every dispatcher of the test."""

    async def prepare(self) -> None: ...

    def trigger(self, **extra: str) -> dict[str, Any]:
        raise NotImplementedError

    async def publish(self, body: bytes, *, message_id: str | None = None) -> None: ...

    async def dead_letters(self, count: int, *, within: float = 30) -> list[DeadLetter]:
        raise NotImplementedError

    async def all_dead_letters(self, *, within: float = 300) -> list[DeadLetter]:
        """Every dead letter the target holds, once the dispatchers have settled all (the
        soak's final count). Kits whose read is a full snapshot read once; one whose read
        consumes (SQS) reads until the queue is empty, however long that takes."""
        return await self.dead_letters(0, within=within)

    async def remaining(self) -> int | None:
        """Messages the broker still holds for the consumer (waiting or unsettled); None
        when the broker cannot tell."""
        return None

    async def restart_broker(self) -> None: ...

    async def cleanup(self) -> None: ...

    def dispatcher_env(self, index: int) -> dict[str, str]:
        """Environment for the ``index``-th distinct dispatcher of a test (a restart of
        the same dispatcher uses the same index)."""
        return dict(self.env)

    def spec(self) -> dict[str, Any]:
        """ScaledJob spec fields the broker needs besides the trigger."""
        return {}

    def for_broker_restart(self) -> None:
        """Adjust the setup for a test that restarts the broker."""


async def _until(check: Any, within: float, interval: float = 0.3) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result or loop.time() >= deadline:
            return result
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------- SQS
async def _take_dead_letters(sqs: Any, url: str, out: list[DeadLetter]) -> int:
    """Receive up to 10 dead letters from the queue at ``url`` into ``out``, deleting
    each; how many came."""
    answer = await sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
    )
    messages = answer.get("Messages", [])
    for m in messages:
        attributes = m.get("MessageAttributes", {})
        headers = {k: v.get("StringValue", "") for k, v in attributes.items()}
        out.append(DeadLetter(m["Body"].encode(), headers))
        await sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return len(messages)


@dataclass
class SQSKit(Kit):
    endpoint: str = ""

    def __post_init__(self) -> None:
        # ElasticMQ takes any credentials; the dispatcher finds them through the AWS
        # SDK's default chain (the environment).
        self.env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}

    def _client(self) -> Any:
        from aiobotocore.session import get_session

        return get_session().create_client(
            "sqs",
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    async def prepare(self) -> None:
        async with self._client() as sqs:
            self.url = (
                await sqs.create_queue(
                    QueueName=self.name, Attributes={"VisibilityTimeout": str(TIMER)}
                )
            )["QueueUrl"]

    def trigger(self, **extra: str) -> dict[str, Any]:
        return {
            "type": "aws-sqs-queue",
            "metadata": {
                "queueURL": self.name,
                "awsRegion": "us-east-1",
                "awsEndpoint": self.endpoint,
                **extra,
            },
        }

    async def publish(self, body: bytes, *, message_id: str | None = None) -> None:
        attributes = {}
        if message_id:
            attributes["test-id"] = {"DataType": "String", "StringValue": message_id}
        async with self._client() as sqs:
            await sqs.send_message(
                QueueUrl=self.url, MessageBody=body.decode(), MessageAttributes=attributes
            )

    async def dead_letters(self, count: int, *, within: float = 30) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        async with self._client() as sqs:

            async def more() -> bool:
                try:  # the dispatcher creates the dead-letter queue when it starts
                    url = (await sqs.get_queue_url(QueueName=f"{self.name}-dead-letter"))[
                        "QueueUrl"
                    ]
                except sqs.exceptions.QueueDoesNotExist:
                    return False
                await _take_dead_letters(sqs, url, out)
                return len(out) >= count

            await _until(more, within)
        return out

    async def all_dead_letters(self, *, within: float = 300) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        async with self._client() as sqs:
            try:
                url = (await sqs.get_queue_url(QueueName=f"{self.name}-dead-letter"))["QueueUrl"]
            except sqs.exceptions.QueueDoesNotExist:
                return out

            async def drained() -> bool:
                if await _take_dead_letters(sqs, url, out):
                    return False
                left = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]))[
                    "Attributes"
                ]
                return (
                    int(left["ApproximateNumberOfMessages"])
                    + int(left["ApproximateNumberOfMessagesNotVisible"])
                    == 0
                )

            if not await _until(drained, within, interval=0):
                raise AssertionError(f"dead-letter queue of {self.name} not drained in {within}s")
        return out

    async def remaining(self) -> int | None:
        async with self._client() as sqs:
            attributes = (
                await sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["All"])
            )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    async def restart_broker(self) -> None:
        await restart_part("sqs")

    async def cleanup(self) -> None:
        async with self._client() as sqs:
            for name in (self.name, f"{self.name}-dead-letter"):
                with contextlib.suppress(Exception):
                    url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
                    await sqs.delete_queue(QueueUrl=url)


# ---------------------------------------------------------------------------- Redis
@dataclass
class RedisKit(Kit):
    address: str = ""

    def _client(self) -> Any:
        import redis.asyncio as aioredis

        host, _, port = self.address.rpartition(":")
        return aioredis.Redis(host=host, port=int(port))

    async def prepare(self) -> None:
        async with self._client() as r:
            await r.xgroup_create(self.name, "work", id="0", mkstream=True)

    def trigger(self, **extra: str) -> dict[str, Any]:
        return {
            "type": "redis-streams",
            "metadata": {
                "address": self.address,
                "stream": self.name,
                "consumerGroup": "work",
                "claimMinIdleSeconds": str(TIMER),
                **extra,
            },
        }

    async def publish(self, body: bytes, *, message_id: str | None = None) -> None:
        fields: dict[str, Any] = {"body": body}
        if message_id:
            fields["test-id"] = message_id
        async with self._client() as r:
            await r.xadd(self.name, fields)

    async def dead_letters(self, count: int, *, within: float = 30) -> list[DeadLetter]:
        async with self._client() as r:

            async def read() -> list[Any] | None:
                entries = await r.xrange(f"{self.name}.dead-letter")
                return entries if len(entries) >= count else None

            entries = await _until(read, within) or await r.xrange(f"{self.name}.dead-letter")
        out = []
        for _id, fields in entries:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(DeadLetter(text.pop("body", "").encode(), text))
        return out

    async def remaining(self) -> int | None:
        async with self._client() as r:
            pending = await r.xpending(self.name, "work")
            groups = await r.xinfo_groups(self.name)
        lag = sum(int(g.get("lag") or 0) for g in groups if g["name"] == b"work")
        return int(pending["pending"]) + lag

    async def restart_broker(self) -> None:
        await restart_part("redis")

    async def cleanup(self) -> None:
        async with self._client() as r:
            await r.delete(self.name, f"{self.name}.dead-letter")


# ---------------------------------------------------------------------------- NATS
@dataclass
class NatsKit(Kit):
    url: str = ""

    async def _js(self) -> tuple[Any, Any]:
        import nats

        nc = await nats.connect(self.url)
        return nc, nc.jetstream()

    async def prepare(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        nc, js = await self._js()
        try:
            await js.add_stream(name=self.name, subjects=[f"{self.name}.>"])
            await js.add_consumer(
                self.name,
                ConsumerConfig(durable_name="work", ack_policy=AckPolicy.EXPLICIT, ack_wait=TIMER),
            )
        finally:
            await nc.close()

    def trigger(self, **extra: str) -> dict[str, Any]:
        return {
            "type": "nats-jetstream",
            "metadata": {"natsServer": self.url, "stream": self.name, "consumer": "work", **extra},
        }

    async def publish(self, body: bytes, *, message_id: str | None = None) -> None:
        nc, js = await self._js()
        try:
            headers = {"test-id": message_id} if message_id else None
            await js.publish(f"{self.name}.jobs", body, headers=headers)
        finally:
            await nc.close()

    async def dead_letters(self, count: int, *, within: float = 30) -> list[DeadLetter]:
        import nats.js.errors

        nc, js = await self._js()
        out: list[DeadLetter] = []
        try:

            async def read() -> bool:
                out.clear()
                try:
                    info = await js.stream_info(f"{self.name}-dead-letter")
                except nats.js.errors.NotFoundError:
                    return count == 0
                if not info.state.messages:
                    return count == 0
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    stored = await js.get_msg(f"{self.name}-dead-letter", seq)
                    out.append(DeadLetter(stored.data or b"", dict(stored.headers or {})))
                return len(out) >= count

            await _until(read, within)
        finally:
            await nc.close()
        return out

    async def remaining(self) -> int | None:
        nc, js = await self._js()
        try:
            info = await js.consumer_info(self.name, "work")
        finally:
            await nc.close()
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def restart_broker(self) -> None:
        await restart_part("nats")

    async def cleanup(self) -> None:
        nc, js = await self._js()
        try:
            for name in (self.name, f"{self.name}-dead-letter"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
        finally:
            await nc.close()


# ---------------------------------------------------------------------------- MQTT
class _MQTTSession:
    """A paho client on its own thread, for publishing and for the test's persistent
    dead-letter subscriber."""

    def __init__(self, url: str, client_id: str, *, clean: bool = True) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        parsed = urlparse(url)
        self.received: list[DeadLetter] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 600
        self.client.connect(
            parsed.hostname or "127.0.0.1", parsed.port or 1883, clean_start=clean, properties=props
        )
        self.client.loop_start()
        if not self._connected.wait(15):
            raise AssertionError(f"no CONNACK from {url}")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        props = getattr(message, "properties", None)
        headers = dict(getattr(props, "UserProperty", None) or [])
        self.received.append(DeadLetter(bytes(message.payload), headers))

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        if not self._subscribed.wait(15):
            raise AssertionError(f"no SUBACK for {topic}")

    def publish(self, topic: str, body: bytes, user: Mapping[str, str]) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        if user:
            props.UserProperty = list(user.items())
        info = self.client.publish(topic, body, qos=1, properties=props)
        info.wait_for_publish(15)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class MQTTKit(Kit):
    url: str = ""

    def __post_init__(self) -> None:
        self.has_timer = False
        self._dead: _MQTTSession | None = None
        self._sessions: set[str] = set()
        self.shared = True

    def for_broker_restart(self) -> None:
        # Mosquitto 2.0.11 (Debian 12) restores plain subscriptions of persistent sessions
        # from its persistence file after a restart, but not shared ones: a message
        # published before the dispatcher re-subscribes would have no subscriber.
        self.shared = False

    @property
    def subscription(self) -> str:
        return f"$share/jobrunner-work/{self.topic}" if self.shared else self.topic

    @property
    def topic(self) -> str:
        return f"jobs/{self.name}"

    @property
    def dead_letter_topic(self) -> str:
        return f"dead/{self.name}"

    async def prepare(self) -> None:
        # A persistent session subscribed to the dead-letter topic before any work, as
        # the README asks of operators: the broker then stores every dead letter.
        self._dead = await asyncio.to_thread(_MQTTSession, self.url, f"{self.name}-dl", clean=False)
        await asyncio.to_thread(self._dead.subscribe, self.dead_letter_topic)

    def trigger(self, **extra: str) -> dict[str, Any]:
        return {
            "type": "mqtt",
            "metadata": {
                "host": self.url,
                "topic": self.topic,
                "clientIdFromEnv": "TEST_MQTT_CLIENT_ID",
                "sessionExpirySeconds": "600",
                "shared": str(self.shared).lower(),
                **extra,
            },
        }

    def dispatcher_env(self, index: int) -> dict[str, str]:
        client_id = f"{self.name}-d{index}"
        if client_id not in self._sessions:
            # MQTT stores a message only for subscriptions that exist when it is
            # published: the dispatcher's persistent session is made (and subscribed)
            # now, as a dispatcher that ran before would have left it; the dispatcher
            # then resumes it.
            session = _MQTTSession(self.url, client_id, clean=False)
            session.subscribe(self.subscription)
            session.close()
            self._sessions.add(client_id)
        return {**self.env, "TEST_MQTT_CLIENT_ID": client_id}

    def spec(self) -> dict[str, Any]:
        return {"deadLetter": {"topic": self.dead_letter_topic}}

    async def publish(self, body: bytes, *, message_id: str | None = None) -> None:
        user = {"message-id": message_id} if message_id else {}

        def send() -> None:
            session = _MQTTSession(self.url, f"{self.name}-pub-{uuid.uuid4().hex[:6]}")
            try:
                session.publish(self.topic, body, user)
            finally:
                session.close()

        await asyncio.to_thread(send)

    async def dead_letters(self, count: int, *, within: float = 30) -> list[DeadLetter]:
        assert self._dead is not None
        dead = self._dead

        async def enough() -> bool:
            return len(dead.received) >= count

        await _until(enough, within)
        return list(dead.received)

    async def restart_broker(self) -> None:
        await restart_part("mqtt")

    async def cleanup(self) -> None:
        if self._dead is not None:
            await asyncio.to_thread(self._dead.close)


KITS = ("sqs", "redis", "nats", "mqtt")


def make_kit(kind: str, request: Any) -> Kit:
    """The kit for ``kind``, its server found through the session fixtures."""
    if kind == "sqs":
        return SQSKit(endpoint=request.getfixturevalue("sqs_endpoint"))
    if kind == "redis":
        return RedisKit(address=request.getfixturevalue("redis_address"))
    if kind == "nats":
        return NatsKit(url=request.getfixturevalue("nats_url"))
    return MQTTKit(url=request.getfixturevalue("mqtt_url"))
