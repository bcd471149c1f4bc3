"""Work that outlives the broker's delivery acknowledgement timeout (RabbitMQ's
``consumer_timeout``, shortened here to 4 s) is handed over to its Job before the broker
would cut the channel: the message is acked, the Job runs to its end exactly once, and a
failure is still dead-lettered from the copy of the message the Job keeps. Also the
``onJobCreation`` ack policy, which hands every message over at creation."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests import services
from tests.helpers import eventually
from tests.integration.harness import (
    Dispatcher,
    drain_queue,
    finished,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]
HANDOVER = {"JOBRUNNER_DISPATCHER__HANDOVER_MARGIN_SECONDS": "2.5"}


def rabbitmqctl(*args: str) -> None:
    ctl = services.setting("JOBRUNNER_TEST_RABBITMQCTL")
    if not ctl:
        services.missing("rabbitmqctl of the local stack", "JOBRUNNER_TEST_RABBITMQCTL is unset")
    subprocess.run([ctl, *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def short_consumer_timeout(rabbitmq_url: str) -> Iterator[None]:
    # Channel ticks every second so the broker enforces the timeout promptly.
    rabbitmqctl(
        "eval",
        "application:set_env(rabbit, consumer_timeout, 4000), "
        "application:set_env(rabbit, channel_tick_interval, 1000).",
    )
    try:
        yield
    finally:
        rabbitmqctl(
            "eval",
            "application:set_env(rabbit, consumer_timeout, 1800000), "
            "application:set_env(rabbit, channel_tick_interval, 60000).",
        )


@pytest.mark.usefixtures("short_consumer_timeout")
async def test_work_longer_than_consumer_timeout_is_handed_over_never_rerun(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = dispatchers(manifest(consumerTimeoutSeconds=4), HANDOVER)
    await publish(rabbitmq_url, queue, b'{"seconds": 10}', message_id="long")

    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=40)
    logs = dispatcher.logs()
    assert "handing it over to Job" in logs
    assert "adopted its existing Job" not in logs, "the message must not have come back"
    assert len(jobs_of(kube_api, namespace, "work")) == 1
    assert dispatcher.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    assert job.metadata.annotations["jobrunner.dev/handed-over"] == "true"


@pytest.mark.usefixtures("short_consumer_timeout")
async def test_failure_after_handover_is_dead_lettered_from_the_kept_copy(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatchers(manifest(consumerTimeoutSeconds=4), HANDOVER)
    body = b'{"seconds": 8, "fail": "failed"}'
    await publish(rabbitmq_url, queue, body, message_id="long-fail", headers={"tenant": "t1"})

    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Failed", within=40)
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=20)
    assert dead.body == body
    assert dead.message_id == "long-fail"
    assert dead.headers["tenant"] == "t1"
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert dead.headers["x-jobrunner-job"] == job.metadata.name


async def test_ack_on_creation_acks_at_once_and_dead_letters_failures_from_the_job(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest(ackPolicy="onJobCreation")
    first = dispatchers(path)
    await publish(rabbitmq_url, queue, b'{"seconds": 6, "fail": "failed"}', message_id="c1")
    await publish(rabbitmq_url, queue, b'{"seconds": 6}', message_id="c2")

    jobs = await wait_for_jobs(kube_api, namespace, "work", 2)
    await eventually(lambda: _count(first, "keeps it from now on", 2), within=20)
    # Acked while the Jobs still run: killing the dispatcher now returns nothing to the
    # queue, and the Jobs, the durable record, carry on.
    assert not any(finished(j) for j in jobs)
    first.kill()
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0

    # Whoever runs next settles the failure from the copy the Job keeps.
    second = dispatchers(path)
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=30)
    assert dead.message_id == "c1"
    assert dead.body == b'{"seconds": 6, "fail": "failed"}'
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    assert second.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    assert len(jobs_of(kube_api, namespace, "work")) == 2


async def _count(dispatcher: Dispatcher, text: str, n: int) -> bool:
    return dispatcher.logs().count(text) >= n
