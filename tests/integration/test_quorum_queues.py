"""RabbitMQ quorum queues (the kind RabbitMQ recommends for durable work): jobrunner runs
on them unchanged, their delivery limit never drops a message behind jobrunner's back,
and their own at-least-once dead-lettering target receives jobrunner's dead letters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from kubernetes import client

from tests.integration.harness import (
    Dispatcher,
    drain_queue,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
    write_manifest,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]


async def declare(url: str, name: str, **arguments: Any) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum", **arguments}
        )


@pytest.fixture
async def quorum(rabbitmq_url: str) -> AsyncIterator[str]:
    name = f"qq-{uuid.uuid4().hex[:10]}"
    yield name
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        for queue in (name, f"{name}.dead-letter", f"{name}.dlq"):
            await channel.queue_delete(queue)


def quorum_manifest(tmp_path: Path, namespace: str, queue: str, url: str) -> Path:
    return write_manifest(
        tmp_path / "qq.yaml", name="work", namespace=namespace, queue=queue, url=url
    )


async def test_jobrunner_runs_on_a_quorum_queue_unchanged(
    kube_api: client.ApiClient,
    namespace: str,
    quorum: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    await declare(rabbitmq_url, quorum)
    dispatcher = dispatchers(quorum_manifest(tmp_path, namespace, quorum, rabbitmq_url))
    await publish(rabbitmq_url, quorum, b"{}", message_id="ok-1")
    await publish(rabbitmq_url, quorum, b"{}", message_id="ok-2")
    await publish(rabbitmq_url, quorum, b'{"fail": "failed"}', message_id="bad")
    await dispatcher.settled("ack", 2)
    await dispatcher.settled("dead-letter", 1)
    [dead] = await drain_queue(rabbitmq_url, f"{quorum}.dead-letter", wait=10)
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert len(jobs_of(kube_api, namespace, "work")) == 3
    assert (await queue_depth(rabbitmq_url, quorum))[0] == 0


async def test_repeated_dispatcher_crashes_never_let_the_delivery_limit_drop_a_message(
    kube_api: client.ApiClient,
    namespace: str,
    quorum: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    # The broker drops a message returned more than twice. Each SIGKILL returns it; after
    # the first, jobrunner sees one return left and hands the message to its Job, so the
    # third crash finds nothing to return and the Job's failure is still dead-lettered.
    await declare(rabbitmq_url, quorum, **{"x-delivery-limit": 2})
    path = quorum_manifest(tmp_path, namespace, quorum, rabbitmq_url)
    first = dispatchers(path)
    await publish(rabbitmq_url, quorum, b'{"seconds": 15, "fail": "failed"}', message_id="fragile")
    await wait_for_jobs(kube_api, namespace, "work", 1)
    assert "delivery limit 2" in first.logs()
    first.kill()
    second = dispatchers(path)

    async def handed_over() -> bool:
        return "near the queue's delivery limit (1 return(s) left)" in second.logs()

    from tests.helpers import eventually

    await eventually(handed_over, within=60)
    second.kill()
    third = dispatchers(path)
    [dead] = await drain_queue(rabbitmq_url, f"{quorum}.dead-letter", wait=90)
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert dead.headers["x-jobrunner-message-id"] == "fragile"
    assert len(jobs_of(kube_api, namespace, "work")) == 1, "one Job, however many crashes"
    assert (await queue_depth(rabbitmq_url, quorum))[0] == 0
    await asyncio.sleep(1)
    assert await drain_queue(rabbitmq_url, f"{quorum}.dead-letter", wait=1) == []
    assert third.process is not None
    assert third.process.poll() is None


async def test_dead_letters_go_to_the_quorum_queues_own_at_least_once_target(
    kube_api: client.ApiClient,
    namespace: str,
    quorum: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dlq = f"{quorum}.dlq"
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(dlq, durable=True, arguments={"x-queue-type": "quorum"})
    await declare(
        rabbitmq_url,
        quorum,
        **{
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dlq,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    dispatcher = dispatchers(quorum_manifest(tmp_path, namespace, quorum, rabbitmq_url))
    await publish(rabbitmq_url, quorum, b'{"fail": "failed"}', message_id="to-dlq")
    await dispatcher.settled("dead-letter", 1)
    [dead] = await drain_queue(rabbitmq_url, dlq, wait=10)
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert dead.message_id == "to-dlq"
    assert "exchange ''" in dispatcher.logs() or f"routing key {dlq}" in dispatcher.logs()
