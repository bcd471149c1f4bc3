"""jobrunner side by side with KEDA itself (``make bench-keda``, about 15 minutes).

The real KEDA operator (built from source by ``deploy/local/build-keda.sh``, run out of
cluster by ``deploy/local/keda-run.sh``) and jobrunner get the same RabbitMQ workload on
the same local stack, one system at a time, in one sitting:

* systems: jobrunner; KEDA ``pollingInterval: 1`` (default scaling strategy); KEDA with
  its default ``pollingInterval`` (30 s); KEDA ``pollingInterval: 1`` with
  ``scalingStrategy: accurate``;
* one ScaledJob document serves both sides (``keda.sh/v1alpha1``: KEDA gets it as a
  custom resource, jobrunner as its manifest): the same Job template, maxReplicaCount and
  history limits; only ``pollingInterval``/``scalingStrategy`` differ between the KEDA
  columns, and jobrunner ignores them;
* phases, each on a queue of its own: a steady rate, a burst, a template change while
  Jobs run, and pods that start slowly; every message has a unique id;
* the Job pods run on a fake node of the benchmark's own, driven by a second KWOK
  (``deploy/local/kwok-node-run.sh``): they run a few seconds, or start 20 s late.

KEDA's Jobs are meant to fetch their message themselves, and KWOK pods run no code, so
this benchmark plays KEDA's worker: when a KEDA Job's pod is first seen running it takes
one message from the queue (``basic.get``) and acks it at once. A Job that finds the queue
empty counts as "found no message". jobrunner's Jobs carry their message.

Every time is taken in this process (``time.time()``) when a publish call is made or an
event arrives from a watch, so both sides are measured by the same clocks and watches.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aio_pika
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
from kubernetes.client.rest import ApiException

from jobrunner.core.models import FINALIZER
from jobrunner.core.naming import job_name

# The workload. The same for every system.
MAX_REPLICAS = 100  # KEDA's default maxReplicaCount
HISTORY = 100  # KEDA's default successful/failed history limits
RATE, STEADY = 10.0, 300  # 10 msg/s for 30 s
BURST = 300
RUN_FOR = "3s"  # how long each Job's pod runs (KWOK)
SPEC_JOBS, SPEC_RUN_FOR = 20, "40s"
SLOW_MESSAGES, SLOW_RATE, SLOW_START = 30, 2.0, "20s"
BASELINE = 150  # bare creates at RATE, before the systems and again after them

NODE = "kwok-bench-keda"
PREFIX = "kbench-"
KEDA_GROUP, KEDA_VERSION_API, KEDA_PLURAL = "keda.sh", "v1alpha1", "scaledjobs"
DEPLOY = ROOT / "deploy" / "local"


@dataclass(frozen=True)
class System:
    key: str
    title: str
    keda: bool
    polling: int | None = None
    """KEDA's pollingInterval; None leaves KEDA's default (30 s)."""
    strategy: str | None = None

    def poll_seconds(self) -> float:
        return float(self.polling or 30) if self.keda else 0.0


SYSTEMS = [
    System("jr", "jobrunner", keda=False),
    System("k1", "KEDA poll 1", keda=True, polling=1),
    System("k30", "KEDA poll 30 (default)", keda=True),
    System("k1a", "KEDA poll 1 + accurate", keda=True, polling=1, strategy="accurate"),
]


def scaledjob_doc(
    name: str,
    namespace: str,
    queue: str,
    url: str,
    system: System,
    *,
    pod_annotations: dict[str, str],
    template_version: str = "1",
) -> dict[str, Any]:
    """The one ScaledJob both sides run: KEDA as a custom resource, jobrunner from a file."""
    spec: dict[str, Any] = {
        "jobTargetRef": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": pod_annotations},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubernetes.io/hostname": NODE},
                    "tolerations": [
                        {"key": "jobrunner.dev/bench", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "containers": [
                        {
                            "name": "work",
                            "image": "busybox:1.36",
                            "command": ["sh", "-c", "echo working"],
                            "env": [{"name": "TEMPLATE_VERSION", "value": template_version}],
                        }
                    ],
                },
            },
        },
        "maxReplicaCount": MAX_REPLICAS,
        "successfulJobsHistoryLimit": HISTORY,
        "failedJobsHistoryLimit": HISTORY,
        "triggers": [
            {
                "type": "rabbitmq",
                # value 1: one Job per message waiting (KEDA's default target is 20).
                "metadata": {"queueName": queue, "host": url, "mode": "QueueLength", "value": "1"},
            }
        ],
    }
    if system.polling is not None:
        spec["pollingInterval"] = system.polling
    if system.strategy is not None:
        spec["scalingStrategy"] = {"strategy": system.strategy}
    return {
        "apiVersion": f"{KEDA_GROUP}/{KEDA_VERSION_API}",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


# ---------------------------------------------------------------- observing


@dataclass
class JobRecord:
    scaledjob: str
    added: float
    finished: float | None = None
    succeeded: bool = False
    deleted: float | None = None
    deleted_unfinished: bool = False
    starts: list[float] = field(default_factory=list)
    """When each of its pods was first seen running."""

    def ended(self) -> float | None:
        return self.finished if self.finished is not None else self.deleted


@dataclass(frozen=True)
class Take:
    job: str
    scaledjob: str
    at: float


def _finished(obj: dict[str, Any]) -> tuple[bool, bool]:
    """(finished, succeeded) from a Job's conditions."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "Failed"):
            return True, c["type"] == "Complete"
    return False, False


class Worker:
    """Plays the worker KEDA's Jobs are meant to run: once a Job's pod runs, it takes one
    message from its ScaledJob's queue and acks it at once (KEDA's RabbitMQ scaler counts
    ready messages, so a taken message no longer counts). One per system; its connection
    also tells whether the broker went away during that system's run."""

    def __init__(self, url: str) -> None:
        self.queues: dict[str, str] = {}
        self.taken: dict[str, Take] = {}
        self.empty: list[Take] = []
        self.errors: list[str] = []
        self.connection_lost = 0
        self._closing = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="worker", daemon=True)
        self._thread.start()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._connection: aio_pika.abc.AbstractConnection | None = None
        asyncio.run_coroutine_threadsafe(self._connect(url), self._loop).result(30)

    async def _connect(self, url: str) -> None:
        # Robust: if someone restarts RabbitMQ meanwhile, the worker carries on (and the
        # run says that the broker went away).
        connection = await aio_pika.connect_robust(url)
        connection.close_callbacks.add(self._lost)
        self._connection = connection
        self._channel = await connection.channel()

    def _lost(self, *_: Any) -> None:
        if not self._closing:
            self.connection_lost += 1

    def take(self, scaledjob: str, job: str) -> None:
        queue = self.queues.get(scaledjob)
        if queue is not None:
            asyncio.run_coroutine_threadsafe(self._take(scaledjob, queue, job), self._loop)

    async def _take(self, scaledjob: str, queue_name: str, job: str) -> None:
        assert self._channel is not None
        try:
            queue = await self._channel.get_queue(queue_name, ensure=False)
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            now = time.time()
            if message is None:
                with self._lock:
                    self.empty.append(Take(job, scaledjob, now))
                return
            await message.ack()
            with self._lock:
                self.taken.setdefault(message.message_id or "", Take(job, scaledjob, now))
        except Exception as exc:
            with self._lock:
                self.errors.append(f"{job}: {exc!r}")

    def close(self) -> None:
        self._closing = True
        if self._connection is not None:
            asyncio.run_coroutine_threadsafe(self._connection.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class Observer:
    """Watches one system's namespace: each Job (added, finished, deleted while
    unfinished) and each pod's first moment running; for KEDA, hands that moment to the
    worker."""

    def __init__(self, api: client.ApiClient, namespace: str, worker: Worker | None) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self._pods: set[str] = set()
        self._early: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._worker = worker
        self._watches = [
            ListWatch(
                client.BatchV1Api(api).list_namespaced_job, namespace, self._on_job, name="jobs"
            ),
            ListWatch(
                client.CoreV1Api(api).list_namespaced_pod, namespace, self._on_pod, name="pods"
            ),
        ]
        for w in self._watches:
            if not w.synced.wait(60):
                raise SystemExit(f"watching {namespace}: no list within 60s")

    def _on_job(self, kind: str, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        name = meta["name"]
        finished, succeeded = _finished(obj)
        with self._lock:
            rec = self.jobs.get(name)
            if rec is None:
                sj = (meta.get("labels") or {}).get("scaledjob.keda.sh/name", "")
                rec = self.jobs[name] = JobRecord(sj, now, starts=self._early.pop(name, []))
            if finished and rec.finished is None:
                rec.finished, rec.succeeded = now, succeeded
            if kind == "DELETED" and rec.deleted is None:
                rec.deleted = now
                rec.deleted_unfinished = rec.finished is None

    def _on_pod(self, kind: str, obj: dict[str, Any], now: float) -> None:
        if (obj.get("status") or {}).get("phase") not in ("Running", "Succeeded", "Failed"):
            return
        uid = obj["metadata"]["uid"]
        labels = obj["metadata"].get("labels") or {}
        job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if job is None:
            return
        with self._lock:
            if uid in self._pods:
                return
            self._pods.add(uid)
            rec = self.jobs.get(job)
            if rec is None:  # the pod's event overtook its Job's
                self._early.setdefault(job, []).append(now)
                scaledjob = labels.get("scaledjob.keda.sh/name", "")
            else:
                rec.starts.append(now)
                scaledjob = rec.scaledjob
        if self._worker is not None:
            self._worker.take(scaledjob, job)

    def of(
        self, scaledjob: str, since: float = 0.0, until: float = float("inf")
    ) -> list[JobRecord]:
        with self._lock:
            return [
                copy.copy(r)
                for r in self.jobs.values()
                if r.scaledjob == scaledjob and since <= r.added <= until
            ]

    def get(self, name: str) -> JobRecord | None:
        with self._lock:
            rec = self.jobs.get(name)
            return copy.copy(rec) if rec else None

    def stop(self) -> None:
        for w in self._watches:
            w.stop()


class Attribution(Protocol):
    """Which Job did a message's work, and when it started."""

    def starts(self, scaledjob: str, mid: str) -> list[float]: ...
    def jobs_of(self, scaledjob: str, mid: str) -> list[str]: ...
    def no_message(self, scaledjob: str, since: float, until: float) -> int: ...


class JobrunnerAttribution:
    """jobrunner names each Job from its message: the Job is the message's."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def starts(self, scaledjob: str, mid: str) -> list[float]:
        rec = self.observer.get(job_name(scaledjob, mid))
        return list(rec.starts) if rec else []

    def jobs_of(self, scaledjob: str, mid: str) -> list[str]:
        name = job_name(scaledjob, mid)
        return [name] if self.observer.get(name) else []

    def no_message(self, scaledjob: str, since: float, until: float) -> int:
        return 0


class KedaAttribution:
    """A KEDA Job has no message until its worker takes one."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def starts(self, scaledjob: str, mid: str) -> list[float]:
        take = self.worker.taken.get(mid)
        return [take.at] if take and take.scaledjob == scaledjob else []

    def jobs_of(self, scaledjob: str, mid: str) -> list[str]:
        take = self.worker.taken.get(mid)
        return [take.job] if take and take.scaledjob == scaledjob else []

    def no_message(self, scaledjob: str, since: float, until: float) -> int:
        return sum(
            1 for t in self.worker.empty if t.scaledjob == scaledjob and since <= t.at <= until
        )


# ---------------------------------------------------------------- the two sides


class Side(Protocol):
    def start(self, doc: dict[str, Any]) -> None: ...
    def change(self, doc: dict[str, Any]) -> None: ...
    def stop(self) -> None: ...


class JobrunnerSide:
    """A real ``jobrunner run`` process per ScaledJob; a spec change restarts it with the
    changed manifest, as a Deployment rollout would."""

    def __init__(self, kubeconfig: str, work: Path) -> None:
        self.kubeconfig, self.work = kubeconfig, work
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, doc: dict[str, Any]) -> None:
        name = doc["metadata"]["name"]
        self.starts += 1
        manifest = self.work / f"{name}-{self.starts}.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        log = self.work / f"dispatcher-{name}-{self.starts}.log"
        self.proc = start_dispatcher(manifest, self.kubeconfig, log)
        wait_log(log, f"dispatching {name} from queue", timeout=60)

    def change(self, doc: dict[str, Any]) -> None:
        self.stop()
        self.start(doc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class KedaSide:
    """The ScaledJob as a custom resource, applied server-side as ``kubectl apply
    --server-side`` would (a change goes through KEDA's default rollout)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace

    def _apply(self, doc: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            KEDA_GROUP,
            KEDA_VERSION_API,
            self.namespace,
            KEDA_PLURAL,
            doc["metadata"]["name"],
            doc,
            field_manager="jobrunner-bench-keda",
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def start(self, doc: dict[str, Any]) -> None:
        name = doc["metadata"]["name"]
        self._apply(doc)
        deadline = time.time() + 60
        while time.time() < deadline:
            obj = self.custom.get_namespaced_custom_object(
                KEDA_GROUP, KEDA_VERSION_API, self.namespace, KEDA_PLURAL, name
            )
            conditions = (obj.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
                return
            time.sleep(0.2)
        raise SystemExit(f"KEDA never marked ScaledJob {self.namespace}/{name} Ready")

    def change(self, doc: dict[str, Any]) -> None:
        self._apply(doc)

    def stop(self) -> None:
        pass  # the ScaledJobs go with the namespace, while KEDA still runs


class Process:
    """A long-lived helper process (KEDA, the bench node's KWOK) this benchmark owns."""

    def __init__(self, what: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.what, self.log = what, log
        self.proc = subprocess.Popen(
            argv,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise SystemExit(
                f"{self.what} exited with {self.proc.returncode}; log {self.log}:\n{tail}"
            )

    def wait_for(self, test: Callable[[str], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check()
            if test(self.log.read_text(errors="replace")):
                return
            time.sleep(0.3)
        raise SystemExit(f"{self.what}: {what} not within {timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---------------------------------------------------------------- measuring


@dataclass
class Bench:
    api: client.ApiClient
    kubeconfig: str
    url: str
    run_id: str
    work: Path
    state: Path

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def queue(self, namespace: str, phase: str) -> str:
        name = f"{namespace}-{phase}"
        asyncio.run(declare_queue(self.url, name))
        return name

    def ready_count(self, queue: str) -> int:
        async def count() -> int:
            async with await aio_pika.connect(self.url) as connection:
                channel = await connection.channel()
                declared = await channel.declare_queue(queue, passive=True)
                return int(declared.declaration_result.message_count or 0)

        return asyncio.run(count())

    def purge(self, queue: str) -> None:
        async def purge() -> None:
            async with await aio_pika.connect(self.url) as connection:
                channel = await connection.channel()
                await (await channel.declare_queue(queue, passive=True)).purge()

        asyncio.run(purge())


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _triple(values: list[float], expected: int) -> str:
    if not values:
        return "none"
    text = " / ".join(_s(pct(values, p)) for p in (50, 95, 99))
    return text if len(values) >= expected else f"{text} ({expected - len(values)} never)"


def peak(records: list[JobRecord], sent: dict[str, float]) -> tuple[int, int]:
    """Most Jobs active at once (created, not finished or deleted), and how many messages
    had been published but had no Job yet when that peak was first reached (counted: Jobs
    created so far against messages published so far, as footnote 1 pairs them)."""
    events: list[tuple[float, int]] = []
    for r in records:
        events.append((r.added, 1))
        end = r.ended()
        if end is not None:
            events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))
    active = best = 0
    best_at = 0.0
    for at, delta in events:
        active += delta
        if active > best:
            best, best_at = active, at
    published = sum(1 for t in sent.values() if t <= best_at)
    created = sum(1 for r in records if r.added <= best_at)
    return best, max(0, published - created)


def wait_done(
    observer: Observer,
    attribution: Attribution,
    scaledjob: str,
    sent: dict[str, float],
    timeout: float,
) -> tuple[float, bool]:
    """Until every message's work has started and no Job of the ScaledJob is active."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        started = all(attribution.starts(scaledjob, mid) for mid in sent)
        active = [r for r in observer.of(scaledjob) if r.ended() is None]
        if started and not active:
            return time.time(), True
        time.sleep(0.5)
    return time.time(), False


def measure_flow(
    system: System,
    observer: Observer,
    attribution: Attribution,
    scaledjob: str,
    sent: dict[str, float],
    since: float,
    until: float,
) -> dict[str, Any]:
    records = observer.of(scaledjob, since, until)
    first_pub = min(sent.values())

    def started(mid: str) -> float | None:
        s = attribution.starts(scaledjob, mid)
        return min(s) if s else None

    if system.keda:
        # KEDA's Jobs carry no message: the n-th Job created answers the n-th message.
        adds = sorted(r.added for r in records)
        created = [a - p for a, p in zip(adds, sorted(sent.values()), strict=False)]
        all_jobs = adds[len(sent) - 1] - first_pub if len(adds) >= len(sent) else None
    else:
        created, adds = [], []
        for mid, t in sent.items():
            rec = observer.get(job_name(scaledjob, mid))
            if rec is not None:
                created.append(rec.added - t)
                adds.append(rec.added)
        all_jobs = max(adds) - first_pub if len(adds) == len(sent) else None
    starts = {mid: s for mid in sent if (s := started(mid)) is not None}
    work = [starts[mid] - t for mid, t in sent.items() if mid in starts]
    all_started = max(starts.values()) - first_pub if len(starts) == len(sent) else None
    top, waiting = peak(records, sent)
    return {
        "created": created,
        "work": work,
        "all_jobs": all_jobs,
        "all_started": all_started,
        "jobs": len(records),
        "messages": len(sent),
        "no_message": attribution.no_message(scaledjob, since, until),
        "not_started": len(sent) - len(starts),
        "peak": top,
        "waiting_at_peak": waiting,
    }


def timed_creates(
    kubeconfig: str, namespace: str, jobs: list[dict[str, Any]], rate: float
) -> list[tuple[str, float, float]]:
    """One create call at a time at ``rate`` per second, in a process of its own like a
    dispatcher: (name, call made, answer received)."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    batch = client.BatchV1Api(client.ApiClient(configuration))
    batch.list_namespaced_job(namespace, limit=1, _preload_content=False)  # warm the connection
    out = []
    start = time.monotonic()
    for i, job in enumerate(jobs):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        called = time.time()
        batch.create_namespaced_job(namespace, job, _preload_content=False)
        out.append((job["metadata"]["name"], called, time.time()))
    return out


# ---------------------------------------------------------------- namespaces


def create_namespace(core: client.CoreV1Api, name: str) -> None:
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # Jobs need the namespace's default ServiceAccount (made by the controller-manager).
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            core.read_namespaced_service_account("default", name)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        time.sleep(0.2)
    raise SystemExit(f"namespace {name}: no default ServiceAccount within 60s")


def release_finalizers(api: client.ApiClient, namespace: str) -> int:
    """Finalizers keep a namespace from going away once their owner has stopped: KEDA's on
    its ScaledJobs, jobrunner's on a Job whose message is not settled yet. Drops them, only
    ever in this benchmark's own namespaces, after the system has stopped; returns how
    many Jobs still carried jobrunner's."""
    batch = client.BatchV1Api(api)
    held = 0
    for job in json.loads(batch.list_namespaced_job(namespace, _preload_content=False).data)[
        "items"
    ]:
        finalizers = job["metadata"].get("finalizers") or []
        if FINALIZER in finalizers:
            held += 1
            batch.patch_namespaced_job(
                job["metadata"]["name"],
                namespace,
                {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER]}},
                _content_type="application/merge-patch+json",
            )
    custom = client.CustomObjectsApi(api)
    try:
        items = custom.list_namespaced_custom_object(
            KEDA_GROUP, KEDA_VERSION_API, namespace, KEDA_PLURAL
        )["items"]
    except ApiException:
        return held
    for item in items:
        if item["metadata"].get("finalizers"):
            custom.patch_namespaced_custom_object(
                KEDA_GROUP,
                KEDA_VERSION_API,
                namespace,
                KEDA_PLURAL,
                item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
                _content_type="application/merge-patch+json",
            )
    return held


def delete_namespace(core: client.CoreV1Api, name: str, timeout: float) -> float:
    start = time.time()
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise
    while time.time() - start < timeout:
        try:
            core.read_namespace(name)
        except ApiException as exc:
            if exc.status == 404:
                return time.time() - start
            raise
        time.sleep(1)
    print(f"  (namespace {name} still being deleted after {timeout:.0f}s; going on)", flush=True)
    return time.time() - start


# ---------------------------------------------------------------- the run


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_ready(core: client.CoreV1Api) -> bool:
    try:
        node = core.read_node(NODE)
    except ApiException:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def run_system(bench: Bench, system: System) -> dict[str, Any]:
    namespace = f"{PREFIX}{bench.run_id}-{system.key}"
    out: dict[str, Any] = {"load_before": load()}
    processes = stack_processes(bench.state)
    create_namespace(bench.core, namespace)
    keda: Process | None = None
    side: Side
    attribution: Attribution
    worker = Worker(bench.url)
    keda_worker = worker if system.keda else None
    observer = Observer(bench.api, namespace, keda_worker)
    if system.keda:
        keda = Process(
            "keda-operator",
            ["bash", str(DEPLOY / "keda-run.sh"), namespace],
            bench.work / f"keda-{system.key}.log",
        )
        keda.wait_for(
            lambda text: any(
                "Starting workers" in line and "scaledjob" in line for line in text.splitlines()
            ),
            120,
            "its ScaledJob controller starting",
        )
        side = KedaSide(bench.api, namespace)
        attribution = KedaAttribution(worker)
    else:
        side = JobrunnerSide(bench.kubeconfig, bench.work)
        attribution = JobrunnerAttribution(observer)
    print(
        f"\n{system.title}: namespace {namespace} (load {out['load_before']}; {busiest()})",
        flush=True,
    )
    try:
        out.update(phase_fast(bench, system, namespace, side, observer, attribution, keda_worker))
        if keda:
            keda.check()
        out.update(phase_spec(bench, system, namespace, side, observer, attribution, keda_worker))
        out.update(phase_slow(bench, system, namespace, side, observer, attribution, keda_worker))
        if keda:
            keda.check()
    finally:
        attempt("stopping the dispatcher", side.stop)
        out["load_after"] = load()
        if not system.keda:
            attempt("releasing finalizers", lambda: _report_held(bench, namespace))
        # Delete while KEDA still runs (it removes its finalizers) and while the bench
        # node's KWOK still finishes pod deletions; the next system starts on a clean slate.
        attempt(f"deleting namespace {namespace}", lambda: _delete_timed(bench, namespace))
        if keda:
            keda.stop()
            attempt("releasing finalizers", lambda: release_finalizers(bench.api, namespace))
            out["create_errors"] = keda.log.read_text(errors="replace").count(
                "Failed to create a new Job"
            )
        observer.stop()
        attempt("closing the worker", worker.close)
        if worker.errors:
            print(f"  worker errors: {worker.errors[:5]}", flush=True)
        # Others share this stack: say so if a part of it restarted during this system's run.
        now = stack_processes(bench.state)
        out["disturbed"] = [name for name, pid in processes.items() if now.get(name) != pid]
        if worker.connection_lost:
            out["disturbed"].append("RabbitMQ connection lost")
        if out["disturbed"]:
            print(
                f"  WARNING: during this run: restarted or lost: {', '.join(out['disturbed'])} "
                "(someone else's test?); these figures are not comparable",
                flush=True,
            )
    return out


def attempt(what: str, call: Callable[[], object]) -> None:
    """A teardown step that runs whatever happened before it: one that fails (the API
    server restarting under someone else's test, say) must not leave the benchmark's
    processes, namespaces or node behind."""
    try:
        call()
    except Exception as exc:
        print(f"  (teardown: {what} failed: {exc!r:.300})", flush=True)


def _report_held(bench: Bench, namespace: str) -> None:
    # Every message was settled before its phase ended; a Job still guarded now would be
    # jobrunner's to explain.
    held = release_finalizers(bench.api, namespace)
    if held:
        print(f"  {held} Job(s) still carried {FINALIZER} after the dispatcher stopped")


def _delete_timed(bench: Bench, namespace: str) -> None:
    waited = delete_namespace(bench.core, namespace, timeout=240)
    print(f"  namespace deleted in {waited:.0f}s", flush=True)


STACK_PARTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def stack_processes(state: Path) -> dict[str, str]:
    """Each stack process this benchmark uses (from stack-up's pid files) as pid and start
    time. RabbitMQ's node restarts its app in place: the worker's connection tells that."""
    out = {}
    for part in STACK_PARTS:
        pidfile = state / "pids" / f"{part}.pid"
        if not pidfile.exists():
            continue
        pid = pidfile.read_text().strip()
        try:
            started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            started = "gone"
        out[pidfile.stem] = f"{pid}@{started}"
    return out


def _doc(
    bench: Bench, system: System, namespace: str, name: str, queue: str, **kw: Any
) -> dict[str, Any]:
    return scaledjob_doc(name, namespace, queue, bench.url, system, **kw)


def phase_fast(
    bench: Bench,
    system: System,
    namespace: str,
    side: Side,
    observer: Observer,
    attribution: Attribution,
    worker: Worker | None,
) -> dict[str, Any]:
    name = "fast"
    queue = bench.queue(namespace, name)
    if worker:
        worker.queues[name] = queue
    side.start(
        _doc(
            bench,
            system,
            namespace,
            name,
            queue,
            pod_annotations={"kwok.jobrunner.dev/run-duration": RUN_FOR},
        )
    )
    out: dict[str, Any] = {}
    for phase, count, rate in (("steady", STEADY, RATE), ("burst", BURST, None)):
        since = time.time()
        ids = [f"{system.key}-{phase}-{i}" for i in range(count)]
        sent = asyncio.run(publish_many(bench.url, queue, ids, rate))
        timeout = 120 + 3 * system.poll_seconds()
        until, done = wait_done(observer, attribution, name, sent, timeout)
        figures = measure_flow(system, observer, attribution, name, sent, since, until)
        figures["left"] = bench.ready_count(queue)
        figures["timed_out"] = not done
        if not done:
            bench.purge(queue)
        out[phase] = figures
        print(
            f"  {phase}: {count} msgs{f' at {rate:.0f}/s' if rate else ' at once'}: "
            f"publish->Job created p50 {_s(pct(figures['created'], 50)) if figures['created'] else '—'}, "
            f"publish->work start p50 {_s(pct(figures['work'], 50)) if figures['work'] else '—'}, "
            f"all started after {_s(figures['all_started'])}, {figures['jobs']} Jobs"
            f"{'' if done else f' (NOT DONE after {timeout:.0f}s)'}",
            flush=True,
        )
    side.stop()
    return out


def phase_spec(
    bench: Bench,
    system: System,
    namespace: str,
    side: Side,
    observer: Observer,
    attribution: Attribution,
    worker: Worker | None,
) -> dict[str, Any]:
    name = "spec"
    queue = bench.queue(namespace, name)
    if worker:
        worker.queues[name] = queue
    annotations = {"kwok.jobrunner.dev/run-duration": SPEC_RUN_FOR}
    side.start(_doc(bench, system, namespace, name, queue, pod_annotations=annotations))
    ids = [f"{system.key}-spec-{i}" for i in range(SPEC_JOBS)]
    sent = asyncio.run(publish_many(bench.url, queue, ids, None))
    deadline = time.time() + 60 + 2 * system.poll_seconds()
    while time.time() < deadline:
        if all(attribution.starts(name, mid) for mid in sent):
            break
        time.sleep(0.2)
    running = sum(1 for mid in sent if attribution.starts(name, mid))
    changed_at = time.time()
    side.change(
        _doc(
            bench,
            system,
            namespace,
            name,
            queue,
            pod_annotations=annotations,
            template_version="2",
        )
    )
    # Until every Job has ended and nothing waits in the queue (a requeued message would
    # be taken up again): at most the Jobs' run time plus a margin.
    deadline = time.time() + 40 + 60 + 2 * system.poll_seconds()
    while time.time() < deadline:
        active = [r for r in observer.of(name) if r.ended() is None]
        if not active and time.time() - changed_at > 5 and bench.ready_count(queue) == 0:
            break
        time.sleep(0.5)
    records = observer.of(name)
    deleted = sum(1 for r in records if r.deleted_unfinished and r.starts)
    after = sum(1 for r in records if r.added > changed_at)
    lost = repeated = done = 0
    for mid in sent:
        starts = attribution.starts(name, mid)
        jobs = [observer.get(j) for j in attribution.jobs_of(name, mid)]
        completed = any(j is not None and j.succeeded for j in jobs)
        work_runs = (
            sum(len(j.starts) for j in jobs if j is not None) if not system.keda else len(starts)
        )
        if completed:
            done += 1
        elif starts:
            lost += 1
        if work_runs > 1:
            repeated += 1
    left = bench.ready_count(queue)
    print(
        f"  spec change with {running} Jobs running: {deleted} running Jobs deleted, "
        f"work lost for {lost}, repeated for {repeated}, completed for {done}; "
        f"{after} Jobs created after the change; {left} messages left",
        flush=True,
    )
    side.stop()
    return {
        "spec": {
            "running": running,
            "deleted": deleted,
            "lost": lost,
            "repeated": repeated,
            "completed": done,
            "after": after,
            "left": left,
        }
    }


def phase_slow(
    bench: Bench,
    system: System,
    namespace: str,
    side: Side,
    observer: Observer,
    attribution: Attribution,
    worker: Worker | None,
) -> dict[str, Any]:
    name = "slow"
    queue = bench.queue(namespace, name)
    if worker:
        worker.queues[name] = queue
    side.start(
        _doc(
            bench,
            system,
            namespace,
            name,
            queue,
            pod_annotations={
                "kwok.jobrunner.dev/start-delay": SLOW_START,
                "kwok.jobrunner.dev/run-duration": RUN_FOR,
            },
        )
    )
    since = time.time()
    ids = [f"{system.key}-slow-{i}" for i in range(SLOW_MESSAGES)]
    sent = asyncio.run(publish_many(bench.url, queue, ids, SLOW_RATE))
    timeout = 120 + 3 * system.poll_seconds()
    until, done = wait_done(observer, attribution, name, sent, timeout)
    figures = measure_flow(system, observer, attribution, name, sent, since, until)
    figures["left"] = bench.ready_count(queue)
    figures["timed_out"] = not done
    print(
        f"  slow start ({SLOW_MESSAGES} msgs at {SLOW_RATE:.0f}/s, pods start after "
        f"{SLOW_START}): {figures['jobs']} Jobs, {figures['no_message']} found no message, "
        f"publish->work start p50 {_s(pct(figures['work'], 50)) if figures['work'] else '—'}"
        f"{'' if done else f' (NOT DONE after {timeout:.0f}s)'}",
        flush=True,
    )
    side.stop()
    return {"slow": figures}


def baseline(bench: Bench, when: str) -> dict[str, list[float]]:
    """Bare create calls for the same Jobs jobrunner creates, one at a time at the steady
    rate: the API server's own answer time, which no launcher can beat. Measured before
    the first system and after the last, so a change in the machine's load shows."""
    namespace = f"{PREFIX}{bench.run_id}-bare-{when}"
    create_namespace(bench.core, namespace)
    observer = Observer(bench.api, namespace, None)
    try:
        doc = scaledjob_doc(
            "fast",
            namespace,
            "unused",
            bench.url,
            SYSTEMS[0],
            pod_annotations={"kwok.jobrunner.dev/run-duration": RUN_FOR},
        )
        jobs = rendered_jobs(doc, f"bare-{when}", BASELINE)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            calls = pool.submit(timed_creates, bench.kubeconfig, namespace, jobs, RATE).result()
        deadline = time.time() + 30
        while time.time() < deadline and not all(observer.get(n) for n, _, _ in calls):
            time.sleep(0.2)
        answer = [done - called for _, called, done in calls]
        added = [rec.added - called for n, called, _ in calls if (rec := observer.get(n))]
        print(
            f"\nbare create calls {when} ({BASELINE} at {RATE:.0f}/s): answer p50 "
            f"{_s(pct(answer, 50))}, call->watch ADDED p50 {_s(pct(added, 50))}",
            flush=True,
        )
        return {"answer": answer, "added": added}
    finally:
        observer.stop()
        attempt(
            f"deleting namespace {namespace}",
            lambda: delete_namespace(bench.core, namespace, timeout=240),
        )


def conditions(api: client.ApiClient, url: str) -> list[str]:
    version = client.VersionApi(api).get_code()
    keda_version = subprocess.run(
        ["bash", "-c", f"source {DEPLOY}/common.sh; echo $KEDA_VERSION $KWOK_VERSION"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()

    async def rabbit() -> str:
        async with await aio_pika.connect(url) as connection:
            props = connection.transport.connection.server_properties  # type: ignore[union-attr]
            return str(props.get("version", "?"))

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
    ).stdout.strip()
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return [
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, "
        f"{int(mem) / 1024 / 1024:.0f} GiB; {platform.system()} {platform.release()}",
        f"jobrunner {commit}{' (uncommitted changes)' if dirty else ''}, Python "
        f"{platform.python_version()}; KEDA {keda_version[0]} (built from source); "
        f"Kubernetes {version.git_version}; KWOK {keda_version[1]}; RabbitMQ {asyncio.run(rabbit())}",
    ]


def busiest() -> str:
    """What else the machine is doing: the processes using most CPU over two seconds (from
    top), and how many test runs (pytest) are going on."""
    frames = subprocess.run(
        ["top", "-b", "-n", "2", "-d", "2", "-o", "%CPU", "-w", "200"],
        capture_output=True,
        text=True,
    ).stdout
    lines = frames.split("\ntop - ")[-1].splitlines()
    header = next((i for i, line in enumerate(lines) if line.split()[:1] == ["PID"]), len(lines))
    top = []
    for line in lines[header + 1 : header + 7]:
        cols = line.split()
        if len(cols) >= 12 and float(cols[8]) >= 1:
            top.append(f"{cols[11]} {cols[8]}%")
    tests = subprocess.run(["pgrep", "-fc", "bin/pytest"], capture_output=True, text=True)
    return f"{', '.join(top) or 'nothing over 1%'}; pytest processes: {tests.stdout.strip() or 0}"


def _delete_run_namespaces(bench: Bench) -> None:
    """Whatever is left of this run's namespaces, finalizers released first (their owners
    have stopped)."""
    for ns in bench.core.list_namespace().items:
        if ns.metadata.name.startswith(f"{PREFIX}{bench.run_id}"):
            release_finalizers(bench.api, ns.metadata.name)
            delete_namespace(bench.core, ns.metadata.name, timeout=120)


def _delete_node(core: client.CoreV1Api) -> None:
    try:
        core.delete_node(NODE)
    except ApiException as exc:
        if exc.status != 404:
            raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--systems",
        default=",".join(s.key for s in SYSTEMS),
        help="which systems, in order (default: all: %(default)s)",
    )
    args = parser.parse_args()
    # SIGTERM (make's, timeout's) unwinds like Ctrl-C, so the teardown stops KEDA and the
    # bench node's KWOK and deletes what this run made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    known = {s.key: s for s in SYSTEMS}
    try:
        systems = [known[k] for k in args.systems.split(",")]
    except KeyError as exc:
        parser.error(f"unknown system {exc}; known: {', '.join(known)}")
    stack = env_file()
    kubeconfig, url = stack["JOBRUNNER_TEST_KUBECONFIG"], stack["JOBRUNNER_TEST_RABBITMQ_URL"]
    api = config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = 16
    core = client.CoreV1Api(api)
    work = Path(tempfile.mkdtemp(prefix="jobrunner-bench-keda-"))
    run_id = uuid.uuid4().hex[:6]
    state = Path(stack.get("JOBRUNNER_TEST_STACK_STATE", "/tmp/jobrunner-stack"))
    bench = Bench(api, kubeconfig, url, run_id, work, state)
    began = time.time()
    print(
        "bench-keda: jobrunner and the real KEDA operator, the same RabbitMQ workload, one "
        f"system at a time; logs in {work}\n"
        f"  every system: maxReplicaCount {MAX_REPLICAS}, history limits {HISTORY}/{HISTORY}, "
        f"one Job template (pods run {RUN_FOR} on a KWOK node), the same ScaledJob document\n"
        "  KEDA's Jobs fetch their own message: this benchmark plays that worker. When a KEDA "
        "Job's pod first runs, it takes one message (basic.get) and acks it at once; a Job "
        "that finds the queue empty counts as 'found no message'.\n"
        "  KEDA runs out of cluster with --kube-api-qps=200 --kube-api-burst=300 (its "
        "defaults, 20/30, would throttle its creates; jobrunner has no such throttle).",
        flush=True,
    )
    for line in conditions(api, url):
        print(f"  {line}", flush=True)
    print(f"  load average at start {load()}; busiest processes: {busiest()}", flush=True)

    node = Process(
        "kwok (bench node)",
        ["bash", str(DEPLOY / "kwok-node-run.sh"), NODE, str(free_port())],
        work / "kwok-node.log",
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        deadline = time.time() + 60
        while not node_ready(core):
            node.check()
            if time.time() > deadline:
                raise SystemExit(f"node {NODE} not Ready within 60s; see {node.log}")
            time.sleep(0.5)
        for ns in core.list_namespace().items:
            if ns.metadata.name.startswith(PREFIX):
                release_finalizers(api, ns.metadata.name)
        # Another benchmark's namespaces (this one's, or make bench's thousands of Jobs)
        # load the API server for minutes: measure once they are gone.
        waited = wait_for_earlier_runs(core, (PREFIX, "bench-", "prof-"))
        if waited:
            print(f"  waited {waited:.0f}s for other benchmark namespaces to go", flush=True)
        base = baseline(bench, "before")
        for system in systems:
            results[system.key] = run_system(bench, system)
        after = baseline(bench, "after")
        base = {k: base[k] + after[k] for k in base}
    finally:
        attempt("deleting this run's namespaces", lambda: _delete_run_namespaces(bench))
        node.stop()
        attempt(f"deleting node {NODE}", lambda: _delete_node(core))
        for system in systems:
            for phase in ("fast", "spec", "slow"):
                queue = f"{PREFIX}{run_id}-{system.key}-{phase}"
                attempt(
                    f"deleting queue {queue}", lambda q=queue: asyncio.run(delete_queue(url, q))
                )
    print_table(systems, base, results)
    print(
        f"\nrun took {(time.time() - began) / 60:.1f} min; load average at the end {load()}; "
        f"per system (1/5/15 min, before -> after): "
        + "; ".join(
            f"{s.title} {results[s.key]['load_before']} -> {results[s.key]['load_after']}"
            for s in systems
        ),
        flush=True,
    )
    return 0


def _times(factor: float) -> str:
    return f"{factor:.1f}x" if factor < 100 else f"{factor:.0f}x"


def _ratio(jr: float | None, other: float | None) -> str:
    if jr is None or other is None or other == 0:
        return "—"
    ratio = jr / other
    return f"{ratio:.2g} (1/{1 / ratio:.0f})" if 0 < ratio < 0.5 else f"{ratio:.2f}"


def print_table(
    systems: list[System], base: dict[str, Any], results: dict[str, dict[str, Any]]
) -> None:
    cols = [s.title for s in systems]
    r = [results[s.key] for s in systems]
    jr = results.get("jr")
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cells: list[str]) -> None:
        rows.append((label, cells))

    def figure(x: dict[str, Any], phase: str, key: str) -> float | None:
        """A figure, or the p50 of a list of them."""
        value = x[phase][key]
        if isinstance(value, list):
            return pct(value, 50) if value else None
        return float(value) if value is not None else None

    def ratio_row(label: str, phase: str, key: str) -> None:
        row(
            label,
            [_ratio(figure(jr, phase, key), figure(x, phase, key)) if jr else "—" for x in r],
        )

    for phase, title in (
        ("steady", f"steady, {STEADY} msgs at {RATE:.0f}/s"),
        ("burst", f"burst, {BURST} msgs at once"),
    ):
        row(
            f"**{title}**: publish -> Job created (watch ADDED) p50 / p95 / p99 ¹",
            [_triple(x[phase]["created"], x[phase]["messages"]) for x in r],
        )
        ratio_row("  jobrunner / this, p50", phase, "created")
        row(
            "publish -> work start (pod running with its message) p50 / p95 / p99",
            [_triple(x[phase]["work"], x[phase]["messages"]) for x in r],
        )
        ratio_row("  jobrunner / this, p50", phase, "work")
        if phase == "burst":
            row(
                "every message has a Job, after the first publish ¹",
                [_s(x["burst"]["all_jobs"]) for x in r],
            )
            ratio_row("  jobrunner / this", "burst", "all_jobs")
            row(
                "every message's work has started (KEDA: taken)",
                [_s(x["burst"]["all_started"]) for x in r],
            )
            ratio_row("  jobrunner / this", "burst", "all_started")
        row("Jobs per message", [f"{x[phase]['jobs'] / x[phase]['messages']:.2f}" for x in r])
        row(
            "Jobs that found no message ²",
            [
                ("0 (carries its message)" if not systems[i].keda else str(x[phase]["no_message"]))
                for i, x in enumerate(r)
            ],
        )
        row(
            "messages left in the queue at the end",
            [str(x[phase]["left"]) + (" (timed out)" if x[phase]["timed_out"] else "") for x in r],
        )
        row(f"peak active Jobs (limit {MAX_REPLICAS})", [str(x[phase]["peak"]) for x in r])
        row(
            "messages waiting for a Job when that peak was reached",
            [str(x[phase]["waiting_at_peak"]) for x in r],
        )
    answer, added = base["answer"], base["added"]
    same = ["(same cluster, same run)"] * (len(cols) - 1)
    row(
        f"**bare create call** of the same Job, 2 x {BASELINE} at {RATE:.0f}/s (before and "
        "after the systems): answer p50 / p95 / p99",
        [_triple(answer, 2 * BASELINE), *same],
    )
    row("bare create call -> watch ADDED p50 / p95 / p99", [_triple(added, 2 * BASELINE), *same])
    row(
        "publish -> Job created p50 ÷ bare call -> ADDED p50 (steady)",
        [
            _times(created / pct(added, 50)) if (created := figure(x, "steady", "created")) else "—"
            for x in r
        ],
    )
    row(
        f"**spec change** while {SPEC_JOBS} Jobs run ({SPEC_RUN_FOR} each): Jobs running then",
        [str(x["spec"]["running"]) for x in r],
    )
    row("running Jobs deleted", [str(x["spec"]["deleted"]) for x in r])
    row("messages whose work was lost ³", [str(x["spec"]["lost"]) for x in r])
    row("messages whose work was repeated", [str(x["spec"]["repeated"]) for x in r])
    row("Jobs created after the change", [str(x["spec"]["after"]) for x in r])
    slow = (
        f"**slow start**, pods start {SLOW_START} late, {SLOW_MESSAGES} msgs at {SLOW_RATE:.0f}/s"
    )
    row(
        f"{slow}: Jobs per message", [f"{x['slow']['jobs'] / x['slow']['messages']:.2f}" for x in r]
    )
    row(
        "Jobs that found no message ²",
        [
            ("0 (carries its message)" if not systems[i].keda else str(x["slow"]["no_message"]))
            for i, x in enumerate(r)
        ],
    )
    row(
        "publish -> work start p50 / p95 / p99",
        [_triple(x["slow"]["work"], x["slow"]["messages"]) for x in r],
    )
    row("peak active Jobs", [str(x["slow"]["peak"]) for x in r])
    row(
        "messages left in the queue at the end",
        [str(x["slow"]["left"]) + (" (timed out)" if x["slow"]["timed_out"] else "") for x in r],
    )

    print("\n| figure | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        "\n¹ KEDA's Jobs carry no message: its n-th Job created is paired with the n-th message "
        "published; jobrunner's Job is named from its message.\n"
        "² This benchmark plays KEDA's worker: one basic.get + ack when a KEDA Job's pod first "
        "runs; 'found no message' means the queue was empty then.\n"
        "³ Lost: the message was taken (acked) by a Job that was then deleted before it "
        "completed. A worker that acked only at the end would see these repeated instead."
    )
    for s in systems:
        if results[s.key]["disturbed"]:
            print(
                f"WARNING: {s.title}: the shared stack was disturbed during its run "
                f"({', '.join(results[s.key]['disturbed'])}); its figures are not comparable"
            )
    errors = [f"{s.title} {results[s.key]['create_errors']}" for s in systems if s.keda]
    if errors:
        print(
            "KEDA's own log, 'Failed to create a new Job' (each poll's creates share a "
            "deadline of one pollingInterval): " + ", ".join(errors)
        )


if __name__ == "__main__":
    sys.exit(main())
