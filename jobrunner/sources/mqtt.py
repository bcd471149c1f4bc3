"""MQTT 5 source on paho-mqtt, driven by the asyncio loop: QoS 1 with the PUBACK sent only
once the outcome is durable, a persistent session, a shared subscription.

Why paho-mqtt: of the maintained Python clients, it is the one whose received QoS 1
messages can be acknowledged by the application at any later time (``manual_ack``,
``Client.ack``) and whose outgoing PUBACK reason codes reach the caller (``on_publish``),
which a dead letter must check. aiomqtt acknowledges on receipt (application acks are an
open request, aiomqtt#345); gmqtt acknowledges when its message callback returns and
does not report PUBACK reason codes of its own publishes. paho's sockets are driven from
the event loop here (reader/writer callbacks, ``loop_misc`` every second), so nothing
runs on another thread.

Rules, from the MQTT 5.0 specification:

* QoS 1 and ``Receive Maximum`` = ``maxReplicaCount`` (section 3.1.2.11.3): the broker
  sends at most that many unacknowledged messages, which is the backpressure.
* Clean Start off and ``Session Expiry Interval`` (``sessionExpirySeconds``, 3.1.2.11.2):
  the broker keeps the session, its subscription and the messages it sent but got no
  PUBACK for while the dispatcher is away, and resends them, marked DUP, when a client
  with the same ``clientId`` connects again (4.4). A message is never resent on a live
  connection, so a Job may run for hours without a renewal; past the session expiry a
  session of a dispatcher that never came back is discarded with what it held.
* Shared subscription ``$share/<group>/<topic>`` (4.8.2): each message goes to one
  dispatcher of the group. A message in flight to a dispatcher that went away stays
  with that dispatcher's session (Mosquitto does not hand it to another member), so
  each dispatcher needs a stable ``clientId`` of its own.
* Identity, since the broker gives none: the user property ``message-id`` when the
  publisher set one; otherwise a SHA-256 of the topic, the payload and the user
  properties. Two identical publishes without ``message-id`` are then one message while
  its Job exists: publishers that can repeat a payload should set ``message-id``.
* No negative acknowledgement exists: a PUBACK, whatever its reason code, ends the
  broker's duty. A message released to be tried again is handed to the dispatcher again
  from memory (a crash resends it through the session).
* Dead letters: a QoS 1 copy to ``deadLetter.topic`` with ``x-jobrunner-*`` user
  properties, and only after its PUBACK the original's. Mosquitto keeps a QoS 1 message
  only for sessions subscribed to its topic: a PUBACK "No matching subscribers" means
  the copy was dropped, so the original stays unacknowledged and the dead letter is
  tried again every 30 s, with an error saying to subscribe a persistent session to the
  dead-letter topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from jobrunner.core.models import Action, Decision, Delivery
from jobrunner.core.naming import message_identity
from jobrunner.core.protocols import MessageHandle, SourceError, SourceUnreachable
from jobrunner.core.redaction import describe_error
from jobrunner.core.settings import Settings
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.mqtt import MQTTTrigger

logger = logging.getLogger(__name__)

MESSAGE_ID_PROPERTY = "message-id"
NO_MATCHING_SUBSCRIBERS = 0x10
SESSION_TAKEN_OVER = 0x8E
REFUSED = {0x86, 0x87, 0x8C}
"""CONNACK: bad user name or password, not authorized, bad authentication method."""
DEAD_LETTER_RETRY_SECONDS = 30.0


@dataclass
class MQTTHandle:
    delivery: Delivery
    mid: int
    qos: int
    generation: int
    """The connection it arrived on: a PUBACK means something only on that connection's
    session state, and after a reconnect the broker resends it with its own mid."""


class MQTTSource:
    name = "mqtt"

    def __init__(
        self,
        *,
        trigger: MQTTTrigger,
        max_in_hand: int,
        dead_letter_topic: str,
        scaledjob: str = "",
    ) -> None:
        self._trigger = trigger
        self.dead_letter_topic = dead_letter_topic
        self._max_in_hand = max_in_hand
        self._scaledjob = scaledjob
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._incoming: asyncio.Queue[MQTTHandle] = asyncio.Queue()
        self._connack: asyncio.Future[tuple[ReasonCode, bool]] | None = None
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._pubacks: dict[int, asyncio.Future[ReasonCode]] = {}
        self._generation = 0
        self._connected = False
        self._closing = False
        self._stopped = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._tls_files: list[str] = []

    @property
    def where(self) -> str:
        t = self._trigger
        return f"MQTT broker {t.host}:{t.port} (client id {t.client_id})"

    @property
    def hold_limit_seconds(self) -> float | None:
        return None  # a live connection never redelivers; the session keeps the rest

    # ------------------------------------------------------------------ paho <-> asyncio
    def _new_client(self) -> paho.Client:
        t = self._trigger
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=t.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        if t.username:
            client.username_pw_set(t.username, t.password)
        if t.tls:
            client.tls_set_context(self._tls_context())
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _tls_context(self) -> ssl.SSLContext:
        t = self._trigger
        context = ssl.create_default_context(cadata=t.ca or None)
        if t.cert and t.key:
            # ssl loads a client certificate only from a file.
            with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as pem:
                pem.write(t.cert + "\n" + t.key)
            try:
                context.load_cert_chain(pem.name)
            finally:
                Path(pem.name).unlink()
        return context

    def _soon(self, callback: Any, *args: Any) -> None:
        """Run ``callback`` on the event loop's thread (paho may call from connect's)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._add_reader, client, sock)

    def _add_reader(self, client: paho.Client, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._remove, sock)

    def _remove(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._add_writer, client, sock)

    def _add_writer(self, client: paho.Client, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._soon(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((reason, bool(flags.session_present)))

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        was = self._connected
        self._connected = False
        self._generation += 1
        waiting: list[asyncio.Future[Any]] = [*self._pubacks.values(), *self._subacks.values()]
        for future in waiting:
            if not future.done():
                future.set_exception(SourceUnreachable(f"{self.where}: disconnected ({reason})"))
        self._pubacks.clear()
        self._subacks.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(SourceUnreachable(f"{self.where}: {reason}"))
        if self._closing:
            return
        if reason.value == SESSION_TAKEN_OVER:
            logger.error(
                "%s: another client connected with the same client id and took the session "
                "over; give each dispatcher its own clientId (clientIdFromEnv)",
                self.where,
            )
        if was:
            logger.warning("%s: disconnected (%s); reconnecting", self.where, reason)
            self._tasks.append(
                start_guarded(self._reconnect(), name="mqtt-reconnect", long_lived=False)
            )

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        future = self._subacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reasons)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        future = self._pubacks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._stopped = False
        self._client = self._new_client()
        await self._connect(first=True)
        self._tasks.append(start_guarded(self._misc_loop(), name="mqtt-keepalive"))

    async def _connect(self, *, first: bool) -> None:
        assert self._client is not None
        assert self._loop is not None
        t = self._trigger
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = t.session_expiry
        properties.ReceiveMaximum = max(1, min(self._max_in_hand, 65535))
        self._connack = self._loop.create_future()
        client = self._client
        try:
            if first:
                await asyncio.to_thread(
                    client.connect, t.host, t.port, 30, clean_start=False, properties=properties
                )
            else:
                await asyncio.to_thread(client.reconnect)
            reason, resumed = await asyncio.wait_for(self._connack, timeout=15)
        except (OSError, TimeoutError, socket.gaierror) as exc:
            raise SourceUnreachable(f"{self.where}: {describe_error(exc)}") from None
        if reason.is_failure:
            if reason.value in REFUSED:
                raise SourceError(
                    f"{self.where}: connection refused ({reason}); check the username and "
                    "password of the TriggerAuthentication"
                )
            raise SourceUnreachable(f"{self.where}: connection refused ({reason})")
        self._connected = True
        subscription = t.subscription
        future = self._loop.create_future()
        result, mid = client.subscribe(subscription, options=SubscribeOptions(qos=1))
        if result != paho.MQTT_ERR_SUCCESS or mid is None:
            raise SourceUnreachable(f"{self.where}: subscribe failed ({paho.error_string(result)})")
        self._subacks[mid] = future
        [granted] = await asyncio.wait_for(future, timeout=15)
        if granted.is_failure:
            raise SourceError(
                f"{self.where}: subscription {subscription!r} refused ({granted}); the broker "
                "must allow this client to subscribe to the topic, with MQTT 5 shared "
                "subscriptions"
            )
        logger.info(
            "subscribed to %s (QoS 1), session %s, at most %d unacknowledged; dead letters to "
            "topic %s",
            subscription,
            "resumed" if resumed else "new",
            self._max_in_hand,
            self.dead_letter_topic,
        )

    async def _reconnect(self) -> None:
        delay = 0.5
        while not self._closing and not self._connected:
            await asyncio.sleep(delay)
            try:
                await self._connect(first=False)
            except (ConnectionError, SourceError) as exc:
                logger.warning(
                    "%s: reconnect failed (%s); retrying in %.1fs", self.where, exc, delay
                )
                delay = min(delay * 2, 30.0)

    async def _misc_loop(self) -> None:
        """paho's periodic work (keepalive PINGREQ, timeouts), once a second."""
        while True:
            await asyncio.sleep(1.0)
            if self._client is not None:
                self._client.loop_misc()

    async def stop_consuming(self) -> None:
        # Unsubscribing would drop the shared subscription from the persistent session;
        # messages that arrive from now on are simply not handed out (no PUBACK), so the
        # session resends them to the next dispatcher with this client id.
        self._stopped = True

    async def close(self) -> None:
        self._closing = True
        await stop_tasks(self._tasks, grace=0)
        self._tasks = []
        if self._client is not None:
            # A DISCONNECT keeps the session (its expiry was given at connect).
            with contextlib.suppress(Exception):
                self._client.disconnect()
            await asyncio.sleep(0)
            sock = self._client.socket()
            if sock is not None:
                self._remove(sock)
            self._client = None
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._client is not None and self._connected

    # ------------------------------------------------------------------ receive
    async def deliveries(self) -> AsyncIterator[MQTTHandle]:
        while True:
            yield await self._incoming.get()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._stopped:
            return  # not acknowledged: the session resends it to the next dispatcher
        props = getattr(message, "properties", None)
        user = dict(getattr(props, "UserProperty", None) or [])
        headers = {str(k): str(v) for k, v in user.items()}
        content_type = getattr(props, "ContentType", None)
        message_id = headers.get(MESSAGE_ID_PROPERTY) or None
        topic = message.topic
        body = bytes(message.payload)
        identity = message_identity(message_id, body, {**headers, "mqtt-topic": topic})
        millis = headers.get("timestamp_in_ms", "")
        delivery = Delivery(
            source=self.name,
            identity=identity,
            body=body,
            message_id=message_id,
            headers=headers,
            content_type=str(content_type) if content_type else None,
            redelivered=bool(message.dup),
            delivery_count=2 if message.dup else 1,
            metadata={
                "topic": topic,
                "subscription": self._trigger.subscription,
                "client_id": self._trigger.client_id,
            },
            received_at=time.monotonic(),
            published_at=int(millis) / 1000 if millis.isdigit() else None,
        )
        self._incoming.put_nowait(MQTTHandle(delivery, message.mid, message.qos, self._generation))

    # ------------------------------------------------------------------ settle
    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, MQTTHandle):
            raise TypeError(f"not an MQTT message: {handle!r}")
        if decision.action is Action.REQUEUE:
            # MQTT has no negative acknowledgement: hand it out again from memory.
            assert self._loop is not None
            self._loop.call_later(1.0, self._incoming.put_nowait, handle)
            return True
        if decision.action is Action.DEAD_LETTER:
            d = handle.delivery
            await self._dead_letter(d.body, dict(d.headers), d.metadata.get("topic", ""), decision)
        return self._puback(handle)

    def _puback(self, handle: MQTTHandle) -> bool:
        if handle.qos == 0:
            return True
        if handle.generation != self._generation or not self.connected or self._client is None:
            # That connection is gone: the session resends the message (DUP) and the
            # resent delivery, which joins the same Job, is the one settled.
            return False
        result = self._client.ack(handle.mid, handle.qos)
        return result == paho.MQTT_ERR_SUCCESS

    def is_durable(self, handle: MessageHandle) -> bool:
        return True  # a PUBACK ends the broker's duty (a lost one resends: the Job adopts)

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        metadata = original.get("metadata") or {}
        await self._dead_letter(
            bytes(original["body"]),
            dict(original.get("headers") or {}),
            str(metadata.get("topic") or ""),
            decision,
        )

    async def _dead_letter(
        self, body: bytes, headers: dict[str, str], topic: str, decision: Decision
    ) -> None:
        """Publish the copy and wait for its PUBACK; until a session stores it, retry."""
        headers = {k: v for k, v in headers.items() if not k.startswith("x-jobrunner-")}
        headers.update(decision.reason_headers(scaledjob=self._scaledjob, source_topic=topic))
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [(k, v) for k, v in headers.items() if v]
        while True:
            reason = await self._publish(self.dead_letter_topic, body, properties)
            if reason.value == NO_MATCHING_SUBSCRIBERS:
                logger.error(
                    "dead-letter topic %s has no subscriber, so the broker dropped the copy; "
                    "the message stays unacknowledged and is dead-lettered again in %.0fs. "
                    "Subscribe a persistent session to it (QoS 1, clean start off), e.g. "
                    "mosquitto_sub -q 1 -c -i dead-letters -t '%s'",
                    self.dead_letter_topic,
                    DEAD_LETTER_RETRY_SECONDS,
                    self.dead_letter_topic,
                )
                await asyncio.sleep(DEAD_LETTER_RETRY_SECONDS)
                continue
            if reason.is_failure:
                raise SourceUnreachable(
                    f"{self.where}: dead-letter publish to {self.dead_letter_topic} refused "
                    f"({reason})"
                )
            return

    async def _publish(self, topic: str, body: bytes, properties: Properties) -> ReasonCode:
        while True:
            if self._client is None or not self.connected:
                await asyncio.sleep(0.5)
                continue
            assert self._loop is not None
            info = self._client.publish(topic, body, qos=1, properties=properties)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                await asyncio.sleep(0.5)
                continue
            future = self._loop.create_future()
            self._pubacks[info.mid] = future
            try:
                return await asyncio.wait_for(future, timeout=30)
            except (ConnectionError, TimeoutError) as exc:
                logger.warning(
                    "dead-letter publish not acknowledged (%s); publishing again",
                    describe_error(exc),
                )

    # ------------------------------------------------------------------ observability
    async def depth(self) -> int | None:
        return None  # MQTT has no queue to measure; the session's backlog is the broker's


def open_source(trigger: MQTTTrigger, *, scaledjob: ScaledJob, settings: Settings) -> MQTTSource:
    """The source for a resolved ``mqtt`` trigger (see jobrunner.manifest.triggers.mqtt)."""
    return MQTTSource(
        trigger=trigger,
        max_in_hand=scaledjob.spec.maxReplicaCount,
        dead_letter_topic=scaledjob.spec.deadLetter.topic
        or f"jobrunner/dead-letter/{scaledjob.name}",
        scaledjob=scaledjob.name,
    )
