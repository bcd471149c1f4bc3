"""The Kafka path end to end on the real broker and cluster: one Job per record named by
(topic, partition, offset), commits that never pass unfinished work, dead letters to a
topic, rebalances between two dispatchers, per-key ordering."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from kubernetes import client

from jobrunner.core.naming import job_name
from tests.helpers import eventually
from tests.integration.harness import Dispatcher, busybox_job, finished, jobs_of, wait_for_jobs

pytestmark = [pytest.mark.kube, pytest.mark.kafka]


@pytest.fixture
async def topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=2, replication_factor=1),
                NewTopic(f"{name}.dead-letter", num_partitions=1, replication_factor=1),
            ]
        )
        yield name
        await admin.delete_topics([name, f"{name}.dead-letter"])
    finally:
        await admin.close()


@pytest.fixture
def kafka_manifest(
    tmp_path: Path, namespace: str, topic: str, kafka_bootstrap: str
) -> Callable[..., Path]:
    group = f"g-{uuid.uuid4().hex[:8]}"

    def make(name: str = "work", **spec: Any) -> Path:
        doc = {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "jobTargetRef": busybox_job(),
                "triggers": [
                    {
                        "type": "kafka",
                        "metadata": {
                            "bootstrapServers": kafka_bootstrap,
                            "topic": topic,
                            "consumerGroup": group,
                            "offsetResetPolicy": "earliest",
                        },
                    }
                ],
                **spec,
            },
        }
        path = tmp_path / f"{name}-kafka.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    make.group = group  # type: ignore[attr-defined]
    return make


async def produce(
    servers: str, topic: str, records: list[tuple[int, bytes | None, dict[str, Any]]]
) -> list[tuple[int, int]]:
    """(partition, key, value) -> [(partition, offset)] as the broker stored them."""
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    try:
        out = []
        for partition, key, value in records:
            meta = await producer.send_and_wait(
                topic, json.dumps(value).encode(), key=key, partition=partition
            )
            out.append((meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


async def committed(servers: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def committed_metadata(servers: str, group: str, topic: str) -> dict[int, tuple[int, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {
        tp.partition: (meta.offset, meta.metadata)
        for tp, meta in offsets.items()
        if tp.topic == topic
    }


async def read_all(servers: str, topic: str, count: int, within: float = 30) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=f"r-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + within
        while len(out) < count and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


def names_for(topic: str, stored: list[tuple[int, int]]) -> set[str]:
    return {job_name("work", f"{topic}/{p}/{o}") for p, o in stored}


async def test_each_record_becomes_one_job_named_by_its_offset_and_is_committed(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = dispatchers(kafka_manifest())
    stored = await produce(
        kafka_bootstrap,
        topic,
        [(0, b"a", {"task": "x"}), (1, b"b", {"task": "y"}), (0, b"c", {"task": "z"})],
    )
    jobs = await wait_for_jobs(kube_api, namespace, "work", 3, state="Complete", within=60)
    assert {j.metadata.name for j in jobs} == names_for(topic, stored)
    assert {j.metadata.labels["jobrunner.dev/source"] for j in jobs} == {"kafka"}
    await dispatcher.settled("ack", 3)

    async def all_committed() -> bool:
        return await committed(kafka_bootstrap, kafka_manifest.group, topic) == {0: 2, 1: 1}  # type: ignore[attr-defined]

    await eventually(all_committed, within=20, interval=0.5)


async def test_commit_never_passes_an_unfinished_record_and_a_crash_relaunches_nothing(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = kafka_manifest()
    first = dispatchers(path)
    stored = await produce(
        kafka_bootstrap,
        topic,
        [(0, None, {"seconds": 10}), (0, None, {"task": "quick"}), (0, None, {"seconds": 10})],
    )
    # The second record finishes first; the first still runs, so the offset stays at 0,
    # and the commit's metadata names the settled record above it (distance 1).
    await first.settled("ack", 1, within=60)
    assert await committed_metadata(kafka_bootstrap, kafka_manifest.group, topic) == {  # type: ignore[attr-defined]
        0: (0, "jr1:1")
    }
    # Killed now: the unfinished records are replayed and adopt their Jobs; the settled
    # one is skipped, not replayed.
    first.kill()
    second = dispatchers(path)
    await second.settled("ack", 2, within=60)
    jobs = jobs_of(kube_api, namespace, "work")
    assert {j.metadata.name for j in jobs} == names_for(topic, stored), "nothing launched twice"
    assert all(finished(j) == "Complete" for j in jobs)
    assert second.logs().count("adopted its existing Job") == 2
    quick = job_name("work", f"{topic}/0/1")
    assert quick not in second.logs(), "the settled record is not handed out again"

    async def all_committed() -> bool:
        return await committed(kafka_bootstrap, kafka_manifest.group, topic) == {0: 3}  # type: ignore[attr-defined]

    await eventually(all_committed, within=20, interval=0.5)


async def test_failed_job_and_unusable_record_go_to_the_dead_letter_topic(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = dispatchers(kafka_manifest())
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"fail": "failed"}', key=b"k1", partition=0)
        await producer.send_and_wait(topic, b"not json", key=b"k2", partition=0)
    finally:
        await producer.stop()
    dead = await read_all(kafka_bootstrap, f"{topic}.dead-letter", 2)
    reasons = {r.key: dict(r.headers)["x-jobrunner-reason"].decode() for r in dead}
    assert reasons == {b"k1": "BackoffLimitExceeded", b"k2": "InvalidMessage"}
    await dispatcher.settled("dead-letter", 2)

    async def moved_on() -> bool:
        return await committed(kafka_bootstrap, kafka_manifest.group, topic) == {0: 2}  # type: ignore[attr-defined]

    await eventually(moved_on, within=20, interval=0.5)


async def test_two_dispatchers_with_a_rebalance_mid_run_launch_every_record_once(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = kafka_manifest(maxReplicaCount=20)
    first = dispatchers(path)
    stored = await produce(
        kafka_bootstrap, topic, [(i % 2, None, {"seconds": 2}) for i in range(10)]
    )
    await wait_for_jobs(kube_api, namespace, "work", 3, within=60)
    second = dispatchers(path)  # joins the group: partitions move mid-run

    async def rebalanced() -> bool:
        return "partitions assigned" in second.logs()

    await eventually(rebalanced, within=60, interval=0.5)
    stored += await produce(
        kafka_bootstrap, topic, [(i % 2, None, {"seconds": 1}) for i in range(10)]
    )
    jobs = await wait_for_jobs(kube_api, namespace, "work", 20, state="Complete", within=120)
    assert len(jobs) == 20
    assert {j.metadata.name for j in jobs} == names_for(topic, stored)

    async def all_committed() -> bool:
        return await committed(kafka_bootstrap, kafka_manifest.group, topic) == {0: 10, 1: 10}  # type: ignore[attr-defined]

    await eventually(all_committed, within=60, interval=0.5)
    assert "partitions revoked" in first.logs()


async def test_per_key_ordering_starts_a_keys_next_job_after_the_previous_finished(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    dispatcher = dispatchers(kafka_manifest(ordering="perKey"))
    stored = await produce(
        kafka_bootstrap,
        topic,
        [
            (0, b"same", {"seconds": 4}),
            (0, b"same", {"task": "next"}),
            (0, b"other", {"task": "free"}),
        ],
    )
    await dispatcher.settled("ack", 3, within=60)
    first, second, other = (job_name("work", f"{topic}/{p}/{o}") for p, o in stored)
    logs = dispatcher.logs()

    def line_of(pattern: str) -> int:
        return next(i for i, line in enumerate(logs.splitlines()) if pattern in line)

    # "other" did not wait; "next" was created only after "first" was settled.
    assert line_of(f"created Job {other}") < line_of(f"acked the message (Job {first})")
    assert line_of(f"acked the message (Job {first})") < line_of(f"created Job {second}")


async def test_backpressure_pauses_partitions_without_a_rebalance_and_lag_is_exposed(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    from tests.integration.test_observability import free_port, get, samples

    port = free_port()
    dispatcher = dispatchers(
        kafka_manifest(maxReplicaCount=1),
        {
            "JOBRUNNER_TELEMETRY__HTTP_PORT": str(port),
            "JOBRUNNER_TELEMETRY__QUEUE_DEPTH_INTERVAL_SECONDS": "0.5",
        },
    )
    await produce(kafka_bootstrap, topic, [(0, None, {"seconds": 3}) for _ in range(3)])

    def lag() -> float | None:
        try:
            values = samples(get(f"http://127.0.0.1:{port}/metrics")[1])
        except OSError:
            return None
        key = (
            "jobrunner_consumer_lag_messages",
            (("namespace", namespace), ("partition", "0"), ("scaledjob", "work"), ("topic", topic)),
        )
        return values.get(key)

    peak_active, peak_lag = 0, 0.0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    while loop.time() < deadline:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        peak_active = max(peak_active, sum(1 for j in jobs if finished(j) is None))
        peak_lag = max(peak_lag, await asyncio.to_thread(lag) or 0)
        if len(jobs) == 3 and all(finished(j) for j in jobs):
            break
        await asyncio.sleep(0.3)
    assert peak_active == 1, "maxReplicaCount=1 holds while the consumer keeps polling"
    assert peak_lag >= 2, "the records waiting behind the paused partition show as lag"
    await dispatcher.settled("ack", 3)

    async def caught_up() -> bool:
        return await asyncio.to_thread(lag) == 0

    await eventually(caught_up, within=20, interval=0.5)
    # Paused, not evicted: the group never rebalanced away from this consumer.
    assert "partitions revoked" not in dispatcher.logs()


async def test_sasl_credentials_come_from_the_trigger_authentication_secret(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    import base64

    from tests import services

    sasl_servers = services.setting("JOBRUNNER_TEST_KAFKA_SASL_BOOTSTRAP")
    if not sasl_servers:
        services.missing("Kafka's SASL listener", "JOBRUNNER_TEST_KAFKA_SASL_BOOTSTRAP is unset")
    secret = {
        "sasl": "plaintext",
        "username": services.setting("JOBRUNNER_TEST_KAFKA_SASL_USER"),
        "password": services.setting("JOBRUNNER_TEST_KAFKA_SASL_PASSWORD"),
    }
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="kafka-credentials"),
            data={k: base64.b64encode(str(v).encode()).decode() for k, v in secret.items()},
        ),
    )
    docs = [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {
                "jobTargetRef": busybox_job(),
                "triggers": [
                    {
                        "type": "kafka",
                        "metadata": {
                            "bootstrapServers": sasl_servers,
                            "topic": topic,
                            "consumerGroup": f"g-{uuid.uuid4().hex[:6]}",
                            "offsetResetPolicy": "earliest",
                        },
                        "authenticationRef": {"name": "kafka-auth"},
                    }
                ],
            },
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "kafka-auth", "namespace": namespace},
            "spec": {
                "secretTargetRef": [
                    {"parameter": p, "name": "kafka-credentials", "key": p}
                    for p in ("sasl", "username", "password")
                ]
            },
        },
    ]
    path = tmp_path / "sasl.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    dispatcher = dispatchers(path)
    stored = await produce(kafka_bootstrap, topic, [(0, None, {"task": "authenticated"})])
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=60)
    assert job.metadata.name in names_for(topic, stored)
    await dispatcher.settled("ack", 1)


async def test_a_job_longer_than_max_poll_interval_keeps_its_partitions(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    """max.poll.interval.ms shortened to 3 s, a Job of 12 s, partitions paused at
    maxReplicaCount=1 with a second record waiting: the consumer keeps polling, so the
    group never evicts it and nothing is revoked or run twice."""
    dispatcher = dispatchers(
        kafka_manifest(maxReplicaCount=1),
        {
            "JOBRUNNER_KAFKA__MAX_POLL_INTERVAL_MS": "3000",
            "JOBRUNNER_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "JOBRUNNER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        },
    )
    stored = await produce(
        kafka_bootstrap, topic, [(0, None, {"seconds": 12}), (0, None, {"task": "after"})]
    )
    await dispatcher.settled("ack", 2, within=90)
    jobs = jobs_of(kube_api, namespace, "work")
    assert {j.metadata.name for j in jobs} == names_for(topic, stored)
    logs = dispatcher.logs()
    assert "partitions revoked" not in logs
    assert logs.count("partitions assigned") == 1


async def test_tls_ca_comes_from_the_trigger_authentication_secret(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    import base64

    from tests import services

    tls_servers = services.setting("JOBRUNNER_TEST_KAFKA_TLS_BOOTSTRAP")
    ca_path = services.setting("JOBRUNNER_TEST_KAFKA_TLS_CA")
    if not tls_servers or not ca_path:
        services.missing("Kafka's TLS listener", "JOBRUNNER_TEST_KAFKA_TLS_BOOTSTRAP is unset")
    secret = {"tls": "enable", "ca": await asyncio.to_thread(Path(str(ca_path)).read_text)}
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="kafka-tls"),
            data={k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
        ),
    )
    docs = [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {
                "jobTargetRef": busybox_job(),
                "triggers": [
                    {
                        "type": "kafka",
                        "metadata": {
                            "bootstrapServers": tls_servers,
                            "topic": topic,
                            "consumerGroup": f"g-{uuid.uuid4().hex[:6]}",
                            "offsetResetPolicy": "earliest",
                        },
                        "authenticationRef": {"name": "kafka-tls"},
                    }
                ],
            },
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "kafka-tls", "namespace": namespace},
            "spec": {
                "secretTargetRef": [
                    {"parameter": p, "name": "kafka-tls", "key": p} for p in ("tls", "ca")
                ]
            },
        },
    ]
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    dispatcher = dispatchers(path)
    stored = await produce(kafka_bootstrap, topic, [(1, None, {"task": "encrypted"})])
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=60)
    assert job.metadata.name in names_for(topic, stored)
    await dispatcher.settled("ack", 1)


async def test_jobrunners_dead_letter_reader_skips_an_aborted_transactions_dead_letter(
    topic: str, kafka_bootstrap: str
) -> None:
    """A dispatcher that dies inside a dead letter's transaction leaves an aborted copy
    in the topic (the record is dead-lettered again by the next owner): read committed,
    ``jobrunner dead-letters`` does not list it."""
    from jobrunner.sources.kafka import KafkaDeadLetters

    dead = f"{topic}.dead-letter"
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"test.{topic}", acks="all"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(dead, b"aborted", key=b"k")
        await producer.abort_transaction()
        await producer.begin_transaction()
        await producer.send_and_wait(dead, b"kept", key=b"k")
        await producer.commit_transaction()
    finally:
        await producer.stop()
    letters = KafkaDeadLetters(
        bootstrap_servers=kafka_bootstrap, topic=topic, dead_letter_topic=dead
    )
    try:
        assert [d.body for d in await letters.read(limit=10)] == [b"kept"]
    finally:
        await letters.close()


async def test_a_dispatcher_killed_between_a_dead_letter_and_its_commit_leaves_one_dead_letter(
    kube_api: client.ApiClient,
    namespace: str,
    topic: str,
    kafka_bootstrap: str,
    kafka_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    """The window of the issue: the dead letter is on the topic, the offset that
    settles its record is not committed, and the dispatcher dies (SIGKILL at the
    failpoint). The next dispatcher dead-letters the record again; the first copy's
    transaction is aborted (fenced by the partition's transactional id), so a
    read_committed consumer sees one dead letter, and the offset moves on once."""
    path = kafka_manifest()
    env = {
        "JOBRUNNER_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "JOBRUNNER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
    }
    first = dispatchers(
        path, {**env, "JOBRUNNER_DISPATCHER__FAILPOINTS": '["after-dead-letter-sent"]'}
    )
    await produce(kafka_bootstrap, topic, [(0, b"k", {"fail": "failed"})])
    await asyncio.to_thread(first.process.wait, 60)  # type: ignore[union-attr]
    assert first.process.returncode == -9  # type: ignore[union-attr]
    assert "failpoint after-dead-letter-sent reached" in first.logs()

    second = dispatchers(path, env)
    await second.settled("dead-letter", 1, within=90)
    assert "adopted its existing Job" in second.logs()

    async def moved_on() -> bool:
        return await committed(kafka_bootstrap, kafka_manifest.group, topic) == {0: 1}  # type: ignore[attr-defined]

    await eventually(moved_on, within=20, interval=0.5)
    from tests.integration.test_kafka_chaos import read_committed

    letters = await read_committed(kafka_bootstrap, f"{topic}.dead-letter")
    assert [dict(r.headers)["x-jobrunner-reason"] for r in letters] == [b"BackoffLimitExceeded"]
    # Both copies are in the log; the first one's transaction was aborted.
    assert len(await read_all(kafka_bootstrap, f"{topic}.dead-letter", 2, within=10)) == 2


async def test_a_functions_kafka_outputs_are_published_in_the_transaction_that_settles_it(
    topic: str, kafka_bootstrap: str
) -> None:
    """The source carries outputs to a topic of its own cluster (same credentials):
    published with the record's offset commit, all or nothing. A failure between the
    outputs and the commit (here raised at the failpoint) leaves an aborted copy only;
    settled again, the output is there once for a read_committed consumer."""
    from jobrunner.core.failpoints import Failpoints, InjectedFault
    from jobrunner.core.models import Action, Decision, OutputMessage
    from jobrunner.manifest.triggers.kafka import KafkaTrigger
    from jobrunner.sources.kafka import KafkaSink, KafkaSource, connection_of
    from tests.integration.test_kafka_chaos import read_committed

    out = f"{topic}.out"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(out, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    group = f"g-{uuid.uuid4().hex[:8]}"
    trigger = KafkaTrigger(kafka_bootstrap, topic, group, "earliest")
    await produce(kafka_bootstrap, topic, [(0, None, {"task": "x"})])
    source = KafkaSource(
        bootstrap_servers=kafka_bootstrap,
        topic=topic,
        group_id=group,
        offset_reset="earliest",
        max_in_hand=10,
        dead_letter_topic=f"{topic}.dead-letter",
        failpoints=Failpoints(["raise:after-output-sent"]),
        connection=connection_of(trigger),
    )
    sink = KafkaSink(KafkaTrigger(kafka_bootstrap, out, group, "earliest"))
    elsewhere = KafkaSink(KafkaTrigger(kafka_bootstrap, out, group, "earliest", "plaintext"))
    await source.start()
    try:
        assert source.carries(sink)
        assert not source.carries(elsewhere), "other credentials: published on their own"
        handle = await asyncio.wait_for(anext(source.deliveries()), timeout=60)
        decision = Decision(
            Action.ACK, job_name="j", outputs=(OutputMessage(sink, b"receipt", "j/out/0"),)
        )
        with pytest.raises(InjectedFault):
            await source.settle(handle, decision)
        assert not source.is_durable(handle)
        source._failpoints = Failpoints()
        assert await source.settle(handle, decision)
        assert source.is_durable(handle)
    finally:
        await source.close()
        await sink.close()
    letters = await read_committed(kafka_bootstrap, out)
    assert [(r.value, dict(r.headers)["message-id"]) for r in letters] == [(b"receipt", b"j/out/0")]
    assert len(await read_all(kafka_bootstrap, out, 2, within=10)) == 2, "one aborted copy"
    assert await committed(kafka_bootstrap, group, topic) == {0: 1}
