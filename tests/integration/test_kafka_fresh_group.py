"""A Kafka consumer group that starts fresh at ``latest`` (KEDA's default) says so, and
how many records already in the topic it will not process: silence would read as a
broken dispatcher."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.helpers import eventually
from tests.integration.harness import busybox_job

pytestmark = [pytest.mark.kube, pytest.mark.kafka]


@pytest.fixture
async def topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])
        yield name
        existing = await admin.list_topics()
        await admin.delete_topics([t for t in (name, f"{name}.dead-letter") if t in existing])
    finally:
        await admin.close()


async def test_a_fresh_group_at_latest_says_how_many_records_it_skips(
    kafka_bootstrap: str,
    topic: str,
    namespace: str,
    tmp_path: Path,
    dispatchers: Callable[..., Any],
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for n in range(3):
            await producer.send_and_wait(topic, b'{"n": %d}' % n)
    finally:
        await producer.stop()
    group = f"g-{uuid.uuid4().hex[:8]}"
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
                        "topic": topic,
                        "consumerGroup": group,
                    },
                }
            ],
        },
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    dispatcher = dispatchers(path)

    async def noted() -> str | None:
        lines = [line for line in dispatcher.logs().splitlines() if "is new on" in line]
        return lines[0] if lines else None

    line = await eventually(noted, within=60)
    assert f"consumer group {group} is new on {topic}/0" in line
    assert "the 3 record(s) already there will not be processed" in line
    assert "offsetResetPolicy: earliest" in line
    assert "dispatching work from topic" in dispatcher.logs()
