"""What a Kafka transaction costs per dead letter, on the local stack's broker.

Times the two ways the Kafka source settles a dead-lettered record, one record at a
time as the source does (each settle waits for its own):

* ``plain`` (jobrunner before transactions): the dead letter with an idempotent
  ``acks=all`` producer, then the consumer's offset commit;
* ``transaction`` (now): begin, the dead letter, ``send_offsets_to_transaction``, commit,
  with the partition's transactional producer.

Both run in one consumer group that owns the topic's partition, ``--count`` dead letters
each, in alternating blocks of 20 so that drift in the machine's load falls on both.

Usage: bench_kafka_transactions.py [--count N] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


def summary(name: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[int(len(ms) * 0.95) - 1]
    return (
        f"{name:12} n={len(ms)}  mean {statistics.fmean(ms):6.2f} ms  "
        f"p50 {statistics.median(ms):6.2f} ms  p95 {p95:6.2f} ms  max {ms[-1]:6.2f} ms"
    )


async def main(count: int, servers: str) -> None:
    run = uuid.uuid4().hex[:8]
    topic, dead, group = f"bench-tx-{run}", f"bench-tx-{run}.dead-letter", f"bench-tx-{run}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1), NewTopic(dead, 1, 1)])
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=servers, group_id=group, enable_auto_commit=False
    )
    plain = AIOKafkaProducer(bootstrap_servers=servers, acks="all", enable_idempotence=True)
    txn = AIOKafkaProducer(
        bootstrap_servers=servers,
        transactional_id=f"jobrunner.{group}.{topic}.0",
        acks="all",
        enable_idempotence=True,
    )
    try:
        await consumer.start()
        await plain.start()
        await txn.start()
        await txn.begin_transaction()
        await txn.abort_transaction()
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)
        headers = [("x-jobrunner-reason", b"BackoffLimitExceeded")]
        offset = 0
        times: dict[str, list[float]] = {"plain": [], "transaction": []}
        for _ in range(5):  # warm both paths
            await plain.send_and_wait(dead, b"warm", headers=headers)
            await txn.begin_transaction()
            await txn.send_and_wait(dead, b"warm", headers=headers)
            await txn.commit_transaction()
        while len(times["transaction"]) < count:
            for _ in range(20):
                offset += 1
                started = time.perf_counter()
                await plain.send_and_wait(dead, b'{"a": "dead letter"}', headers=headers)
                await consumer.commit({tp: (offset, "jr1:")})
                times["plain"].append(time.perf_counter() - started)
            for _ in range(20):
                offset += 1
                started = time.perf_counter()
                await txn.begin_transaction()
                await txn.send_and_wait(dead, b'{"a": "dead letter"}', headers=headers)
                await txn.send_offsets_to_transaction({tp: (offset, "jr1:")}, group)
                await txn.commit_transaction()
                times["transaction"].append(time.perf_counter() - started)
        for name, values in times.items():
            print(summary(name, values))
    finally:
        await txn.stop()
        await plain.stop()
        await consumer.stop()
        await admin.delete_topics([topic, dead])
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument(
        "--bootstrap", default=os.environ.get("JOBRUNNER_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    )
    args = parser.parse_args()
    asyncio.run(main(args.count, args.bootstrap))
