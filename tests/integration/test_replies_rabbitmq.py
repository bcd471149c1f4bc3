"""Results back to the producer on RabbitMQ (jobrunner.dispatch.replies), on the real
stack: RabbitMQ's RPC pattern end to end — a client publishes with ``reply_to`` (its
exclusive reply queue) and ``correlation_id`` and waits on that queue for its Job's
result — and the reply that cannot go: a deleted reply queue, and addresses a hostile
publisher may not use, each dead-lettered ``ReplyFailed`` while the trigger is settled."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import pytest
from kubernetes import client

from tests.integration.harness import Dispatcher, drain_queue, queue_depth, wait_for_jobs
from tests.integration.realnode import on_real_node, real_node

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]


class RpcClient:
    """A client of RabbitMQ's RPC pattern: an exclusive, server-named reply queue on its
    own connection; ``call`` publishes with reply_to and a correlation id."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection
        self.replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        self.reply_queue: aio_pika.abc.AbstractQueue | None = None

    async def open(self) -> RpcClient:
        channel = await self.connection.channel()
        self.reply_queue = await channel.declare_queue("", exclusive=True)
        await self.reply_queue.consume(self.replies.put, no_ack=True)
        return self

    async def call(
        self, queue: str, body: bytes, *, correlation_id: str, reply_to: str = ""
    ) -> None:
        assert self.reply_queue is not None
        channel = await self.connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=f"msg-{correlation_id}",
                reply_to=reply_to or self.reply_queue.name,
                correlation_id=correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )

    async def reply(self, within: float = 90) -> aio_pika.abc.AbstractIncomingMessage:
        return await asyncio.wait_for(self.replies.get(), within)


@pytest.fixture
async def rpc(rabbitmq_url: str) -> AsyncIterator[RpcClient]:
    async with await aio_pika.connect(rabbitmq_url) as connection:
        yield await RpcClient(connection).open()


def _body(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(message.body)
    return value


async def test_an_rpc_client_gets_its_failed_jobs_result_on_its_reply_queue(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
    rpc: RpcClient,
) -> None:
    dispatcher = dispatchers(manifest())
    await rpc.call(queue, b'{"task": "t", "fail": "failed"}', correlation_id="c-1")

    reply = await rpc.reply()
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Failed")
    name = job.metadata.name
    assert reply.correlation_id == "c-1"
    assert reply.message_id == f"{name}/reply/failed"
    assert reply.content_type == "application/json"
    headers = reply.headers or {}
    assert headers["cloudEvents:id"] == f"{name}/reply/failed"
    assert headers["cloudEvents:type"] == "dev.jobrunner.job.failed"
    assert headers["cloudEvents:source"] == f"/jobrunner/{namespace}/work"
    body = _body(reply)
    assert body["outcome"] == "failed"
    assert body["reason"] == "BackoffLimitExceeded"
    assert body["exitCode"] == 1
    assert body["jobName"] == name
    assert body["messageId"] == "msg-c-1"
    assert body["correlationId"] == "c-1"
    # The KWOK pod's termination message (state.terminated.message) is the result.
    assert body["result"] == "failed on request (kwok.jobrunner.dev/outcome=failed)"
    # The failure is still dead-lettered, with its own reason (the reply went).
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=20)
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    await dispatcher.settled("dead-letter", 1)
    assert rpc.replies.empty()  # exactly one reply


@pytest.mark.real_node
async def test_an_rpc_round_trip_returns_the_containers_termination_message(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
    rpc: RpcClient,
) -> None:
    node = real_node(kube_api)
    script = (
        "n=$(echo \"$JOBRUNNER_MESSAGE\" | sed 's/[^0-9]//g'); "
        "printf '{\"double\": %d}' $((n * 2)) > /dev/termination-log"
    )
    job_spec = on_real_node(
        node, [{"name": "work", "image": "busybox", "command": ["sh", "-c", script]}]
    )
    dispatcher = dispatchers(manifest(job_spec=job_spec, maxReplicaCount=2))
    await rpc.call(queue, b'{"n": 21}', correlation_id="rt-1")

    reply = await rpc.reply(within=120)
    body = _body(reply)
    assert reply.correlation_id == "rt-1"
    assert (body["outcome"], body["exitCode"]) == ("succeeded", 0)
    assert body["reason"] in ("Complete", "CompletionsReached")  # the Job's own (k8s 1.31+)
    assert json.loads(body["result"]) == {"double": 42}
    assert body["durationSeconds"] is not None
    assert body["durationSeconds"] >= 0
    assert reply.message_id == f"{body['jobName']}/reply/succeeded"
    await dispatcher.settled("ack", 1)
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    assert rpc.replies.empty()


async def test_a_reply_to_a_deleted_queue_dead_letters_the_message_reply_failed(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
    rpc: RpcClient,
) -> None:
    dispatcher = dispatchers(manifest())
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        gone = await channel.declare_queue(f"{queue}-replies", durable=False)
        await rpc.call(queue, b'{"seconds": 3}', correlation_id="late", reply_to=gone.name)
        await wait_for_jobs(kube_api, namespace, "work", 1)
        await gone.delete(if_unused=False, if_empty=False)

    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=30)
    assert dead.headers["x-jobrunner-reason"] == "ReplyFailed"
    detail = str(dead.headers["x-jobrunner-detail"])
    assert f"queue '{queue}-replies'" in detail
    assert "unroutable" in detail
    assert "the Job succeeded" in detail
    assert dead.headers["x-jobrunner-job"] == job.metadata.name
    assert dead.body == b'{"seconds": 3}'
    # Settled, not blocked: the trigger queue is empty and the dispatcher goes on.
    await dispatcher.settled("dead-letter", 1)
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


@pytest.mark.parametrize(
    "reply_to",
    ["amq.topic/other.tenant", "amqp://elsewhere:5672/vhost/q", "amq.direct", "SELF"],
)
async def test_a_hostile_reply_to_is_refused_and_dead_lettered_with_nothing_published(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
    rpc: RpcClient,
    reply_to: str,
) -> None:
    dispatcher = dispatchers(manifest())
    target = queue if reply_to == "SELF" else reply_to
    await rpc.call(queue, b'{"task": "t"}', correlation_id="evil", reply_to=target)

    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=30)
    assert dead.headers["x-jobrunner-reason"] == "ReplyFailed"
    await dispatcher.settled("dead-letter", 1)
    # Nothing went back into the trigger queue (no loop), nor to the client.
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    assert rpc.replies.empty()
