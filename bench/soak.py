"""Chaos soak on the local stack (``make soak``): nothing lost, nothing run twice, under
random, combined faults.

Messages with unique ids (a share failing, some long) flow through a RabbitMQ queue and
a Kafka topic, each consumed by several dispatchers at once (one ScaledJob, several
replicas; one consumer group), while a seeded fault injector, one fault at a time:
SIGKILLs a dispatcher and starts it again, restarts RabbitMQ, restarts the Kafka broker,
kills and restarts kube-apiserver, and deletes running Jobs by hand. At the end, once
everything has settled, it checks per source every message against what the cluster and
the dead-letter targets hold, prints the table, and exits 1 on any loss or duplicate Job.

What is checked, per source:

* every message has exactly one Job (a Job name seen with two uids is a second Job for
  the same message: the Job record is kept by history limits high enough that no Job is
  deleted but by hand, and a watch records every uid it ever sees);
* every message ends exactly once: its Job Complete and no dead letter, or dead-lettered
  with the reason its fate calls for (``BackoffLimitExceeded`` for one meant to fail,
  ``JobDeleted`` — or its normal outcome — for one whose Job was deleted by hand);
* nothing is left in the source (RabbitMQ: no message ready or unacked; Kafka: the
  group's committed offsets at the end of the topic);
* dead letters found twice for one message are counted (a crash between a dead-letter
  publish and its ack may duplicate one; consumers drop it by ``x-jobrunner-message-id``).
  Kafka's dead letters are produced in one transaction with their offset commit and read
  here ``read_committed``, so on Kafka a duplicate is a failure of the run.

The time from each fault to full recovery (the fault over and both sources' backlogs
drained again) is printed per fault kind.

Usage: soak.py [--seed N] [--minutes M] [--rate MSG_PER_S] [--dispatchers K]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("rabbitmq", "kafka", "sqs", "redis", "nats", "mqtt")
PARTITIONS = 4
ID_ANNOTATION = "soak.jobrunner.dev/id"
FAULTS = {
    "kill-dispatcher": 4,
    "delete-running-job": 3,
    "restart-rabbitmq": 1,
    "restart-kafka": 1,
    "restart-apiserver": 1,
    "restart-sqs": 1,
    "restart-redis": 1,
    "restart-nats": 1,
    "restart-mqtt": 1,
}
KIT_SOURCES = ("sqs", "redis", "nats", "mqtt")
"""Sources driven through the test suite's broker kits (tests/integration/brokers.py):
their queues, streams and topics are made with the broker's redelivery timer shortened
to a few seconds, so a message that were not kept alive while its Job runs would be
redelivered within the soak."""


def stack_env() -> dict[str, str]:
    path = Path(os.environ.get("JOBRUNNER_STACK_ENV", "/tmp/jobrunner-stack/stack.env"))
    if not path.is_file():
        sys.exit(f"{path} not found: bring the stack up first (make stack-up)")
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            value = value.strip()
            out[key.strip()] = value[1:-1] if value[:1] == value[-1:] == "'" else value
    return out


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------------- workload
@dataclass
class Message:
    id: str
    source: str
    fail: bool
    seconds: int
    published_at: float = 0.0
    publish_attempts: int = 0

    def body(self) -> bytes:
        return json.dumps(
            {"id": self.id, "fail": "failed" if self.fail else "no", "seconds": self.seconds}
        ).encode()


def job_template() -> dict[str, Any]:
    return {
        "backoffLimit": 0,
        "template": {
            "metadata": {
                "annotations": {
                    ID_ANNOTATION: "{{ message.json.id }}",
                    "kwok.jobrunner.dev/outcome": "{{ message.json.fail }}",
                    "kwok.jobrunner.dev/run-duration": "{{ message.json.seconds }}s",
                }
            },
            "spec": {
                "containers": [
                    {"name": "work", "image": "busybox:1.36", "args": ["{{ message.json.id }}"]}
                ]
            },
        },
    }


def manifest(
    name: str, namespace: str, trigger: dict[str, Any], max_replicas: int
) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "jobTargetRef": job_template(),
            "maxReplicaCount": max_replicas,
            # Every Job stays until the end (except those deleted by hand): the record
            # the check reads.
            "successfulJobsHistoryLimit": 10_000,  # the most allowed: keep every Job
            "failedJobsHistoryLimit": 10_000,
            "triggers": [trigger],
        },
    }


# ---------------------------------------------------------------------------- recorder
class JobRecorder:
    """Every Job of the namespace ever seen: uids per name, the message id it carries,
    and its last state. A list then a watch, listing again after any break (the API
    server restarts during the soak)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self._batch = client.BatchV1Api(api)
        self.namespace = namespace
        self.uids: dict[str, set[str]] = collections.defaultdict(set)
        self.ids: dict[str, str] = {}
        self.source: dict[str, str] = {}
        self.state: dict[str, str] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-recorder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _note(self, job: Any) -> None:
        meta = job.metadata
        annotations = (job.spec.template.metadata.annotations or {}) if job.spec else {}
        state = "running"
        for condition in (job.status.conditions or []) if job.status else []:
            if condition.status == "True" and condition.type in ("Complete", "Failed"):
                state = condition.type
        if meta.deletion_timestamp is not None and state == "running":
            state = "deleting"
        with self.lock:
            self.uids[meta.name].add(meta.uid)
            self.ids[meta.name] = annotations.get(ID_ANNOTATION, "")
            self.source[meta.name] = (meta.labels or {}).get("jobrunner.dev/source", "")
            self.state[meta.name] = state

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listing = self._batch.list_namespaced_job(self.namespace, _request_timeout=30)
                for job in listing.items:
                    self._note(job)
                stream = watch.Watch().stream(
                    self._batch.list_namespaced_job,
                    self.namespace,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=60,
                    _request_timeout=90,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._note(event["object"])
            except Exception:
                time.sleep(0.5)

    def running_jobs(self) -> list[str]:
        with self.lock:
            return [name for name, state in self.state.items() if state == "running"]

    def final_list(self) -> list[Any]:
        return list(self._batch.list_namespaced_job(self.namespace).items)


# ---------------------------------------------------------------------------- sources
class Rabbit:
    def __init__(self, url: str, queue: str) -> None:
        self.url, self.queue = url, queue
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def setup(self) -> None:
        self.connection = await aio_pika.connect_robust(self.url)
        channel = await self.connection.channel()
        await channel.declare_queue(self.queue, durable=True)

    async def publish(self, message: Message) -> None:
        assert self.connection is not None
        channel = await self.connection.channel(publisher_confirms=True)
        try:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    message.body(),
                    message_id=message.id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self.queue,
                timeout=10,
            )
        finally:
            await channel.close()

    async def backlog(self) -> int:
        """Messages ready or in hand (unacked), from a passive declare: ready only; the
        unacked count comes from the management API, which the end check uses."""
        connection = await aio_pika.connect(self.url, timeout=5)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.queue, passive=True)
            return int(queue.declaration_result.message_count or 0)

    async def left(self, management: str) -> int:
        import base64
        import urllib.parse
        import urllib.request

        parsed = urllib.parse.urlsplit(management)
        request = urllib.request.Request(
            f"http://{parsed.hostname}:{parsed.port}/api/queues/%2F/{self.queue}"
        )
        token = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")

        def read() -> int:
            with urllib.request.urlopen(request, timeout=5) as response:
                info = json.load(response)
            return int(info.get("messages_ready", 0)) + int(info.get("messages_unacknowledged", 0))

        return await asyncio.to_thread(read)

    async def dead_letters(self) -> list[tuple[str, dict[str, str]]]:
        out = []
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(f"{self.queue}.dead-letter", passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return []
            while True:
                message = await queue.get(fail=False, no_ack=True)
                if message is None:
                    return out
                headers = {k: str(v) for k, v in (message.headers or {}).items()}
                out.append((json.loads(message.body)["id"], headers))

    async def cleanup(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            for name in (self.queue, f"{self.queue}.dead-letter"):
                await channel.queue_delete(name)


class Kafka:
    def __init__(self, servers: str, topic: str, group: str) -> None:
        self.servers, self.topic, self.group = servers, topic, group
        self.producer: AIOKafkaProducer | None = None

    async def setup(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
        await admin.start()
        try:
            await admin.create_topics(
                [
                    NewTopic(self.topic, num_partitions=PARTITIONS, replication_factor=1),
                    NewTopic(f"{self.topic}.dead-letter", num_partitions=1, replication_factor=1),
                ]
            )
        finally:
            await admin.close()
        await self._producer()

    async def _producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            self.producer = AIOKafkaProducer(
                bootstrap_servers=self.servers, acks="all", enable_idempotence=True
            )
            await self.producer.start()
        return self.producer

    async def publish(self, message: Message) -> None:
        producer = await self._producer()
        try:
            await asyncio.wait_for(
                producer.send_and_wait(self.topic, message.body(), key=message.id.encode()),
                timeout=15,
            )
        except Exception:
            # A producer that lived through a broker restart may be stuck; start anew.
            self.producer = None
            await asyncio.shield(producer.stop())
            raise

    async def _offsets(self) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.servers, group_id=self.group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            partitions = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
            end = await consumer.end_offsets(partitions)
            committed = {tp: (await consumer.committed(tp)) or 0 for tp in partitions}
        finally:
            await consumer.stop()
        return end, committed

    async def backlog(self) -> int:
        end, committed = await asyncio.wait_for(self._offsets(), timeout=15)
        return sum(end[tp] - committed[tp] for tp in end)

    async def left(self, management: str) -> int:
        return await self.backlog()

    async def dead_letters(self) -> list[tuple[str, dict[str, str]]]:
        topic = f"{self.topic}.dead-letter"
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.servers,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # Dead letters come in transactions; an aborted one is no dead letter.
            isolation_level="read_committed",
        )
        await consumer.start()
        out = []
        try:
            # Read every partition up to the end offsets taken once it is assigned, however
            # slow the fetches: an empty poll on a busy machine is not the end of the topic.
            assigned_by = time.monotonic() + 30
            while not consumer.assignment():  # no group: every partition, once metadata is in
                if time.monotonic() > assigned_by:
                    return out  # the topic does not exist: no dead letter was ever sent
                await asyncio.sleep(0.2)
            deadline = time.monotonic() + 300
            partitions = sorted(consumer.assignment())
            end = await consumer.end_offsets(partitions)

            async def behind() -> bool:
                return any([await consumer.position(tp) < end[tp] for tp in partitions])

            while await behind():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dead letters of {self.topic} not read within 300 s")
                batch = await consumer.getmany(timeout_ms=2000)
                for records in batch.values():
                    for record in records:
                        headers = {k: v.decode() for k, v in record.headers or []}
                        out.append((json.loads(record.value)["id"], headers))
            return out
        finally:
            await consumer.stop()

    async def cleanup(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=self.servers)
        await admin.start()
        try:
            await admin.delete_topics([self.topic, f"{self.topic}.dead-letter"])
        except Exception as exc:
            log(f"could not delete topics: {exc}")
        finally:
            await admin.close()


class KitBroker:
    """A source of the newer kind, through its test kit."""

    def __init__(self, kit: Any) -> None:
        self.kit = kit

    async def setup(self) -> None:
        await self.kit.prepare()

    async def publish(self, message: Message) -> None:
        await asyncio.wait_for(self.kit.publish(message.body(), message_id=message.id), 15)

    async def backlog(self) -> int:
        return int(await self.kit.remaining() or 0)

    async def left(self, management: str) -> int:
        # MQTT cannot tell what a broker holds for a session: 0, said in the report.
        return int(await self.kit.remaining() or 0)

    async def dead_letters(self) -> list[tuple[str, dict[str, str]]]:
        letters = await self.kit.all_dead_letters(within=300)
        return [(json.loads(d.body)["id"], d.headers) for d in letters]

    async def cleanup(self) -> None:
        await self.kit.cleanup()


def make_kit(kind: str, env: dict[str, str]) -> Any:
    sys.path.insert(0, str(ROOT))
    from tests.integration import brokers

    if kind == "sqs":
        return brokers.SQSKit(endpoint=env["JOBRUNNER_TEST_SQS_ENDPOINT"])
    if kind == "redis":
        return brokers.RedisKit(address=env["JOBRUNNER_TEST_REDIS_ADDRESS"])
    if kind == "nats":
        return brokers.NatsKit(url=env["JOBRUNNER_TEST_NATS_URL"])
    kit = brokers.MQTTKit(url=env["JOBRUNNER_TEST_MQTT_URL"])
    # Mosquitto 2.0.11 does not restore shared subscriptions after a restart: one
    # dispatcher (a plain subscription of its persistent session) for MQTT.
    kit.for_broker_restart()
    return kit


# ---------------------------------------------------------------------------- dispatchers
class Dispatchers:
    def __init__(self, kubeconfig: str, run_dir: Path) -> None:
        self.kubeconfig, self.run_dir = kubeconfig, run_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.manifests: dict[str, Path] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.starts = collections.Counter[str]()

    def start(self, key: str, manifest: Path, env: dict[str, str] | None = None) -> None:
        self.manifests[key] = manifest
        self.envs[key] = env or self.envs.get(key, {})
        self.starts[key] += 1
        log_file = (self.run_dir / f"{key}.log").open("ab")
        self.procs[key] = subprocess.Popen(
            [sys.executable, "-m", "jobrunner.cli", "--kubeconfig", self.kubeconfig, "run",
             "-f", str(manifest)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "JOBRUNNER_LOG_LEVEL": "INFO",
                 "JOBRUNNER_DISPATCHER__SHUTDOWN_GRACE_SECONDS": "10", **self.envs[key]},
        )  # fmt: skip
        log_file.close()

    def kill(self, key: str) -> None:
        proc = self.procs[key]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, key: str) -> None:
        self.start(key, self.manifests[key])

    def alive(self) -> list[str]:
        return [k for k, p in self.procs.items() if p.poll() is None]

    def stop_all(self) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for key, proc in self.procs.items():
            try:
                codes[key] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[key] = proc.wait(10)
        return codes


# ---------------------------------------------------------------------------- faults
@dataclass
class Fault:
    kind: str
    target: str
    started: float
    over: float = 0.0
    recovered: float | None = None


@dataclass
class Soak:
    args: argparse.Namespace
    env: dict[str, str]
    rng: random.Random
    namespace: str
    api: client.ApiClient
    dispatchers: Dispatchers
    brokers: dict[str, Any]
    recorder: JobRecorder
    messages: dict[str, Message] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    deleted_by_hand: dict[str, str] = field(default_factory=dict)
    """Job name -> its state when deleted."""
    publishing: bool = True
    pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def publisher(self) -> None:
        interval = 1.0 / self.args.rate
        n = 0
        next_at = time.monotonic()
        deadline = time.monotonic() + self.args.minutes * 60
        while time.monotonic() < deadline:
            source = self.args.sources[n % len(self.args.sources)]
            long_job = self.rng.random() < 0.05
            message = Message(
                id=f"{source[:3]}-{n:06d}",
                source=source,
                fail=self.rng.random() < 0.1,
                seconds=self.rng.randint(15, 30) if long_job else self.rng.randint(0, 2),
            )
            self.messages[message.id] = message
            self._spawn_publish(message)
            n += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        self.publishing = False

    def _spawn_publish(self, message: Message) -> None:
        task = asyncio.create_task(self._publish(message))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _publish(self, message: Message) -> None:
        broker = self.brokers[message.source]
        while True:
            message.publish_attempts += 1
            try:
                await broker.publish(message)
                message.published_at = time.time()
                return
            except Exception:
                await asyncio.sleep(0.5)

    async def injector(self) -> None:
        kinds = [
            k
            for k in self.args.faults
            if k.removeprefix("restart-") not in SOURCES
            or k.removeprefix("restart-") in self.args.sources
        ]
        weights = [FAULTS[k] for k in kinds]
        await asyncio.sleep(self.args.first_fault)
        while self.publishing:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                fault = await self.inject(kind)
            except Exception as exc:  # a harness step failed (not jobrunner): go on
                log(f"fault {kind} could not be injected: {type(exc).__name__}: {exc}")
                continue
            if fault is not None:
                self.faults.append(fault)
                log(f"fault {kind} {fault.target}: over in {fault.over - fault.started:.1f}s")
                await self.wait_recovered(fault)
            await asyncio.sleep(self.rng.uniform(*self.args.fault_gap))

    async def inject(self, kind: str) -> Fault | None:
        started = time.time()
        if kind == "kill-dispatcher":
            key = self.rng.choice(sorted(self.dispatchers.procs))
            self.dispatchers.kill(key)
            await asyncio.sleep(self.rng.uniform(0.5, 5))
            self.dispatchers.restart(key)
            return Fault(kind, key, started, time.time())
        if kind == "delete-running-job":
            running = self.recorder.running_jobs()
            if not running:
                return None
            victims = self.rng.sample(running, min(len(running), self.rng.randint(1, 3)))
            batch = client.BatchV1Api(self.api)
            for name in victims:
                self.deleted_by_hand[name] = self.recorder.state.get(name, "?")
                try:
                    await asyncio.to_thread(
                        batch.delete_namespaced_job,
                        name,
                        self.namespace,
                        propagation_policy="Background",
                    )
                except Exception as exc:  # the API server may be down (another fault)
                    log(f"delete {name}: {type(exc).__name__}")
            return Fault(kind, ",".join(victims), started, time.time())
        if kind == "restart-rabbitmq":
            ctl = self.env["JOBRUNNER_TEST_RABBITMQCTL"]
            await run(ctl, "stop_app")
            await asyncio.sleep(self.rng.uniform(1, 5))
            await run(ctl, "start_app")
            return Fault(kind, "rabbitmq", started, time.time())
        if kind == "restart-kafka":
            await kill_pid("kafka")
            await asyncio.sleep(self.rng.uniform(1, 5))
            await run("bash", str(ROOT / "deploy/local/stack-up.sh"), "kafka")
            return Fault(kind, "kafka", started, time.time())
        if kind == "restart-apiserver":
            await kill_pid("kube-apiserver")
            await asyncio.sleep(self.rng.uniform(1, 5))
            await run("bash", str(ROOT / "deploy/local/stack-up.sh"), "k8s")
            return Fault(kind, "kube-apiserver", started, time.time())
        part = kind.removeprefix("restart-")
        if part in KIT_SOURCES:
            await self.brokers[part].kit.restart_broker()
            return Fault(kind, part, started, time.time())
        raise ValueError(kind)

    async def wait_recovered(self, fault: Fault, bound: float = 300) -> None:
        """Fully recovered: a probe message published on each source once the fault is
        over has its Job, and RabbitMQ has nothing waiting. (Kafka's committed offset
        waits for running Jobs by design, so its lag is no sign of recovery; the probe
        is.)"""
        probes = []
        for source in self.args.sources:
            probe = Message(id=f"probe-{source[:3]}-{len(self.faults):04d}", source=source,
                            fail=False, seconds=0)  # fmt: skip
            self.messages[probe.id] = probe
            probes.append(probe.id)
            self._spawn_publish(probe)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            with self.recorder.lock:
                seen = set(self.recorder.ids.values())
            try:
                rabbit = self.brokers.get("rabbitmq")
                waiting = await rabbit.backlog() if rabbit is not None else 0
            except Exception:
                waiting = 1
            if all(p in seen for p in probes) and waiting == 0:
                fault.recovered = time.time()
                return
            await asyncio.sleep(0.25)
        log(f"fault {fault.kind}: not recovered within {bound:.0f}s")

    async def settle(self, bound: float) -> bool:
        """Wait until every message is published and nothing is left in any source and
        every Job has finished."""
        deadline = time.monotonic() + bound
        management = self.env.get("JOBRUNNER_TEST_RABBITMQ_MANAGEMENT_URL", "")
        while time.monotonic() < deadline:
            try:
                unpublished = sum(1 for m in self.messages.values() if not m.published_at)
                left = [await b.left(management) for b in self.brokers.values()]
                running = len(self.recorder.running_jobs())
                if unpublished == 0 and sum(left) == 0 and running == 0:
                    return True
            except Exception:
                pass
            await asyncio.sleep(1)
        return False


async def run(*command: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    if await proc.wait() != 0:
        log(f"{' '.join(command)} failed")


async def kill_pid(name: str) -> None:
    state = Path(os.environ.get("JOBRUNNER_STATE", "/tmp/jobrunner-stack"))
    pid = int((state / "pids" / f"{name}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------- check
@dataclass
class Verdict:
    source: str
    messages: int = 0
    jobs: int = 0
    missing_jobs: int = 0
    duplicate_jobs: int = 0
    left: int = 0
    dead_expected: int = 0
    dead_found: int = 0
    dead_wrong: int = 0
    dead_missing: int = 0
    duplicate_dead: int = 0
    duplicate_publishes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(
            self.missing_jobs or self.duplicate_jobs or self.left or self.dead_wrong
            or self.dead_missing
            or (self.source in EXACTLY_ONCE_DEAD_LETTERS and self.duplicate_dead)
        )  # fmt: skip


EXACTLY_ONCE_DEAD_LETTERS = {"kafka"}
"""Sources whose dead letters are settled exactly once (Kafka: one transaction with the
offset commit); elsewhere a crash between a dead letter and its ack may duplicate one."""


async def check(soak: Soak) -> dict[str, Verdict]:
    management = soak.env.get("JOBRUNNER_TEST_RABBITMQ_MANAGEMENT_URL", "")
    for job in await asyncio.to_thread(soak.recorder.final_list):
        soak.recorder._note(job)
    verdicts = {}
    for source, broker in soak.brokers.items():
        v = Verdict(source)
        messages = {i: m for i, m in soak.messages.items() if m.source == source}
        v.messages = len(messages)
        jobs_by_id: dict[str, list[str]] = collections.defaultdict(list)
        with soak.recorder.lock:
            for name, ident in soak.recorder.ids.items():
                if ident in messages:
                    jobs_by_id[ident].append(name)
                    v.jobs += len(soak.recorder.uids[name])
        dead: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
        for ident, headers in await broker.dead_letters():
            dead[ident].append(headers)
        v.dead_found = sum(len(d) for d in dead.values())
        v.left = await broker.left(management)
        for ident, message in messages.items():
            names = jobs_by_id.get(ident, [])
            if not names:
                v.missing_jobs += 1
                v.problems.append(f"{ident}: no Job")
            for name in names:
                # One message, one Job: a name seen with a second uid is a second Job.
                extra = len(soak.recorder.uids[name]) - 1
                if extra:
                    v.duplicate_jobs += extra
                    v.problems.append(f"{ident}: Job {name} made {extra + 1} times")
            if len(names) > 1:
                # Distinct names for one id: distinct records (Kafka), i.e. the harness's
                # own producer published it twice; anything else is a defect.
                if message.publish_attempts > 1:
                    v.duplicate_publishes += 1
                else:
                    v.duplicate_jobs += len(names) - 1
                    v.problems.append(f"{ident}: {len(names)} Jobs ({', '.join(names)})")
            deleted = any(n in soak.deleted_by_hand for n in names)
            reasons = [h.get("x-jobrunner-reason", "") for h in dead.get(ident, [])]
            # A duplicate dead letter is a second one for one source record: two records
            # of one id (the harness's retried publish on Kafka) are two messages, each
            # dead-lettered once, as two distinct Jobs are no duplicate Job above.
            records = [h.get("x-jobrunner-message-id", "") for h in dead.get(ident, [])]
            v.duplicate_dead += len(records) - len(set(records))
            allowed = {"BackoffLimitExceeded"} if message.fail else set()
            if deleted:
                allowed.add("JobDeleted")
            if message.publish_attempts > 1:
                allowed.add("DuplicateMessage")  # a publish retried after a broker restart
            v.dead_expected += int(message.fail)
            if reasons and not set(reasons) <= allowed:
                v.dead_wrong += 1
                v.problems.append(f"{ident}: dead-lettered {reasons}, allowed {sorted(allowed)}")
            if message.fail and not reasons:
                v.dead_missing += 1
                v.problems.append(f"{ident}: meant to fail, but no dead letter")
            if not message.fail and not reasons and not deleted:
                state = {soak.recorder.state.get(n) for n in names}
                if names and state != {"Complete"}:
                    v.dead_missing += 1
                    v.problems.append(f"{ident}: Job state {state} and no dead letter")
        verdicts[source] = v
    return verdicts


def report(soak: Soak, verdicts: dict[str, Verdict], elapsed: float) -> None:
    rows = [
        ("messages", "messages"),
        ("Jobs", "jobs"),
        ("missing Jobs (loss)", "missing_jobs"),
        ("duplicate Jobs", "duplicate_jobs"),
        ("messages left in the source", "left"),
        ("dead letters expected (meant to fail)", "dead_expected"),
        ("dead letters found", "dead_found"),
        ("dead letters with a wrong reason", "dead_wrong"),
        ("dead letters missing (loss)", "dead_missing"),
        ("duplicate dead letters", "duplicate_dead"),
        ("messages the harness published twice", "duplicate_publishes"),
    ]
    print()
    print(f"soak: seed {soak.args.seed}, {soak.args.minutes} min of publishing at "
          f"{soak.args.rate} msg/s, {soak.args.dispatchers} dispatcher(s) per source, "
          f"{elapsed / 60:.1f} min in all")  # fmt: skip
    print(f"{'':42} " + " ".join(f"{s:>10}" for s in verdicts))
    for label, attr in rows:
        print(f"{label:42} " + " ".join(f"{getattr(v, attr):>10}" for v in verdicts.values()))
    deleted = len(soak.deleted_by_hand)
    print(f"{'Jobs deleted by hand':42} {deleted:>10}")
    print()
    by_kind: dict[str, list[Fault]] = collections.defaultdict(list)
    for fault in soak.faults:
        by_kind[fault.kind].append(fault)
    print(f"{'fault':22} {'count':>6} {'recovery p50':>13} {'max':>8}  (fault -> backlogs drained)")
    for kind in FAULTS:
        faults = by_kind.get(kind, [])
        times = [f.recovered - f.started for f in faults if f.recovered is not None]
        p50 = f"{statistics.median(times):.1f} s" if times else "-"
        top = f"{max(times):.1f} s" if times else "-"
        unrecovered = len(faults) - len(times)
        extra = f"  ({unrecovered} not drained in time)" if unrecovered else ""
        print(f"{kind:22} {len(faults):>6} {p50:>13} {top:>8}{extra}")
    for v in verdicts.values():
        for problem in v.problems[:20]:
            print(f"  {v.source}: {problem}")
    losses = sum(v.missing_jobs + v.dead_missing for v in verdicts.values())
    duplicates = sum(v.duplicate_jobs for v in verdicts.values())
    dead_twice = sum(
        v.duplicate_dead for v in verdicts.values() if v.source in EXACTLY_ONCE_DEAD_LETTERS
    )
    print(
        f"\nlosses {losses}, duplicate Jobs {duplicates}, duplicate Kafka dead letters "
        f"{dead_twice}, faults injected {len(soak.faults)}"
    )


async def main_async(args: argparse.Namespace) -> int:
    env = stack_env()
    kubeconfig = env["JOBRUNNER_TEST_KUBECONFIG"]
    api = config.new_client_from_config(config_file=kubeconfig)
    run_id = uuid.uuid4().hex[:8]
    namespace = f"soak-{args.seed}-{run_id}"
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
    )
    run_dir = Path(args.run_dir or f"/tmp/jobrunner-soak/{namespace}")
    await asyncio.to_thread(run_dir.mkdir, parents=True, exist_ok=True)
    log(f"namespace {namespace}; dispatcher logs in {run_dir}")
    brokers: dict[str, Any] = {}
    docs: dict[str, dict[str, Any]] = {}
    envs: dict[str, list[dict[str, str]]] = {}
    for source in args.sources:
        count = args.dispatchers
        if source == "rabbitmq":
            rabbit = Rabbit(env["JOBRUNNER_TEST_RABBITMQ_URL"], f"soak-{run_id}")
            trigger = {
                "type": "rabbitmq",
                "metadata": {"queueName": rabbit.queue, "host": rabbit.url},
            }
            brokers[source], extra = rabbit, {}
        elif source == "kafka":
            kafka = Kafka(env["JOBRUNNER_TEST_KAFKA_BOOTSTRAP"], f"soak-{run_id}", f"soak-{run_id}")
            trigger = {
                "type": "kafka",
                "metadata": {
                    "bootstrapServers": kafka.servers,
                    "topic": kafka.topic,
                    "consumerGroup": kafka.group,
                    "offsetResetPolicy": "earliest",
                },
            }
            brokers[source], extra = kafka, {}
        else:
            kit = make_kit(source, env)
            brokers[source] = KitBroker(kit)
            trigger, extra = kit.trigger(), kit.spec()
            if source == "mqtt":
                count = 1
        await brokers[source].setup()
        doc = manifest(f"soak-{source}", namespace, trigger, args.max_replicas)
        doc["spec"].update(extra)
        docs[source] = doc
        kit_env = getattr(brokers[source], "kit", None)
        envs[source] = [
            kit_env.dispatcher_env(i) if kit_env is not None else {} for i in range(count)
        ]
    dispatchers = Dispatchers(kubeconfig, run_dir)
    for source, doc in docs.items():
        path = run_dir / f"{source}.yaml"
        path.write_text(yaml.safe_dump(doc))
        for i, dispatcher_env in enumerate(envs[source]):
            dispatchers.start(f"{source}-{i}", path, dispatcher_env)
    recorder = JobRecorder(api, namespace)
    recorder.start()
    soak = Soak(
        args=args,
        env=env,
        rng=random.Random(args.seed),
        namespace=namespace,
        api=api,
        dispatchers=dispatchers,
        brokers=brokers,
        recorder=recorder,
    )
    started = time.time()
    await asyncio.sleep(3)  # dispatchers connect and list
    try:
        await asyncio.gather(soak.publisher(), soak.injector())
        log(f"published {len(soak.messages)} messages; waiting for everything to settle")
        settled = await soak.settle(args.settle_minutes * 60)
        if not settled:
            log("not everything settled in time; checking what there is")
        # Every dispatcher that was meant to run is running (none died on its own).
        dead = [k for k, p in dispatchers.procs.items() if p.poll() is not None]
        codes = dispatchers.stop_all()
        verdicts = await check(soak)
    except BaseException:
        dispatchers.stop_all()
        raise
    finally:
        recorder.stop()
    report(soak, verdicts, time.time() - started)
    bad = [k for k, c in codes.items() if c not in (0, None)]
    failed = any(v.failed for v in verdicts.values()) or not settled or dead or bad
    if dead:
        print(f"dispatchers that had died on their own: {dead}")
    if bad:
        print(f"dispatchers that did not stop cleanly on SIGTERM: {bad}")
    if not failed and not args.keep:
        for broker in brokers.values():
            try:
                await broker.cleanup()
            except Exception as exc:
                log(f"cleanup: {exc}")
        for job in client.BatchV1Api(api).list_namespaced_job(namespace).items:
            if job.metadata.finalizers:
                client.BatchV1Api(api).patch_namespaced_job(
                    job.metadata.name, namespace, {"metadata": {"finalizers": None}}
                )
        client.CoreV1Api(api).delete_namespace(namespace)
    print("PASS" if not failed else f"FAIL (logs and state kept: {run_dir}, namespace {namespace})")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long messages flow")
    parser.add_argument("--rate", type=float, default=6.0, help="messages per second, all sources")
    parser.add_argument("--dispatchers", type=int, default=2, help="per source")
    parser.add_argument("--max-replicas", type=int, default=20)
    parser.add_argument("--first-fault", type=float, default=10.0, help="seconds before the first")
    parser.add_argument("--fault-gap", type=float, nargs=2, default=(5.0, 20.0))
    parser.add_argument("--settle-minutes", type=float, default=6.0)
    parser.add_argument(
        "--sources",
        nargs="+",
        choices=SOURCES,
        default=list(SOURCES),
        help="the sources to drive (default: all six)",
    )
    parser.add_argument(
        "--faults",
        nargs="+",
        choices=sorted(FAULTS),
        default=list(FAULTS),
        help="the fault kinds to inject (default: all)",
    )
    parser.add_argument("--run-dir")
    parser.add_argument("--keep", action="store_true", help="keep the namespace, queue and topic")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
