"""Kafka under SIGKILLs while it dead-letters: two dispatchers in one consumer group, Jobs
of different lengths (so records settle out of order, above the committed offset), and a
dispatcher killed each time it has just dead-lettered a record. Every record must end
with exactly one Job, and every failing record with exactly one dead letter as a
``read_committed`` consumer of the dead-letter topic sees it (the dead letter and its
offset commit are one transaction; see jobrunner.sources.kafka)."""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import Dispatcher, busybox_job, finished, jobs_of
from tests.integration.test_dispatch_kafka import committed, names_for, produce

pytestmark = [pytest.mark.kube, pytest.mark.kafka, pytest.mark.timeout(600)]

RECORDS = 60
KILLS = 6
PARTITIONS = 2


@pytest.fixture
async def chaos_topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=PARTITIONS, replication_factor=1),
                NewTopic(f"{name}.dead-letter", num_partitions=1, replication_factor=1),
            ]
        )
        yield name
        await admin.delete_topics([name, f"{name}.dead-letter"])
    finally:
        await admin.close()


async def read_committed(servers: str, topic: str) -> list[Any]:
    """Every record of ``topic`` a read_committed consumer sees, up to the last stable
    offset (the end, once no transaction is open)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[Any] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        deadline = asyncio.get_running_loop().time() + 60
        while await consumer.position(tp) < end:
            assert asyncio.get_running_loop().time() < deadline, "dead letters not read in 60 s"
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                out.extend(r for r in records if r.offset < end)
        return out
    finally:
        await consumer.stop()


async def dead_letters_one_more(dispatcher: Dispatcher, *, within: float) -> bool:
    """Wait until ``dispatcher`` logs one more dead letter than now; False after
    ``within`` seconds without one. Polls its log file every 50 ms."""
    seen = dispatcher.settlements("dead-letter")
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if dispatcher.settlements("dead-letter") > seen:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_sigkills_while_dead_lettering_leave_one_job_and_one_dead_letter_per_record(
    kube_api: client.ApiClient,
    namespace: str,
    chaos_topic: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    topic = chaos_topic
    group = f"g-{uuid.uuid4().hex[:8]}"
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work", "namespace": namespace},
        "spec": {
            "jobTargetRef": busybox_job(),
            "maxReplicaCount": 8,
            # Every Job is kept: a Job created twice for one record must be seen.
            "successfulJobsHistoryLimit": 1000,
            "failedJobsHistoryLimit": 1000,
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
        },
    }
    path = tmp_path / "chaos.yaml"
    path.write_text(yaml.safe_dump(doc))
    # A dead member's partitions move after its session times out: keep that short.
    env = {
        "JOBRUNNER_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "JOBRUNNER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
    }
    slots = [dispatchers(path, env), dispatchers(path, env)]
    everyone = list(slots)
    # One record in three fails; lengths 0-4 s, so later records often finish (and are
    # dead-lettered) while an earlier one of their partition still runs.
    records = [
        (
            i % PARTITIONS,
            None,
            {"id": f"r{i}", "seconds": (i * 7) % 5, **({"fail": "failed"} if i % 3 == 0 else {})},
        )
        for i in range(RECORDS)
    ]
    stored = await produce(kafka_bootstrap, topic, records)
    failing = {f"r{i}" for i in range(RECORDS) if i % 3 == 0}

    kills = 0
    for round_ in range(KILLS):
        victim = slots[round_ % 2]
        # Killed the moment it has just dead-lettered one: others are on their way.
        if not await dead_letters_one_more(victim, within=30):
            break  # nothing left to dead-letter
        victim.kill()
        kills += 1
        slots[round_ % 2] = dispatchers(path, env)
        everyone.append(slots[round_ % 2])
    print(f"{kills} SIGKILLs")
    assert kills >= 3, "the kills came while records were being dead-lettered"

    async def all_settled() -> bool:
        done = await committed(kafka_bootstrap, group, topic)
        return done == {0: RECORDS // 2, 1: RECORDS // 2}

    await eventually(all_settled, within=240, interval=1)

    jobs = jobs_of(kube_api, namespace, "work")
    assert {j.metadata.name for j in jobs} == names_for(topic, stored), "0 missing, none extra"
    assert all(finished(j) for j in jobs)
    logs = "".join(d.logs() for d in everyone)
    created = collections.Counter(
        line.rsplit("created Job ", 1)[1].split()[0]
        for line in logs.splitlines()
        if "created Job " in line
    )
    assert [n for n, c in created.items() if c > 1] == [], "0 duplicate Jobs"

    letters = await read_committed(kafka_bootstrap, f"{topic}.dead-letter")
    per_record = collections.Counter(json.loads(r.value)["id"] for r in letters)
    assert {i: c for i, c in per_record.items() if c > 1} == {}, "0 duplicate dead letters"
    assert set(per_record) == failing, "one dead letter per failing record, no other"
