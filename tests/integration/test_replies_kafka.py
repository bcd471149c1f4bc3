"""Results back to the producer on Kafka (jobrunner.dispatch.replies), on the real stack:
a producer puts a reply-topic header and a correlation id on its record and reads its
Job's result from that topic; a reply topic the trigger's ``replyTopics`` does not allow
is refused (dead letter ``ReplyFailed``) and nothing is produced there."""

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

from tests.integration.harness import Dispatcher, busybox_job, wait_for_jobs

pytestmark = [pytest.mark.kube, pytest.mark.kafka]


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[dict[str, str]]:
    run = uuid.uuid4().hex[:10]
    names = {
        "work": f"t-{run}",
        "dead": f"t-{run}.dead-letter",
        "replies": f"replies-{run}.client-1",
        "other": f"tenant-b-{run}.replies",
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=1, replication_factor=1) for n in names.values()]
        )
        yield names
        await admin.delete_topics(list(names.values()))
    finally:
        await admin.close()


@pytest.fixture
def reply_manifest(
    tmp_path: Path, namespace: str, topics: dict[str, str], kafka_bootstrap: str
) -> Callable[..., Path]:
    def make(reply_topics: str) -> Path:
        doc = {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {
                "jobTargetRef": busybox_job(),
                "triggers": [
                    {
                        "type": "kafka",
                        "metadata": {
                            "bootstrapServers": kafka_bootstrap,
                            "topic": topics["work"],
                            "consumerGroup": f"g-{uuid.uuid4().hex[:8]}",
                            "offsetResetPolicy": "earliest",
                            "replyTopics": reply_topics,
                        },
                    }
                ],
            },
        }
        path = tmp_path / "work-kafka.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return make


async def request(servers: str, topic: str, value: dict[str, Any], headers: dict[str, str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic,
            json.dumps(value).encode(),
            headers=[(k, v.encode()) for k, v in headers.items()],
        )
    finally:
        await producer.stop()


async def read(servers: str, topic: str, *, within: float) -> list[Any]:
    """Every record of ``topic`` that arrives within ``within`` seconds (read committed)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        end = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < end:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
            if out:
                # One more poll: a duplicate would come right behind.
                for records in (await consumer.getmany(timeout_ms=2000)).values():
                    out.extend(records)
                return out
    finally:
        await consumer.stop()
    return out


async def test_a_kafka_producer_reads_its_jobs_result_from_its_reply_topic(
    kube_api: client.ApiClient,
    namespace: str,
    topics: dict[str, str],
    kafka_bootstrap: str,
    reply_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    prefix = topics["replies"].rsplit(".", 1)[0]
    dispatcher = dispatchers(reply_manifest(f"{prefix}.*"))
    await request(
        kafka_bootstrap,
        topics["work"],
        {"task": "t", "fail": "failed"},
        {"kafka_replyTopic": topics["replies"], "kafka_correlationId": "k-1"},
    )

    [reply] = await read(kafka_bootstrap, topics["replies"], within=90)
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Failed")
    name = job.metadata.name
    headers = {k: v.decode() for k, v in reply.headers}
    assert headers["ce_id"] == f"{name}/reply/failed"
    assert headers["ce_type"] == "dev.jobrunner.job.failed"
    assert headers["ce_specversion"] == "1.0"
    assert headers["kafka_correlationId"] == "k-1"
    assert headers["correlation-id"] == "k-1"
    assert reply.key == b"k-1"
    body = json.loads(reply.value)
    assert (body["outcome"], body["reason"], body["exitCode"]) == (
        "failed",
        "BackoffLimitExceeded",
        1,
    )
    assert body["jobName"] == name
    assert body["correlationId"] == "k-1"
    assert body["result"] == "failed on request (kwok.jobrunner.dev/outcome=failed)"
    await dispatcher.settled("dead-letter", 1)
    [dead] = await read(kafka_bootstrap, topics["dead"], within=20)
    assert dict(dead.headers)["x-jobrunner-reason"] == b"BackoffLimitExceeded"


async def test_a_reply_topic_outside_reply_topics_is_refused_and_nothing_is_produced_there(
    kube_api: client.ApiClient,
    namespace: str,
    topics: dict[str, str],
    kafka_bootstrap: str,
    reply_manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    prefix = topics["replies"].rsplit(".", 1)[0]
    dispatcher = dispatchers(reply_manifest(f"{prefix}.*"))
    # Another tenant's topic, then the trigger's own topic (a loop).
    await request(kafka_bootstrap, topics["work"], {"task": "a"}, {"reply-topic": topics["other"]})
    await request(kafka_bootstrap, topics["work"], {"task": "b"}, {"reply-topic": topics["work"]})

    await wait_for_jobs(kube_api, namespace, "work", 2, state="Complete")
    await dispatcher.settled("dead-letter", 2)
    dead = await read(kafka_bootstrap, topics["dead"], within=20)
    reasons = sorted(dict(d.headers)["x-jobrunner-reason"] for d in dead)
    assert reasons == [b"ReplyFailed", b"ReplyFailed"]
    details = " ".join(dict(d.headers)["x-jobrunner-detail"].decode() for d in dead)
    assert "not one metadata.replyTopics allows" in details
    assert "the trigger's own topic" in details
    assert await read(kafka_bootstrap, topics["other"], within=3) == []
    # The trigger topic holds only the two requests: no reply was produced into it.
    assert len(await read(kafka_bootstrap, topics["work"], within=3)) == 2
