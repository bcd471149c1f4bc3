"""`jobrunner dead-letters` on the real brokers: RabbitMQ end to end (a Job fails, its
message is listed without being consumed, a replay runs as a new Job, not as a duplicate),
and Kafka's dead-letter topic (listed from the beginning, replayed by id, remembered as
replayed)."""

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

from jobrunner.cli import main
from jobrunner.core.naming import REPLAY_HEADER, job_name
from tests.helpers import eventually
from tests.integration.harness import busybox_job, publish, queue_depth


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.kube
@pytest.mark.rabbitmq
async def test_rabbitmq_dead_letters_are_listed_without_consuming_and_replayed_as_new_jobs(
    kubeconfig: Path,
    rabbitmq_url: str,
    queue: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(manifest())
    base = ["--kubeconfig", str(kubeconfig), "dead-letters", "-f", path]
    await publish(rabbitmq_url, queue, json.dumps({"fail": "failed"}).encode(), message_id="bad-1")
    await publish(rabbitmq_url, queue, b"not json", message_id="junk-1")
    dispatchers(Path(path))

    async def letters(count: int) -> list[dict[str, Any]] | None:
        code, out, err = await asyncio.to_thread(cli, capsys, *base, "-o", "json")
        assert code == 0, err
        found: list[dict[str, Any]] = json.loads(out)
        return found if len(found) == count else None

    found = {d["messageId"]: d for d in await eventually(lambda: letters(2), within=60)}
    assert found["bad-1"]["reason"] == "BackoffLimitExceeded"
    assert found["bad-1"]["job"] == job_name("work", "bad-1")
    assert found["bad-1"]["deadLetteredAt"] is not None
    # What the pod told (KWOK's node serves no logs, so no last lines here).
    assert "attempt 1 (pod work-" in found["bad-1"]["detail"]
    assert "work exited 1 (Error)" in found["bad-1"]["detail"]
    assert found["junk-1"]["reason"] == "InvalidMessage"
    # Listing did not consume them.
    assert (await queue_depth(rabbitmq_url, f"{queue}.dead-letter"))[0] == 2
    code, out, _ = await asyncio.to_thread(cli, capsys, *base)
    assert code == 0
    assert f"2 dead letter(s) in queue {queue}.dead-letter on RabbitMQ" in out
    assert "body: not json" in out

    code, out, err = await asyncio.to_thread(cli, capsys, *base, "--replay", "bad-1")
    assert code == 0, err
    assert f"replayed 1 dead letter(s) to queue {queue} as new work" in out
    assert (await queue_depth(rabbitmq_url, f"{queue}.dead-letter"))[0] == 1

    async def replay_dead_lettered() -> dict[str, Any] | None:
        current = await letters(2)
        again = [d for d in current or [] if d["messageId"] == "bad-1"]
        return again[0] if again else None

    again = await eventually(replay_dead_lettered, within=60)
    assert again["reason"] == "BackoffLimitExceeded"  # it ran again: not DuplicateMessage
    value = again["headers"][REPLAY_HEADER]
    assert again["job"] == job_name("work", f"bad-1#replay-{value}")
    assert again["job"] != found["bad-1"]["job"]


@pytest.fixture
async def topic(kafka_bootstrap: str) -> AsyncIterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, num_partitions=1, replication_factor=1),
                NewTopic(f"{name}.dead-letter", num_partitions=2, replication_factor=1),
            ]
        )
        yield name
        existing = await admin.list_topics()
        await admin.delete_topics(
            [
                t
                for t in (name, f"{name}.dead-letter", f"{name}.dead-letter.replayed")
                if t in existing
            ]
        )
    finally:
        await admin.close()


async def _read(servers: str, topic: str) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000)
        return [r for records in batch.values() for r in records]
    finally:
        await consumer.stop()


@pytest.mark.kafka
async def test_kafka_dead_letters_are_read_from_the_topic_and_a_replay_is_remembered(
    kafka_bootstrap: str, topic: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work"},
        "spec": {
            "jobTargetRef": busybox_job(),
            "triggers": [
                {
                    "type": "kafka",
                    "metadata": {
                        "bootstrapServers": kafka_bootstrap,
                        "topic": topic,
                        "consumerGroup": "g",
                    },
                }
            ],
        },
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for offset, (reason, body) in enumerate(
            [("BackoffLimitExceeded", b'{"n": 1}'), ("InvalidMessage", b"oops")]
        ):
            headers = {
                "tenant": "acme",
                "x-jobrunner-reason": reason,
                "x-jobrunner-detail": f"detail {offset}",
                "x-jobrunner-job": f"work-{offset:016x}",
                "x-jobrunner-source-topic": topic,
                "x-jobrunner-source-partition": "0",
                "x-jobrunner-source-offset": str(offset),
            }
            await producer.send_and_wait(
                f"{topic}.dead-letter",
                body,
                key=b"k",
                partition=offset,
                headers=[(k, v.encode()) for k, v in headers.items()],
            )
    finally:
        await producer.stop()

    base = ["dead-letters", "-f", str(path)]
    code, out, err = await asyncio.to_thread(cli, capsys, *base, "-o", "json")
    assert code == 0, err
    letters = json.loads(out)
    assert [(d["id"], d["reason"]) for d in letters] == [
        ("0:0", "BackoffLimitExceeded"),
        ("1:0", "InvalidMessage"),
    ]
    code, out, err = await asyncio.to_thread(cli, capsys, *base, "--replay", "0:0")
    assert code == 0, err
    assert f"replayed 1 dead letter(s) to topic {topic} as new work" in out

    (replayed,) = await _read(kafka_bootstrap, topic)
    headers = {k: v.decode() for k, v in replayed.headers}
    assert replayed.value == b'{"n": 1}'
    assert replayed.key == b"k"
    assert headers["tenant"] == "acme"
    assert REPLAY_HEADER in headers
    assert not any(k.startswith(("x-jobrunner-reason", "x-jobrunner-source")) for k in headers)

    code, out, _ = await asyncio.to_thread(cli, capsys, *base, "-o", "json")
    assert [d["id"] for d in json.loads(out)] == ["1:0"]  # the replayed one is left out
    code, out, _ = await asyncio.to_thread(cli, capsys, *base, "--all", "-o", "json")
    shown = {d["id"]: d["replayed"] for d in json.loads(out)}
    assert shown == {"0:0": headers[REPLAY_HEADER], "1:0": None}
