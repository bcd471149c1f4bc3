"""Benchmark of the dispatch path on the local stack (``make bench``; ``bench_dispatch.py
rabbitmq``, ``kafka``, ``sqs``, ``redis``, ``nats`` or ``mqtt``; ``--steady-only`` stops
after the steady phase and its baseline, ``--tree DIR`` runs the dispatcher of another
source tree, ``--without-finalizer`` the dispatcher without its settlement finalizer,
a baseline only: ``nofinalizer.py``); prints figures.

Every figure is measured in this run, beside a baseline measured in the same run:

* bare-client rate: Jobs created per second by a plain kubernetes client with 32 threads
  (this machine's API-server limit for these Jobs);
* burst rate: 1,000 messages published at once, Jobs created per second by the
  dispatcher (first to last Job seen), and its ratio to the bare-client rate;
* latency: 1,000 messages at a steady 20 msg/s, publish -> the API server's answer to
  the create (p50/p95/p99, from the dispatcher's log), and publish -> Job seen by a
  separate watch (which adds the watch's own delivery delay); beside it, in the same
  50 s, bare create calls (2/s, one at a time, from a process of their own) under the
  very load the dispatcher's Jobs make (created, completing, released): the dispatcher's
  own share is the ratio of the two p50s. Published means: RabbitMQ,
  the publish call returned; Kafka, the broker appended the record (the topic uses
  LogAppendTime), since the client's send() only queues it; SQS, SendMessage answered;
  Redis, the entry's id (the server's clock at XADD); NATS, the stream's PubAck came
  back; MQTT, the broker's PUBACK came back;
* memory: resident size of a real dispatcher process idle with no Jobs, and with
  10,000 (suspended) Jobs listed and tracked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from benchlib import (
    ROOT,
    ListWatch,
    declare_queue,
    delete_queue,
    env_file,
    pct,
    publish_many,
    rendered_jobs,
    start_dispatcher,
    wait_for_earlier_runs,
    wait_log,
)
from kubernetes import client, config

from jobrunner.core.models import FINALIZER
from jobrunner.core.naming import job_name

STEADY, BURST, RATE, TRACKED = 1000, 1000, 20.0, 10_000
PROBES = 100  # bare create calls beside the steady phase (2/s: a tenth of its creates)
TARGETS = {"p50_ms": 50, "p99_ms": 250, "ratio": 0.8, "rss_mib": 200}


def scaledjob_doc(
    name: str, namespace: str, trigger: dict[str, Any], *, suspend: bool = False
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "containers": [
                    {"name": "work", "image": "busybox:1.36", "args": ["{{ message.json.n }}"]}
                ]
            }
        },
    }
    if suspend:
        spec["suspend"] = True
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "jobTargetRef": spec,
            "maxReplicaCount": 1000,
            "successfulJobsHistoryLimit": 10_000,  # the most allowed: keep every Job
            "failedJobsHistoryLimit": 10_000,
            "triggers": [trigger],
        },
    }


class RabbitBroker:
    source = "rabbitmq"

    def __init__(self, stack: dict[str, str], name: str) -> None:
        self.url, self.queue = stack["JOBRUNNER_TEST_RABBITMQ_URL"], name

    def setup(self) -> None:
        asyncio.run(declare_queue(self.url, self.queue))

    def trigger(self) -> dict[str, Any]:
        return {"type": "rabbitmq", "metadata": {"queueName": self.queue, "host": self.url}}

    def publish(self, prefix: str, count: int, rate: float | None) -> dict[str, float]:
        """Job name -> when its message was published."""
        ids = [f"{prefix}-{i}" for i in range(count)]
        sent = asyncio.run(publish_many(self.url, self.queue, ids, rate))
        return {job_name("bench", mid): t for mid, t in sent.items()}

    def teardown(self) -> None:
        asyncio.run(delete_queue(self.url, self.queue))


class KafkaBroker:
    source = "kafka"

    def __init__(self, stack: dict[str, str], name: str) -> None:
        self.servers, self.topic = stack["JOBRUNNER_TEST_KAFKA_BOOTSTRAP"], name

    def setup(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
            await admin.start()
            try:
                # LogAppendTime: each record's timestamp is when the broker stored it, the
                # moment it counts as published (send() alone only queues it in the client).
                topic = NewTopic(
                    self.topic,
                    num_partitions=2,
                    replication_factor=1,
                    topic_configs={"message.timestamp.type": "LogAppendTime"},
                )
                await admin.create_topics([topic])
            finally:
                await admin.close()

        asyncio.run(create())

    def trigger(self) -> dict[str, Any]:
        return {
            "type": "kafka",
            "metadata": {
                "bootstrapServers": self.servers,
                "topic": self.topic,
                "consumerGroup": f"{self.topic}-group",
                "offsetResetPolicy": "earliest",
            },
        }

    def publish(self, prefix: str, count: int, rate: float | None) -> dict[str, float]:
        from aiokafka import AIOKafkaProducer

        async def run() -> dict[str, float]:
            producer = AIOKafkaProducer(bootstrap_servers=self.servers, linger_ms=0)
            await producer.start()
            out: dict[str, float] = {}
            try:
                start = time.monotonic()
                pending = []
                for i in range(count):
                    if rate:
                        delay = start + i / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    sent_at = time.time()
                    future = await producer.send(
                        self.topic, json.dumps({"n": i}).encode(), partition=i % 2
                    )
                    pending.append((sent_at, future))
                for sent_at, future in pending:
                    meta = await future
                    name = job_name("bench", f"{self.topic}/{meta.partition}/{meta.offset}")
                    out[name] = meta.timestamp / 1000 if meta.timestamp > 0 else sent_at
            finally:
                await producer.stop()
            return out

        return asyncio.run(run())

    def teardown(self) -> None:
        pass


class SQSBroker:
    source = "sqs"

    def __init__(self, stack: dict[str, str], name: str) -> None:
        self.endpoint, self.queue = stack["JOBRUNNER_TEST_SQS_ENDPOINT"], name
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")

    def _client(self) -> Any:
        from aiobotocore.session import get_session

        return get_session().create_client(
            "sqs", region_name="us-east-1", endpoint_url=self.endpoint
        )

    def setup(self) -> None:
        async def create() -> None:
            async with self._client() as sqs:
                await sqs.create_queue(QueueName=self.queue)

        asyncio.run(create())

    def trigger(self) -> dict[str, Any]:
        return {
            "type": "aws-sqs-queue",
            "metadata": {
                "queueURL": self.queue,
                "awsRegion": "us-east-1",
                "awsEndpoint": self.endpoint,
            },
        }

    def publish(self, prefix: str, count: int, rate: float | None) -> dict[str, float]:
        async def run() -> dict[str, float]:
            out: dict[str, float] = {}
            async with self._client() as sqs:
                url = (await sqs.get_queue_url(QueueName=self.queue))["QueueUrl"]
                start = time.monotonic()
                if rate is None:  # a burst: batches of 10, SQS's most
                    for first in range(0, count, 10):
                        entries = [
                            {"Id": str(i), "MessageBody": json.dumps({"n": i})}
                            for i in range(first, min(count, first + 10))
                        ]
                        answer = await sqs.send_message_batch(QueueUrl=url, Entries=entries)
                        now = time.time()
                        for ok in answer.get("Successful", []):
                            out[job_name("bench", ok["MessageId"])] = now
                    return out
                for i in range(count):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    answer = await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": i}))
                    out[job_name("bench", answer["MessageId"])] = time.time()
            return out

        return asyncio.run(run())

    def teardown(self) -> None:
        async def delete() -> None:
            async with self._client() as sqs:
                for name in (self.queue, f"{self.queue}-dead-letter"):
                    try:
                        url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
                    except Exception:
                        continue
                    await sqs.delete_queue(QueueUrl=url)

        asyncio.run(delete())


class RedisBroker:
    source = "redis"

    def __init__(self, stack: dict[str, str], name: str) -> None:
        self.address, self.stream = stack["JOBRUNNER_TEST_REDIS_ADDRESS"], name

    def _client(self) -> Any:
        import redis.asyncio as aioredis

        host, _, port = self.address.rpartition(":")
        return aioredis.Redis(host=host, port=int(port))

    def setup(self) -> None:
        async def create() -> None:
            async with self._client() as r:
                await r.xgroup_create(self.stream, "bench", id="0", mkstream=True)

        asyncio.run(create())

    def trigger(self) -> dict[str, Any]:
        return {
            "type": "redis-streams",
            "metadata": {"address": self.address, "stream": self.stream, "consumerGroup": "bench"},
        }

    def publish(self, prefix: str, count: int, rate: float | None) -> dict[str, float]:
        async def run() -> dict[str, float]:
            out: dict[str, float] = {}
            async with self._client() as r:
                start = time.monotonic()
                for i in range(count):
                    if rate:
                        delay = start + i / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    entry = (await r.xadd(self.stream, {"n": str(i)})).decode()
                    # The entry id's first part is the server's clock at XADD, in ms.
                    out[job_name("bench", f"{self.stream}/{entry}")] = (
                        int(entry.split("-")[0]) / 1000
                    )
            return out

        return asyncio.run(run())

    def teardown(self) -> None:
        async def delete() -> None:
            async with self._client() as r:
                await r.delete(self.stream, f"{self.stream}.dead-letter")

        asyncio.run(delete())


class NatsBroker:
    source = "nats"

    def __init__(self, stack: dict[str, str], name: str) -> None:
        self.url, self.stream = stack["JOBRUNNER_TEST_NATS_URL"], name.replace("-", "_")

    def setup(self) -> None:
        import nats

        async def create() -> None:
            nc = await nats.connect(self.url)
            try:
                await nc.jetstream().add_stream(name=self.stream, subjects=[f"{self.stream}.>"])
            finally:
                await nc.close()

        asyncio.run(create())

    def trigger(self) -> dict[str, Any]:
        return {
            "type": "nats-jetstream",
            "metadata": {"natsServer": self.url, "stream": self.stream, "consumer": "bench"},
        }

    def publish(self, prefix: str, count: int, rate: float | None) -> dict[str, float]:
        import nats

        async def run() -> dict[str, float]:
            out: dict[str, float] = {}
            nc = await nats.connect(self.url)
            js = nc.jetstream()
            try:
                start = time.monotonic()
                for i in range(count):
                    if rate:
                        delay = start + i / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    ack = await js.publish(f"{self.stream}.jobs", json.dumps({"n": i}).encode())
                    out[job_name("bench", f"{self.stream}/{ack.seq}")] = time.time()
            finally:
                await nc.close()
            return out

        return asyncio.run(run())

    def teardown(self) -> None:
        import nats

        async def delete() -> None:
            nc = await nats.connect(self.url)
            try:
                for name in (self.stream, f"{self.stream}-dead-letter"):
                    try:
                        await nc.jetstream().delete_stream(name)
                    except Exception:
                        continue
            finally:
                await nc.close()

        asyncio.run(delete())


class MQTTBroker:
    source = "mqtt"

    def __init__(self, stack: dict[str, str], name: str) -> None:
        from urllib.parse import urlparse

        self.url, self.topic = stack["JOBRUNNER_TEST_MQTT_URL"], f"bench/{name}"
        parsed = urlparse(self.url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 1883

    def setup(self) -> None:
        pass  # the dispatcher's session subscribes before anything is published

    def trigger(self) -> dict[str, Any]:
        return {"type": "mqtt", "metadata": {"host": self.url, "topic": self.topic}}

    def publish(self, prefix: str, count: int, rate: float | None) -> dict[str, float]:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        acked: dict[int, float] = {}
        publisher = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        publisher.max_inflight_messages_set(1000)
        publisher.on_publish = lambda c, u, mid, rc, p: acked.setdefault(mid, time.time())
        publisher.connect(self.host, self.port)
        publisher.loop_start()
        sent: dict[int, str] = {}
        try:
            start = time.monotonic()
            for i in range(count):
                if rate:
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                message_id = f"{prefix}-{i}"
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("message-id", message_id)]
                info = publisher.publish(
                    self.topic, json.dumps({"n": i}).encode(), qos=1, properties=props
                )
                sent[info.mid] = message_id
            deadline = time.time() + 120
            while len(acked) < len(sent) and time.time() < deadline:
                time.sleep(0.05)
        finally:
            publisher.disconnect()
            publisher.loop_stop()
        return {job_name("bench", mid): acked[m] for m, mid in sent.items() if m in acked}

    def teardown(self) -> None:
        pass


BROKERS: dict[str, Any] = {
    "rabbitmq": RabbitBroker,
    "kafka": KafkaBroker,
    "sqs": SQSBroker,
    "redis": RedisBroker,
    "nats": NatsBroker,
    "mqtt": MQTTBroker,
}


class JobWatcher:
    """Records when each Job is first seen by a watch (a separate client)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self._watch = ListWatch(
            client.BatchV1Api(api).list_namespaced_job, namespace, self._on_event, name="watcher"
        )

    def _on_event(self, kind: str, obj: dict[str, Any], now: float) -> None:
        if kind == "ADDED":
            self.seen.setdefault(obj["metadata"]["name"], now)

    def wait_for(self, names: list[str], timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(n in self.seen for n in names):
                return
            time.sleep(0.1)
        missing = [n for n in names if n not in self.seen]
        raise SystemExit(f"{len(missing)} Jobs never appeared (first: {missing[:3]})")

    def stop(self) -> None:
        self._watch.stop()


def bare_create(kubeconfig: str, namespace: str, jobs: list[dict[str, Any]]) -> float:
    """Runs in a process of its own, as the dispatcher does, so neither side shares a GIL
    with the bench's watcher."""
    # The pool size must be set before the ApiClient exists, as jobrunner does; set later
    # it is ignored and every thread past ten would open a fresh TLS connection.
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    batch = client.BatchV1Api(client.ApiClient(configuration))
    with ThreadPoolExecutor(32) as pool:
        # Warm the connections first, as the dispatcher's are by the time it bursts.
        list(
            pool.map(
                lambda _: batch.list_namespaced_job(namespace, limit=1, _preload_content=False),
                range(64),
            )
        )
        start = time.perf_counter()
        list(
            pool.map(
                lambda j: batch.create_namespaced_job(namespace, j, _preload_content=False), jobs
            )
        )
        return len(jobs) / (time.perf_counter() - start)


def probe_creates(
    kubeconfig: str, namespace: str, jobs: list[dict[str, Any]], rate: float, start_at: float
) -> list[float]:
    """Bare create calls beside the dispatcher's steady phase, under the very load it
    makes (its Jobs being created, completing and released): from ``start_at`` (epoch
    seconds), one call at a time at ``rate`` per second, each call's answer time (ms).
    In a process of its own, as the dispatcher is. Jobs of another ScaledJob's labels,
    without jobrunner's finalizer: the dispatcher never sees them."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    batch = client.BatchV1Api(client.ApiClient(configuration))
    batch.list_namespaced_job(namespace, limit=1, _preload_content=False)  # warm
    time.sleep(max(0.0, start_at - time.time()))
    out = []
    began = time.monotonic()
    for i, job in enumerate(jobs):
        delay = began + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        called = time.perf_counter()
        batch.create_namespaced_job(namespace, job, _preload_content=False)
        out.append((time.perf_counter() - called) * 1000)
    return out


def guarded(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    """The Jobs of the namespace that still carry jobrunner's finalizer."""
    raw = client.BatchV1Api(api).list_namespaced_job(namespace, _preload_content=False).data
    return [
        j for j in json.loads(raw)["items"] if FINALIZER in (j["metadata"].get("finalizers") or [])
    ]


def wait_released(api: client.ApiClient, namespace: str, timeout: float = 60) -> None:
    """Until the dispatcher released every finished Job (before it is stopped)."""
    deadline = time.time() + timeout
    while time.time() < deadline and guarded(api, namespace):
        wait_quiet(api, namespace)
        time.sleep(1)


def release_left(api: client.ApiClient, namespace: str) -> None:
    """Once the dispatcher has stopped: drop the finalizer of a Job it had not released
    yet (only in this benchmark's namespace), so the namespace can go; say how many."""
    left = guarded(api, namespace)
    for job in left:
        finalizers = [f for f in job["metadata"]["finalizers"] if f != FINALIZER]
        client.BatchV1Api(api).patch_namespaced_job(
            job["metadata"]["name"],
            namespace,
            {"metadata": {"finalizers": finalizers}},
            _content_type="application/merge-patch+json",
        )
    if left:
        print(f"  {len(left)} Job(s) still carried {FINALIZER} after the dispatcher stopped")


def wait_quiet(api: client.ApiClient, namespace: str, timeout: float = 600) -> float:
    """Wait until every Job in the namespace has finished, so each measured phase starts
    from the same idle cluster; returns the seconds waited."""
    batch = client.BatchV1Api(api)
    start = time.time()
    while time.time() - start < timeout:
        raw = json.loads(batch.list_namespaced_job(namespace, _preload_content=False).data)
        pending = [
            j
            for j in raw["items"]
            if not j.get("spec", {}).get("suspend")
            and not any(
                c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                for c in (j.get("status") or {}).get("conditions") or []
            )
        ]
        if not pending:
            return time.time() - start
        time.sleep(1)
    raise SystemExit(f"cluster not quiet after {timeout}s")


def created_times(log: Path) -> dict[str, float]:
    """When the dispatcher got the API server's answer to each create (its INFO log)."""
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        if " created Job " in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
            name = line.split(" created Job ", 1)[1].split()[0]
            out[name] = stamp.timestamp()
    return out


def wait_created(log: Path, names: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        created = created_times(log)
        if all(n in created for n in names):
            return
        time.sleep(0.5)
    raise SystemExit(
        f"the dispatcher did not create all {len(names)} Jobs in {timeout}s; see {log}"
    )


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def apiserver_cpu(stack: dict[str, str]) -> float:
    state = Path(stack.get("JOBRUNNER_TEST_STACK_STATE", "/tmp/jobrunner-stack"))
    try:
        return cpu_seconds(int((state / "pids" / "kube-apiserver.pid").read_text()))
    except (OSError, ValueError):
        return float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default="rabbitmq", choices=sorted(BROKERS))
    parser.add_argument(
        "--steady-only", action="store_true", help="stop after the steady phase and its baseline"
    )
    parser.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="the jobrunner source tree the dispatcher runs (default: this one)",
    )
    parser.add_argument(
        "--without-finalizer",
        action="store_true",
        help="a baseline: the dispatcher without its settlement finalizer (nofinalizer.py)",
    )
    args = parser.parse_args()
    source, steady_only = args.source, args.steady_only
    stack = env_file()
    kubeconfig = stack["JOBRUNNER_TEST_KUBECONFIG"]
    api = config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = 32
    core = client.CoreV1Api(api)
    waited = wait_for_earlier_runs(core, ("bench-", "prof-"))
    if waited:
        print(
            f"bench: waited {waited:.0f}s for an earlier run's namespace to be deleted", flush=True
        )
    run_id = uuid.uuid4().hex[:6]
    namespace = f"bench-{run_id}"
    if source not in BROKERS:
        raise SystemExit(f"unknown source {source!r}; use one of {', '.join(BROKERS)}")
    broker = BROKERS[source](stack, f"bench-{run_id}")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    broker.setup()
    work = Path(tempfile.mkdtemp(prefix="jobrunner-bench-"))
    log = work / "dispatcher.log"
    results: dict[str, float] = {}
    dispatcher: subprocess.Popen[bytes] | None = None
    watcher = JobWatcher(api, namespace)
    try:
        doc = scaledjob_doc("bench", namespace, broker.trigger())
        print(
            f"bench ({broker.source}): namespace {namespace}, logs in {work}, dispatcher "
            f"from {args.tree}{' WITHOUT its finalizer' if args.without_finalizer else ''}",
            flush=True,
        )

        manifest = work / "bench.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        dispatcher = start_dispatcher(
            manifest, kubeconfig, log, tree=args.tree, guarded=not args.without_finalizer
        )
        # Measure from a ready dispatcher (broker connected, watch in sync, partitions
        # assigned) on a quiet cluster, not from its start-up.
        wait_log(log, "dispatching bench", timeout=60)
        if broker.source == "kafka":
            wait_log(log, "partitions assigned", timeout=60)
        wait_quiet(api, namespace)
        time.sleep(2)
        results["idle_rss"] = rss_mib(dispatcher.pid)

        probes = rendered_jobs(scaledjob_doc("probe", namespace, broker.trigger()), "probe", PROBES)
        pool = ProcessPoolExecutor(1)
        start_at = time.time() + 3
        probing = pool.submit(
            probe_creates, kubeconfig, namespace, probes, PROBES * RATE / STEADY, start_at
        )
        time.sleep(max(0.0, start_at - time.time()))
        cpu = {"dispatcher": cpu_seconds(dispatcher.pid), "kube-apiserver": apiserver_cpu(stack)}
        sent = broker.publish("steady", STEADY, RATE)
        wait_created(log, list(sent), timeout=120)
        watcher.wait_for(list(sent), timeout=120)
        created = created_times(log)
        latencies = [(created[n] - t) * 1000 for n, t in sent.items()]
        seen = [(watcher.seen[n] - t) * 1000 for n, t in sent.items()]
        for p in (50, 95, 99):
            results[f"p{p}_ms"] = pct(latencies, p)
            results[f"seen_p{p}_ms"] = pct(seen, p)
        print(
            f"  steady {RATE:.0f} msg/s x {STEADY}: publish->Job created p50 {results['p50_ms']:.1f} ms, "
            f"p95 {results['p95_ms']:.1f} ms, p99 {results['p99_ms']:.1f} ms; publish->Job seen by a "
            f"watch p50 {results['seen_p50_ms']:.1f} ms, p99 {results['seen_p99_ms']:.1f} ms",
            flush=True,
        )
        bare = probing.result()
        pool.shutdown()
        used = {
            "dispatcher": cpu_seconds(dispatcher.pid) - cpu["dispatcher"],
            "kube-apiserver": apiserver_cpu(stack) - cpu["kube-apiserver"],
        }
        print(
            f"  CPU during the steady phase: dispatcher {used['dispatcher']:.1f} s "
            f"({used['dispatcher'] * 1000 / STEADY:.1f} ms a message), kube-apiserver "
            f"{used['kube-apiserver']:.1f} s",
            flush=True,
        )
        results["bare_p50_ms"], results["bare_p95_ms"] = pct(bare, 50), pct(bare, 95)
        results["share"] = results["p50_ms"] / results["bare_p50_ms"]
        print(
            f"  bare create calls beside it, under the same load ({PROBES} at "
            f"{PROBES * RATE / STEADY:.0f}/s from a process of their own): p50 "
            f"{results['bare_p50_ms']:.1f} ms, p95 {results['bare_p95_ms']:.1f} ms; "
            f"publish->Job created / bare create, p50: {results['share']:.2f}x",
            flush=True,
        )
        if steady_only:
            wait_released(api, namespace)
            return 0

        bare_rates = []
        for round_ in range(2):
            waited = wait_quiet(api, namespace)
            jobs = rendered_jobs(
                scaledjob_doc("baseline", namespace, broker.trigger()), f"base{round_}", BURST
            )
            with ProcessPoolExecutor(1) as pool:
                bare_rates.append(pool.submit(bare_create, kubeconfig, namespace, jobs).result())
            print(
                f"  bare client: {bare_rates[-1]:.1f} Jobs/s ({BURST} Jobs, 32 threads; "
                f"after {waited:.0f}s for the cluster to go quiet)",
                flush=True,
            )
            if round_ == 0:
                waited = wait_quiet(api, namespace)
                burst_names = list(broker.publish("burst", BURST, None))
                wait_created(log, burst_names, timeout=300)
                times = sorted(created_times(log)[n] for n in burst_names)
                results["burst_rate"] = (len(times) - 1) / (times[-1] - times[0])
                print(
                    f"  dispatcher burst: {results['burst_rate']:.1f} Jobs/s ({BURST} messages at once; "
                    f"after {waited:.0f}s quiet)",
                    flush=True,
                )
        results["bare_rate"] = statistics.mean(bare_rates)
        results["ratio"] = results["burst_rate"] / results["bare_rate"]
        print(
            f"  burst / bare (mean of the runs before and after): {results['ratio'] * 100:.0f}%",
            flush=True,
        )
        dispatcher.terminate()
        dispatcher.wait(60)

        mem_doc = scaledjob_doc("bench-mem", namespace, broker.trigger(), suspend=True)
        suspended = rendered_jobs(mem_doc, "mem", TRACKED)
        with ProcessPoolExecutor(1) as pool:
            rate = pool.submit(bare_create, kubeconfig, namespace, suspended).result()
        print(f"  created {TRACKED} suspended Jobs ({rate:.0f}/s)", flush=True)
        mem_manifest = work / "mem.yaml"
        mem_manifest.write_text(yaml.safe_dump(mem_doc))
        log_mem = work / "dispatcher-mem.log"
        dispatcher = start_dispatcher(
            mem_manifest, kubeconfig, log_mem, level="DEBUG", tree=args.tree
        )
        wait_log(log_mem, f"listed {TRACKED} jobs", timeout=300)
        time.sleep(2)
        results["tracked_rss"] = rss_mib(dispatcher.pid)
        print(
            f"  dispatcher RSS: idle {results['idle_rss']:.0f} MiB, with {TRACKED} Jobs tracked "
            f"{results['tracked_rss']:.0f} MiB",
            flush=True,
        )
    finally:
        watcher.stop()
        if dispatcher is not None and dispatcher.poll() is None:
            dispatcher.terminate()
            dispatcher.wait(60)
        release_left(api, namespace)
        core.delete_namespace(namespace, propagation_policy="Background")
        broker.teardown()

    rows = [
        (
            "publish->Job created p50",
            f"{results['p50_ms']:.1f} ms",
            f"<= {TARGETS['p50_ms']} ms",
            results["p50_ms"] <= TARGETS["p50_ms"],
        ),
        ("publish->Job created p95", f"{results['p95_ms']:.1f} ms", "", True),
        (
            "publish->Job created p99",
            f"{results['p99_ms']:.1f} ms",
            f"<= {TARGETS['p99_ms']} ms",
            results["p99_ms"] <= TARGETS["p99_ms"],
        ),
        (
            "bare create call beside it, same load: p50 / p95",
            f"{results['bare_p50_ms']:.1f} / {results['bare_p95_ms']:.1f} ms",
            "",
            True,
        ),
        ("publish->Job created p50 / bare create p50", f"{results['share']:.2f}x", "", True),
        ("publish->Job seen by a watch p50", f"{results['seen_p50_ms']:.1f} ms", "", True),
        ("publish->Job seen by a watch p99", f"{results['seen_p99_ms']:.1f} ms", "", True),
        ("bare client (baseline)", f"{results['bare_rate']:.1f} Jobs/s", "", True),
        ("dispatcher under burst", f"{results['burst_rate']:.1f} Jobs/s", "", True),
        (
            "burst / bare",
            f"{results['ratio'] * 100:.0f} %",
            ">= 80 %",
            results["ratio"] >= TARGETS["ratio"],
        ),
        ("RSS, idle", f"{results['idle_rss']:.0f} MiB", "", True),
        (
            f"RSS, {TRACKED} Jobs tracked",
            f"{results['tracked_rss']:.0f} MiB",
            "<= 200 MiB",
            results["tracked_rss"] <= TARGETS["rss_mib"],
        ),
    ]
    print("\n| figure | measured | target | met |\n| --- | --- | --- | --- |")
    for name, value, target, met in rows:
        print(f"| {name} | {value} | {target} | {'yes' if met else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
