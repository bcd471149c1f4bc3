"""The newer sources end to end, each on its real server (SQS on ElasticMQ, Redis
Streams, NATS JetStream, MQTT on Mosquitto) and the real cluster: every behaviour below
runs once per source. The brokers' redelivery timers are shortened to ``brokers.TIMER``
seconds (MQTT has none: a live connection never redelivers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.helpers import eventually
from tests.integration.brokers import KITS, TIMER, Kit, make_kit
from tests.integration.harness import Dispatcher, busybox_job, finished, jobs_of, wait_for_jobs

pytestmark = [pytest.mark.kube]


@pytest.fixture(params=[pytest.param(k, marks=getattr(pytest.mark, k)) for k in KITS])
async def kit(request: pytest.FixtureRequest) -> AsyncIterator[Kit]:
    made = make_kit(request.param, request)
    await made.prepare()
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
def manifest(tmp_path: Path, namespace: str, kit: Kit) -> Callable[..., Path]:
    def make(name: str = "work", trigger: dict[str, str] | None = None, **spec: Any) -> Path:
        doc = {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "jobTargetRef": busybox_job(),
                "triggers": [kit.trigger(**(trigger or {}))],
                **kit.spec(),
                **spec,
            },
        }
        path = tmp_path / f"{name}-{kit.name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return make


def start(
    dispatchers: Callable[..., Dispatcher], kit: Kit, path: Path, index: int = 0, **env: str
) -> Dispatcher:
    return dispatchers(path, {**kit.dispatcher_env(index), **env})


async def all_settled(kit: Kit) -> None:
    """The broker holds nothing more for the consumer (where it can tell)."""

    async def empty() -> bool:
        left = await kit.remaining()
        return left is None or left == 0

    await eventually(empty, within=30, interval=0.5)


def message_ids(jobs: list[Any]) -> list[str]:
    return sorted(j.metadata.annotations.get("jobrunner.dev/message-id", "") for j in jobs)


async def test_each_message_becomes_one_job_and_a_redelivery_adopts_it(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest()
    first = start(dispatchers, kit, path)
    await kit.publish(b'{"task": "quick"}', message_id="quick")
    await kit.publish(b'{"seconds": 10}', message_id="long")
    await first.settled("ack", 1)
    jobs = await wait_for_jobs(kube_api, namespace, "work", 2)
    assert {j.metadata.labels["jobrunner.dev/source"] for j in jobs} == {kit.trigger()["type"]}
    # Killed while the long Job runs: its message comes back (after the broker's timer,
    # a claim, or the session's resend) and must find the Job it already has.
    first.kill()
    second = start(dispatchers, kit, path)
    await second.settled("ack", 1, within=90)
    assert "adopted its existing Job" in second.logs()
    jobs = jobs_of(kube_api, namespace, "work")
    assert len(jobs) == 2, "one Job per message"
    assert all(finished(j) == "Complete" for j in jobs)
    assert second.logs().count("created Job") == 0
    await all_settled(kit)


async def test_failed_job_is_dead_lettered_with_reason(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = start(dispatchers, kit, manifest())
    await kit.publish(b'{"task": "t", "fail": "failed"}', message_id="doomed")
    await kit.publish(b"<xml>not json</xml>", message_id="unusable")
    dead = await kit.dead_letters(2, within=60)
    reasons = {d.body: d.headers.get("x-jobrunner-reason") for d in dead}
    assert reasons == {
        b'{"task": "t", "fail": "failed"}': "BackoffLimitExceeded",
        b"<xml>not json</xml>": "InvalidMessage",
    }
    [job] = jobs_of(kube_api, namespace, "work")
    failed = next(d for d in dead if d.headers["x-jobrunner-reason"] == "BackoffLimitExceeded")
    assert failed.headers["x-jobrunner-job"] == job.metadata.name
    assert failed.headers.get("test-id", failed.headers.get("message-id")) == "doomed"
    await dispatcher.settled("dead-letter", 2)
    await all_settled(kit)


async def test_a_failure_after_the_ack_is_dead_lettered_from_the_copy_the_job_keeps(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    """``ackPolicy: onJobCreation``: the message is settled once the Job exists, so its
    failure is dead-lettered from the copy kept with the Job (``dead_letter_copy``)."""
    dispatcher = start(dispatchers, kit, manifest(ackPolicy="onJobCreation"))
    body = b'{"task": "kept", "fail": "failed", "seconds": 2}'
    await kit.publish(body, message_id="kept")
    [dead] = await kit.dead_letters(1, within=60)
    assert dead.body == body
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    [job] = jobs_of(kube_api, namespace, "work")
    assert dead.headers["x-jobrunner-job"] == job.metadata.name
    assert dispatcher.settlements("ack") == 1, "acked at creation"
    await all_settled(kit)


async def test_a_job_longer_than_the_redelivery_timer_is_neither_redelivered_nor_cut_off(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    seconds = TIMER * 4
    dispatcher = start(dispatchers, kit, manifest())
    await kit.publish(json.dumps({"seconds": seconds}).encode(), message_id="long")
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=90)
    await dispatcher.settled("ack", 1)
    logs = dispatcher.logs()
    assert "adopted" not in logs
    assert "redelivered" not in logs
    assert "joins Job" not in logs
    assert "handing it over" not in logs, "kept alive, not handed over"
    assert len(jobs_of(kube_api, namespace, "work")) == 1
    assert job.metadata.annotations.get("jobrunner.dev/handed-over") is None
    await all_settled(kit)


async def test_sigkill_before_settling_then_restart_settles_each_message_once(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest()
    first = start(
        dispatchers, kit, path, JOBRUNNER_DISPATCHER__FAILPOINTS=json.dumps(["before-settle"])
    )
    ids = [f"m{i}" for i in range(3)]
    for message_id in ids:
        await kit.publish(json.dumps({"task": message_id}).encode(), message_id=message_id)
    await asyncio.to_thread(first.process.wait, 60)  # type: ignore[union-attr]
    assert first.process.returncode == -9  # type: ignore[union-attr]

    second = start(dispatchers, kit, path)
    await second.settled("ack", 3, within=90)
    await wait_for_jobs(kube_api, namespace, "work", 3, state="Complete")
    jobs = jobs_of(kube_api, namespace, "work")
    assert len(jobs) == 3, "exactly one Job per message"
    assert len({j.metadata.name for j in jobs}) == 3
    assert second.logs().count("created Job") + first.logs().count("created Job") == 3
    assert second.settlements("ack") == 3
    assert second.settlements("dead-letter") == 0
    await all_settled(kit)


async def test_two_dispatchers_share_the_work_without_a_duplicate_job(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest(maxReplicaCount=3)
    one = start(dispatchers, kit, path, 0)
    two = start(dispatchers, kit, path, 1)
    await asyncio.sleep(2)  # both connected and subscribed before the burst
    for i in range(12):
        await kit.publish(json.dumps({"seconds": 2, "task": f"t{i}"}).encode(), message_id=f"s{i}")
    jobs = await wait_for_jobs(kube_api, namespace, "work", 12, state="Complete", within=120)
    assert len(jobs) == 12
    assert len({j.metadata.name for j in jobs}) == 12

    async def all_acked() -> bool:
        return one.settlements("ack") + two.settlements("ack") >= 12

    await eventually(all_acked, within=60, interval=0.3)
    created = one.logs().count("created Job"), two.logs().count("created Job")
    assert sum(created) == 12, f"no Job created twice: {created}"
    assert min(created) > 0, f"both dispatchers took work: {created}"
    await all_settled(kit)


async def test_broker_restart_mid_run_loses_nothing_and_runs_nothing_twice(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    kit.for_broker_restart()
    dispatcher = start(dispatchers, kit, manifest())
    await kit.publish(b'{"seconds": 10}', message_id="before")
    [running] = await wait_for_jobs(kube_api, namespace, "work", 1)
    await kit.restart_broker()

    async def published() -> bool:
        try:
            await kit.publish(b'{"task": "after"}', message_id="after")
        except Exception:
            return False
        return True

    await eventually(published, within=60, interval=1)
    await dispatcher.settled("ack", 2, within=120)
    jobs = jobs_of(kube_api, namespace, "work")
    assert len(jobs) == 2
    assert running.metadata.uid in {j.metadata.uid for j in jobs}, "the running Job was kept"
    assert all(finished(j) == "Complete" for j in jobs)
    await all_settled(kit)


async def test_active_jobs_peak_at_exactly_max_replica_count(
    kube_api: client.ApiClient,
    namespace: str,
    kit: Kit,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = start(dispatchers, kit, manifest(maxReplicaCount=2))
    for i in range(6):
        await kit.publish(json.dumps({"seconds": 3, "task": f"p{i}"}).encode(), message_id=f"p{i}")
    peak, jobs = 0, []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while loop.time() < deadline:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        peak = max(peak, sum(1 for j in jobs if finished(j) is None))
        if len(jobs) == 6 and all(finished(j) for j in jobs):
            break
        await asyncio.sleep(0.2)
    assert len(jobs) == 6
    assert peak == 2
    await dispatcher.settled("ack", 6)
    await all_settled(kit)


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        pytest.param("sqs", "does not exist; create it", marks=pytest.mark.sqs),
        pytest.param("redis", "does not exist; create it with its group", marks=pytest.mark.redis),
        pytest.param("nats", "does not exist; create it", marks=pytest.mark.nats),
    ],
)
async def test_a_missing_queue_or_stream_is_reported_and_consumed_once_created(
    kind: str,
    said: str,
    request: pytest.FixtureRequest,
    kube_api: client.ApiClient,
    namespace: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    """MQTT has no counterpart: a topic exists as soon as something is published to it."""
    kit = make_kit(kind, request)
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work", "namespace": namespace},
        "spec": {"jobTargetRef": busybox_job(), "triggers": [kit.trigger()], **kit.spec()},
    }
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(doc))
    dispatcher = start(dispatchers, kit, path)
    try:

        async def reported() -> bool:
            return said in dispatcher.logs()

        await eventually(reported, within=60, interval=0.3)
        assert dispatcher.process is not None
        assert dispatcher.process.poll() is None, "it waits; it does not exit"
        await kit.prepare()
        await kit.publish(b'{"task": "late"}', message_id="late")
        await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=90)
        await dispatcher.settled("ack", 1, within=60)
    finally:
        await kit.cleanup()


@pytest.mark.redis
@pytest.mark.parametrize(("password", "works"), [("right", True), ("wrong", False)])
async def test_redis_credentials_come_from_the_trigger_authentication(
    password: str,
    works: bool,
    request: pytest.FixtureRequest,
    kube_api: client.ApiClient,
    namespace: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    """KEDA's redis-streams authentication parameters (``username``, ``password``) from a
    Secret through a TriggerAuthentication; refused credentials are one clear line and
    the dispatcher waits instead of exiting."""
    from tests import services

    user = services.setting("JOBRUNNER_TEST_REDIS_USER")
    secret = services.setting("JOBRUNNER_TEST_REDIS_PASSWORD")
    if not user or not secret:
        services.missing("Redis's ACL user", "JOBRUNNER_TEST_REDIS_USER is unset")
    kit = make_kit("redis", request)
    await kit.prepare()
    trigger = kit.trigger()
    trigger["authenticationRef"] = {"name": "redis-auth"}
    docs = [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {"jobTargetRef": busybox_job(), "triggers": [trigger]},
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "redis-auth", "namespace": namespace},
            "spec": {
                "secretTargetRef": [
                    {"parameter": p, "name": "redis-credentials", "key": p}
                    for p in ("username", "password")
                ]
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "redis-credentials", "namespace": namespace},
            "stringData": {"username": user, "password": secret if works else "wrong"},
        },
    ]
    path = tmp_path / "auth.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    dispatcher = start(dispatchers, kit, path)
    try:
        if works:
            await kit.publish(b'{"task": "authenticated"}')
            await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=60)
            await dispatcher.settled("ack", 1)
        else:

            async def refused() -> bool:
                return "credentials refused" in dispatcher.logs()

            await eventually(refused, within=60, interval=0.3)
            assert dispatcher.process is not None
            assert dispatcher.process.poll() is None
    finally:
        await kit.cleanup()


@pytest.mark.sqs
async def test_sqs_fifo_runs_a_message_groups_jobs_in_order_named_by_deduplication_id(
    request: pytest.FixtureRequest,
    kube_api: client.ApiClient,
    namespace: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    """SQS delivers no further message of a group while one is in flight, and the source
    holds each until its Job ends: one group's Jobs run one at a time, in order, while
    another group's run beside them. Each Job is named by the deduplication id."""
    import re

    from jobrunner.core.naming import job_name
    from tests.integration.brokers import SQSKit

    kit = make_kit("sqs", request)
    assert isinstance(kit, SQSKit)
    kit.name += ".fifo"
    async with kit._client() as sqs:
        url = (
            await sqs.create_queue(
                QueueName=kit.name,
                Attributes={"FifoQueue": "true", "VisibilityTimeout": str(TIMER)},
            )
        )["QueueUrl"]
        doc = {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {"jobTargetRef": busybox_job(), "triggers": [kit.trigger()]},
        }
        path = tmp_path / "fifo.yaml"
        path.write_text(yaml.safe_dump(doc))
        dispatcher = start(dispatchers, kit, path)
        sends = [("a", "a1", 3), ("a", "a2", 1), ("b", "b1", 1), ("a", "a3", 1)]
        for group, dedup, seconds in sends:
            await sqs.send_message(
                QueueUrl=url,
                MessageBody=json.dumps({"task": dedup, "seconds": seconds}),
                MessageGroupId=group,
                MessageDeduplicationId=dedup,
            )
    try:
        await dispatcher.settled("ack", 4, within=90)
        jobs = jobs_of(kube_api, namespace, "work")
        assert {j.metadata.name for j in jobs} == {job_name("work", d) for _, d, _ in sends}
        lines = dispatcher.logs().splitlines()

        def line_of(pattern: str) -> int:
            return next(i for i, line in enumerate(lines) if re.search(pattern, line))

        name = {d: job_name("work", d) for _, d, _ in sends}
        acked = {d: line_of(re.escape(f"acked the message (Job {name[d]})")) for d in name}
        created = {d: line_of(f"created Job {name[d]}") for d in name}
        # Group a: each Job starts only after the previous one's message was settled.
        assert acked["a1"] < created["a2"]
        assert acked["a2"] < created["a3"]
        # Group b did not wait for group a.
        assert created["b1"] < acked["a1"]
    finally:
        await kit.cleanup()
