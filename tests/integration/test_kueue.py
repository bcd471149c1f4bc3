"""jobrunner on the real Kueue of the stack (deploy/local/kueue.sh): a queued ScaledJob's
messages become one Job each, wait for quota within ``maxPendingAdmission``, survive
preemption and a dispatcher's SIGKILL, are dead-lettered with Kueue's reason when they
can never fit, and two namespaces' ScaledJobs share one ClusterQueue's quota (the global
cap KEDA lacks, kedacore/keda #5889).

Each test makes its own ClusterQueue, LocalQueues and WorkloadPriorityClasses. A
``JobWatch`` follows every Job of the test's namespaces through a real watch and keeps
the peaks (Jobs admitted at once, Jobs waiting at once) and every uid seen per name.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from jobrunner.core.admission import ANNOTATION_EVICTIONS
from jobrunner.core.models import LABEL_MANAGED_BY
from tests.helpers import eventually
from tests.integration.harness import (
    Dispatcher,
    drain_queue,
    finished,
    jobs_of,
    publish,
    queue_depth,
    write_manifest,
)
from tests.integration.kueue import PRIORITY_CLASS_LABEL, QUEUE_NAME_LABEL, Kueue

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]

RUN_DURATION = "kwok.jobrunner.dev/run-duration"


def queued_job(
    queue: str, *, cpu: str = "1", priority: str | None = None, seconds: str | None = None
) -> dict[str, Any]:
    """A JobSpec template whose pod names the LocalQueue as KEDA users write it (a pod
    template label, copied to the Job) and asks for ``cpu`` (Kueue counts requests)."""
    labels = {QUEUE_NAME_LABEL: queue}
    if priority:
        labels[PRIORITY_CLASS_LABEL] = priority
    return {
        "backoffLimit": 0,
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {
                    RUN_DURATION: seconds or "{{ message.json.get('seconds', 1) }}s",
                },
            },
            "spec": {
                "containers": [
                    {
                        "name": "work",
                        "image": "busybox:1.36",
                        "resources": {"requests": {"cpu": cpu, "memory": "32Mi"}},
                    }
                ]
            },
        },
    }


class JobWatch:
    """Every jobrunner Job of ``namespaces``, followed by one watch in a thread: the most
    admitted (unsuspended, unfinished) and the most waiting (suspended, unfinished) at
    any one time, and the uids seen per name (a second uid is a second Job)."""

    def __init__(self, api: client.ApiClient, namespaces: set[str]) -> None:
        self._batch = client.BatchV1Api(api)
        self._namespaces = namespaces
        self._state: dict[tuple[str, str], tuple[bool, bool]] = {}
        self.uids: dict[tuple[str, str], set[str]] = {}
        self.peak_admitted = 0
        self.peak_waiting = 0
        self._stop = threading.Event()
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self._watch.stream(
                    self._batch.list_job_for_all_namespaces,
                    label_selector=f"{LABEL_MANAGED_BY}=jobrunner",
                    timeout_seconds=30,
                ):
                    self._seen(event["type"], event["object"])
                    if self._stop.is_set():
                        return
            except Exception:  # a dropped watch: start over (the peaks are kept)
                if self._stop.wait(0.5):
                    return

    def _seen(self, kind: str, job: client.V1Job) -> None:
        key = (job.metadata.namespace, job.metadata.name)
        if key[0] not in self._namespaces:
            return
        self.uids.setdefault(key, set()).add(job.metadata.uid)
        if kind == "DELETED" or finished(job) is not None:
            self._state.pop(key, None)
        else:
            self._state[key] = (bool(job.spec.suspend), True)
        admitted = sum(1 for suspended, _ in self._state.values() if not suspended)
        waiting = len(self._state) - admitted
        self.peak_admitted = max(self.peak_admitted, admitted)
        self.peak_waiting = max(self.peak_waiting, waiting)

    def duplicates(self) -> list[tuple[str, str]]:
        return [key for key, uids in self.uids.items() if len(uids) > 1]

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()


@pytest.fixture
def job_watch(kube_api: client.ApiClient) -> Iterator[Callable[..., JobWatch]]:
    made: list[JobWatch] = []

    def start(*namespaces: str) -> JobWatch:
        made.append(JobWatch(kube_api, set(namespaces)))
        return made[-1]

    yield start
    for w in made:
        w.stop()


def queued_manifest(
    tmp_path: Path, namespace: str, queue: str, url: str, job_spec: dict[str, Any], **spec: Any
) -> Path:
    return write_manifest(
        tmp_path / f"work-{namespace}.yaml",
        name="work",
        namespace=namespace,
        queue=queue,
        url=url,
        job_spec=job_spec,
        **spec,
    )


def names(prefix: str) -> tuple[str, str]:
    run = uuid.uuid4().hex[:8]
    return f"{prefix}-cq-{run}", f"{prefix}-lq-{run}"


async def complete(kube_api: client.ApiClient, namespace: str, count: int, within: float) -> None:
    async def done() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return sum(1 for j in jobs if finished(j) == "Complete") >= count

    await eventually(done, within=within, interval=0.5)


async def test_a_quota_of_two_admits_two_at_a_time_and_bounds_the_waiting_ones(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    kueue: Kueue,
    job_watch: Callable[..., JobWatch],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    cq, lq = names("two")
    kueue.cluster_queue(cq, cpu="2", memory="1Gi")
    kueue.local_queue(namespace, lq, cluster_queue=cq)
    watching = job_watch(namespace)
    dispatcher = dispatchers(
        queued_manifest(
            tmp_path, namespace, queue, rabbitmq_url, queued_job(lq), maxPendingAdmission=3
        )
    )
    for i in range(10):
        await publish(rabbitmq_url, queue, json.dumps({"seconds": 2}).encode(), message_id=f"m{i}")

    await complete(kube_api, namespace, 10, within=240)
    await dispatcher.settled("ack", 10, within=60)
    jobs = jobs_of(kube_api, namespace, "work")
    assert len(jobs) == 10, "every message one Job"
    assert sorted(j.metadata.annotations["jobrunner.dev/message-id"] for j in jobs) == sorted(
        f"m{i}" for i in range(10)
    )
    assert watching.duplicates() == []
    assert watching.peak_admitted <= 2, f"Kueue's quota: {watching.peak_admitted} admitted"
    assert watching.peak_waiting <= 3, f"maxPendingAdmission: {watching.peak_waiting} waiting"
    assert watching.peak_waiting >= 1, "the quota made some wait (else this proves nothing)"
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    assert dispatcher.settlements("dead-letter") == 0
    assert "admitted by Kueue" in dispatcher.logs()


async def test_a_higher_priority_message_preempts_and_the_evicted_job_finishes_later(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    kueue: Kueue,
    job_watch: Callable[..., JobWatch],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    cq, lq = names("prio")
    low, high = f"low-{uuid.uuid4().hex[:8]}", f"high-{uuid.uuid4().hex[:8]}"
    kueue.priority_class(low, value=10)
    kueue.priority_class(high, value=1000)
    kueue.cluster_queue(cq, cpu="1", memory="1Gi")
    kueue.local_queue(namespace, lq, cluster_queue=cq)
    watching = job_watch(namespace)
    spec = queued_job(lq, priority="{{ message.headers.get('priority') }}")
    dispatcher = dispatchers(queued_manifest(tmp_path, namespace, queue, rabbitmq_url, spec))
    await publish(
        rabbitmq_url, queue, b'{"seconds": 20}', message_id="slow-low", headers={"priority": low}
    )

    async def running_low() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return any(not j.spec.suspend and (j.status.active or 0) > 0 for j in jobs)

    await eventually(running_low, within=60, interval=0.3)
    await publish(
        rabbitmq_url, queue, b'{"seconds": 1}', message_id="urgent", headers={"priority": high}
    )

    await complete(kube_api, namespace, 2, within=180)
    await dispatcher.settled("ack", 2, within=60)
    jobs = {
        j.metadata.annotations["jobrunner.dev/message-id"]: j
        for j in jobs_of(kube_api, namespace, "work")
    }
    assert set(jobs) == {"slow-low", "urgent"}
    evicted = jobs["slow-low"]
    assert evicted.metadata.annotations.get(ANNOTATION_EVICTIONS) == "1"
    assert jobs["urgent"].status.completion_time < evicted.status.completion_time
    assert watching.duplicates() == [], "the evicted Job kept its name and uid"
    assert dispatcher.settlements("ack") == 2
    assert dispatcher.settlements("dead-letter") == 0
    events = client.CoreV1Api(kube_api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={evicted.metadata.name}"
    )
    told = [
        e.message
        for e in events.items
        if e.reason == "Evicted" and e.source.component != "job-controller"
    ]
    assert any("Preempted" in (m or "") for m in told), told


@pytest.mark.parametrize("why", ["NeverFits", "Inadmissible", "NoWorkload"])
async def test_a_job_kueue_can_never_admit_is_dead_lettered_with_kueues_reason(
    why: str,
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    kueue: Kueue,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    cq, lq = names("never")
    kueue.cluster_queue(cq, cpu="2", memory="1Gi")
    if why == "NeverFits":
        kueue.local_queue(namespace, lq, cluster_queue=cq)
        spec = queued_job(lq, cpu="8")  # more than the queue could ever hold
    elif why == "Inadmissible":
        spec = queued_job(f"{lq}-missing")  # a LocalQueue nobody made
    else:
        # A WorkloadPriorityClass nobody made: Kueue makes no Workload and says so only
        # in its own log (a new user's first hour with the README's example).
        kueue.local_queue(namespace, lq, cluster_queue=cq)
        spec = queued_job(lq, priority=f"missing-{uuid.uuid4().hex[:8]}")
    dispatcher = dispatchers(
        queued_manifest(
            tmp_path, namespace, queue, rabbitmq_url, spec, inadmissibleTimeoutSeconds=3
        )
    )
    await publish(rabbitmq_url, queue, b'{"seconds": 1}', message_id="too-big")

    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=120)
    assert dead.message_id == "too-big"
    assert dead.headers["x-jobrunner-reason"] == why
    detail = str(dead.headers["x-jobrunner-detail"])
    assert detail.startswith("Kueue cannot admit it: ")
    expected = {
        "NeverFits": "maximum capacity",
        "Inadmissible": "doesn't exist",
        "NoWorkload": "WorkloadPriorityClass",
    }
    assert expected[why] in detail

    async def gone() -> bool:
        return not await asyncio.to_thread(jobs_of, kube_api, namespace, "work")

    await eventually(gone, within=60, interval=0.5)
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0
    assert dispatcher.settlements("dead-letter") == 1


async def test_dispatcher_killed_while_jobs_wait_for_admission_loses_nothing(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    kueue: Kueue,
    job_watch: Callable[..., JobWatch],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    cq, lq = names("kill")
    kueue.cluster_queue(cq, cpu="1", memory="1Gi")
    kueue.local_queue(namespace, lq, cluster_queue=cq)
    watching = job_watch(namespace)
    manifest = queued_manifest(
        tmp_path, namespace, queue, rabbitmq_url, queued_job(lq), maxPendingAdmission=2
    )
    first = dispatchers(manifest)
    for i in range(5):
        await publish(rabbitmq_url, queue, b'{"seconds": 3}', message_id=f"k{i}")

    async def some_wait() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return sum(1 for j in jobs if j.spec.suspend and finished(j) is None) >= 1

    await eventually(some_wait, within=60, interval=0.2)
    first.kill()
    second = dispatchers(manifest)

    await complete(kube_api, namespace, 5, within=240)
    await second.settled("ack", 1, within=60)

    async def drained() -> bool:
        return (await queue_depth(rabbitmq_url, queue))[0] == 0

    await eventually(drained, within=60, interval=0.5)
    jobs = jobs_of(kube_api, namespace, "work")
    assert len(jobs) == 5
    assert watching.duplicates() == []
    assert watching.peak_waiting <= 2
    assert first.settlements("dead-letter") + second.settlements("dead-letter") == 0


async def test_two_namespaces_share_one_cluster_queue_and_its_cap(
    kube_api: client.ApiClient,
    namespace: str,
    second_namespace: str,
    queue: str,
    second_queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    kueue: Kueue,
    job_watch: Callable[..., JobWatch],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    cq, lq = names("shared")
    kueue.cluster_queue(cq, cpu="2", memory="1Gi")
    pairs = [(namespace, queue), (second_namespace, second_queue)]
    for ns, _ in pairs:
        kueue.local_queue(ns, lq, cluster_queue=cq)
    watching = job_watch(namespace, second_namespace)
    started = [
        dispatchers(
            queued_manifest(tmp_path, ns, q, rabbitmq_url, queued_job(lq), maxPendingAdmission=2)
        )
        for ns, q in pairs
    ]
    for i in range(5):
        for _, q in pairs:
            await publish(rabbitmq_url, q, b'{"seconds": 2}', message_id=f"s{i}")

    for ns, _ in pairs:
        await complete(kube_api, ns, 5, within=300)
    for d in started:
        await d.settled("ack", 5, within=60)
    assert watching.peak_admitted <= 2, "one ClusterQueue's quota across both ScaledJobs"
    assert watching.peak_waiting <= 4, "maxPendingAdmission 2 each"
    assert watching.peak_waiting >= 1
    assert watching.duplicates() == []
