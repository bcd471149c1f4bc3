"""Kueue: publish → Job admitted and publish → Job running for a queued ScaledJob, beside
a bare ``create`` of the same queued Job by one API call, measured in the same run.

* jobrunner: a real ``jobrunner run`` process serves a RabbitMQ ScaledJob whose pod
  template names a LocalQueue (the label ``kueue.x-k8s.io/queue-name``, cpu and memory
  requests); ``maxPendingAdmission`` and ``maxReplicaCount`` are far above the
  concurrency, so jobrunner never holds a message back. Each message is timed from its
  publish call to its Job's first appearance in a watch (created), to the Job first seen
  with ``spec.suspend: false`` (admitted: Kueue's webhook creates it suspended, Kueue's
  scheduler unsuspends it) and to its pod first seen ``Running`` or past it (running:
  KWOK's stages run the pod on the KWOK node, where the flavor's node label sends it);
* bare create: the same Job (jobrunner's own renderer's output, less its settlement
  finalizer) created by ``create_namespaced_job`` from a process of its own, timed from
  the call through the same watches.

The run makes its own ClusterQueue (quota far above the load, so admission is never
bound by quota), LocalQueue, namespace and RabbitMQ queue, and deletes them at the end.
At each concurrency (``--concurrency 1,16``: that many messages published, or creates
in flight, at once, and the next batch only once all of them run), jobrunner's block and
the bare block alternate ``--rounds`` times, so both see the same load. The ratios are
of the medians. Every Job must be first seen suspended (else Kueue never held it and the
figures would not be Kueue's): the run stops if one is not.

    python bench/bench_kueue.py [--runs 64] [--concurrency 1,16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from bench_http import create_block
from benchlib import (
    ListWatch,
    declare_queue,
    delete_queue,
    env_file,
    pct,
    publish_many,
    rendered_jobs,
    start_dispatcher,
    wait_log,
)
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from jobrunner.core.admission import LABEL_QUEUE_NAME
from jobrunner.core.models import FINALIZER
from jobrunner.core.naming import job_name

NAME = "queued"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
STAGES = ("created", "admitted", "running")
RAN = ("Running", "Succeeded", "Failed")
"""A pod phase at or past Running: a pod KWOK ends at once may be seen first Succeeded."""

# (created, admitted, running) in ms after the publish or the create call
Sample = tuple[float, float, float]


def scaledjob(namespace: str, local_queue: str, url: str, queue: str) -> dict[str, Any]:
    """A RabbitMQ ScaledJob whose Jobs go through ``local_queue``: the Kueue label on
    the pod template (jobrunner copies it to the Job), requests Kueue counts."""
    resources = {"requests": {"cpu": "100m", "memory": "32Mi"}}
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "maxReplicaCount": 100,
            "maxPendingAdmission": 100,
            "successfulJobsHistoryLimit": 10_000,
            "failedJobsHistoryLimit": 10_000,
            "jobTargetRef": {
                "backoffLimit": 0,
                "template": {
                    "metadata": {"labels": {LABEL_QUEUE_NAME: local_queue}},
                    "spec": {
                        "containers": [
                            {"name": "work", "image": "busybox:1.36", "resources": resources}
                        ]
                    },
                },
            },
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
        },
    }


class Queues:
    """This run's ClusterQueue (cpu 1000, memory 1000Gi on the stack's flavor) and one
    LocalQueue pointing at it; ``delete`` removes both."""

    def __init__(self, api: client.ApiClient, flavor: str, namespace: str, run: str) -> None:
        self._custom = client.CustomObjectsApi(api)
        self.cluster_queue, self.local_queue, self._namespace = f"kbench-{run}", "bench", namespace
        quota = [
            {"name": "cpu", "nominalQuota": "1000"},
            {"name": "memory", "nominalQuota": "1000Gi"},
        ]
        group = {
            "coveredResources": ["cpu", "memory"],
            "flavors": [{"name": flavor, "resources": quota}],
        }
        self._custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "clusterqueues",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ClusterQueue",
                "metadata": {"name": self.cluster_queue},
                "spec": {"namespaceSelector": {}, "resourceGroups": [group]},
            },
        )
        self._custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            "localqueues",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LocalQueue",
                "metadata": {"name": self.local_queue},
                "spec": {"clusterQueue": self.cluster_queue},
            },
        )

    def wait_active(self, timeout: float) -> None:
        """Kueue admits nothing through a ClusterQueue it has not yet marked Active."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            cq: dict[str, Any] = self._custom.get_cluster_custom_object(
                GROUP, VERSION, "clusterqueues", self.cluster_queue
            )
            conditions = (cq.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Active" and c["status"] == "True" for c in conditions):
                return
            time.sleep(0.2)
        raise SystemExit(f"ClusterQueue {self.cluster_queue} not Active within {timeout:.0f}s")

    def delete(self) -> None:
        """The LocalQueue, then the ClusterQueue (Kueue finalizes it once its Workloads,
        deleted with the namespace, are gone)."""
        for call, args in (
            (
                self._custom.delete_namespaced_custom_object,
                (self._namespace, "localqueues", self.local_queue),
            ),
            (self._custom.delete_cluster_custom_object, ("clusterqueues", self.cluster_queue)),
        ):
            try:
                call(GROUP, VERSION, *args)
            except ApiException as exc:
                if exc.status != 404:
                    raise


class QueuedWatch:
    """One watch on the namespace's Jobs and one on its pods: when each Job was first
    seen (created), first seen with ``spec.suspend`` false (admitted), and when its pod
    was first seen Running or past it (running)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
        self.never_held: list[str] = []
        """Jobs first seen unsuspended: Kueue's webhook never held them."""
        self._lock = threading.Lock()
        self._watches = [
            ListWatch(
                client.BatchV1Api(api).list_namespaced_job, namespace, self._job, name="jobs"
            ),
            ListWatch(client.CoreV1Api(api).list_namespaced_pod, namespace, self._pod, name="pods"),
        ]
        for w in self._watches:
            if not w.synced.wait(60):
                raise SystemExit(f"watching {namespace}: no list within 60s")

    def _job(self, kind: str, obj: dict[str, Any], now: float) -> None:
        if kind == "DELETED":
            return
        name = obj["metadata"]["name"]
        with self._lock:
            first = name not in self.seen["created"]
            self.seen["created"].setdefault(name, now)
            if not (obj.get("spec") or {}).get("suspend"):
                if first:
                    self.never_held.append(name)
                self.seen["admitted"].setdefault(name, now)

    def _pod(self, kind: str, obj: dict[str, Any], now: float) -> None:
        if (obj.get("status") or {}).get("phase") not in RAN:
            return
        labels = obj["metadata"].get("labels") or {}
        job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if job is not None:
            with self._lock:
                self.seen["running"].setdefault(job, now)

    def samples(self, sent: dict[str, float], timeout: float) -> list[Sample]:
        """Waits until every Job named in ``sent`` (name -> publish or create time) runs;
        its three times in ms."""
        deadline = time.time() + timeout
        while not all(n in self.seen["running"] for n in sent):
            if time.time() > deadline:
                missing = [n for n in sent if n not in self.seen["running"]]
                raise SystemExit(f"{len(missing)} Jobs never ran (first: {missing[:3]})")
            time.sleep(0.02)
        with self._lock:
            if self.never_held:
                raise SystemExit(f"Jobs Kueue never suspended: {self.never_held[:3]}")
            return [
                (
                    (self.seen["created"][n] - t) * 1000,
                    (self.seen["admitted"][n] - t) * 1000,
                    (self.seen["running"][n] - t) * 1000,
                )
                for n, t in sent.items()
            ]

    def stop(self) -> None:
        for w in self._watches:
            w.stop()


def batches(count: int, size: int) -> list[range]:
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def jobrunner_block(
    url: str, queue: str, watch: QueuedWatch, tag: str, runs: int, level: int
) -> list[Sample]:
    """``runs`` messages, ``level`` published at once, each batch once the last ran."""
    out: list[Sample] = []
    for batch in batches(runs, level):
        ids = [f"{tag}-{i}" for i in batch]
        sent = asyncio.run(publish_many(url, queue, ids, None))
        out += watch.samples({job_name(NAME, mid): t for mid, t in sent.items()}, 120)
    return out


def bare_block(
    pool: ProcessPoolExecutor,
    kubeconfig: str,
    namespace: str,
    jobs: list[dict[str, Any]],
    watch: QueuedWatch,
    level: int,
) -> list[Sample]:
    """The same Jobs created by a bare client in a process of its own, ``level`` calls
    in flight at once, each batch once the last ran."""
    out: list[Sample] = []
    for batch in batches(len(jobs), level):
        part = [jobs[i] for i in batch]
        made = pool.submit(create_block, kubeconfig, namespace, part, level).result()
        out += watch.samples({m[0]: m[1] for m in made}, 120)
    return out


def measure(
    args: argparse.Namespace,
    env: dict[str, str],
    doc: dict[str, Any],
    watch: QueuedWatch,
    queue: str,
) -> dict[int, dict[str, list[Sample]]]:
    """Per concurrency, jobrunner's and the bare block alternating ``args.rounds`` times."""
    url, kubeconfig = env["JOBRUNNER_TEST_RABBITMQ_URL"], env["JOBRUNNER_TEST_KUBECONFIG"]
    namespace = doc["metadata"]["namespace"]
    results: dict[int, dict[str, list[Sample]]] = {}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for level in [int(c) for c in args.concurrency.split(",")]:
            got = results.setdefault(level, {"jobrunner": [], "bare": []})
            for r in range(args.rounds):
                tag = f"c{level}r{r}"
                got["jobrunner"] += jobrunner_block(url, queue, watch, tag, args.runs, level)
                jobs = rendered_jobs(doc, f"bare-{tag}", args.runs)
                got["bare"] += bare_block(pool, kubeconfig, namespace, jobs, watch, level)
                print(f"  concurrency {level}, round {r + 1}/{args.rounds} done", flush=True)
    return results


def burst_shape(samples: list[Sample], level: int) -> str:
    """For batches of ``level``: medians over the batches of the last Job created, the
    first and the last admitted (ms after the batch's publishes or calls), and of the
    gap between two admissions one after the other."""
    blocks = [samples[i : i + level] for i in range(0, len(samples), level)]
    last_created = [max(s[0] for s in b) for b in blocks]
    admitted = [sorted(s[1] for s in b) for b in blocks]
    gaps = [y - x for a in admitted for x, y in itertools.pairwise(a)]
    return (
        f"last created {pct(last_created, 50):.0f}, first admitted "
        f"{pct([a[0] for a in admitted], 50):.0f}, last admitted "
        f"{pct([a[-1] for a in admitted], 50):.0f}, between admissions {pct(gaps, 50):.0f} ms"
    )


def report(
    results: dict[int, dict[str, list[Sample]]], args: argparse.Namespace, load: str
) -> None:
    """The table (ms p50 / p99 per stage, the ratios of the medians) and a JSON line."""

    def fig(values: list[float]) -> str:
        return f"{pct(values, 50):7.1f} / {pct(values, 99):7.1f}"

    summary: dict[str, float] = {}
    print(f"Kueue, {args.runs} per block x {args.rounds} rounds per concurrency; {load}")
    print(f"  ms p50 / p99 {'':<30} " + "   ".join(f"{s:>17}" for s in STAGES))
    for level, got in results.items():
        print(f"  concurrency {level} (n={len(got['jobrunner'])} each)")
        cols = {who: [[s[k] for s in got[who]] for k in range(3)] for who in got}
        print(f"    {'jobrunner: publish ->':<42} " + "   ".join(fig(v) for v in cols["jobrunner"]))
        print(f"    {'bare create ->':<42} " + "   ".join(fig(v) for v in cols["bare"]))
        ratios = [
            pct(j, 50) / pct(b, 50) for j, b in zip(cols["jobrunner"], cols["bare"], strict=True)
        ]
        print(f"    {'jobrunner / bare (p50)':<42} " + "   ".join(f"{x:16.2f}x" for x in ratios))
        kueue = {who: [s[1] - s[0] for s in got[who]] for who in got}
        print(
            f"    Job seen -> admitted (Kueue's own): jobrunner {fig(kueue['jobrunner'])}, "
            f"bare {fig(kueue['bare'])}"
        )
        if level > 1:
            for who in got:
                print(f"    a batch of {level}, {who} (p50): {burst_shape(got[who], level)}")
        for who in got:
            for k, stage in enumerate(STAGES):
                summary[f"c{level}_{who}_{stage}_p50_ms"] = pct(cols[who][k], 50)
                summary[f"c{level}_{who}_{stage}_p99_ms"] = pct(cols[who][k], 99)
        for stage, x in zip(STAGES, ratios, strict=True):
            summary[f"c{level}_ratio_{stage}_p50"] = x
    print(json.dumps(summary))


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} (5 min {five:.1f})"


def main() -> int:
    """Long because it owns the run's objects: it makes them, and its ``finally`` deletes
    each of them whatever happened in between."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=64, help="Jobs per block")
    parser.add_argument("--concurrency", default="1,16", help="in flight at once, e.g. 1,16")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two blocks")
    args = parser.parse_args()
    began = time.time()
    env = env_file()
    kubeconfig = env["JOBRUNNER_TEST_KUBECONFIG"]
    api = config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    run = uuid.uuid4().hex[:6]
    namespace, queue = f"kbench-kueue-{run}", f"kbench-kueue-{run}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    queues: Queues | None = None
    watch: QueuedWatch | None = None
    dispatcher = None
    url = env["JOBRUNNER_TEST_RABBITMQ_URL"]
    try:
        queues = Queues(api, env.get("JOBRUNNER_TEST_KUEUE_FLAVOR", "kwok"), namespace, run)
        queues.wait_active(60)
        asyncio.run(declare_queue(url, queue))
        doc = scaledjob(namespace, queues.local_queue, url, queue)
        work = Path(tempfile.mkdtemp(prefix="bench-kueue-"))
        (work / "scaledjob.yaml").write_text(yaml.safe_dump(doc))
        log = work / "dispatcher.log"
        watch = QueuedWatch(api, namespace)
        dispatcher = start_dispatcher(work / "scaledjob.yaml", kubeconfig, log)
        wait_log(log, f"dispatching {NAME}", 60)
        load_before = load_average()
        results = measure(args, env, doc, watch, queue)
        load = f"{load_before} at the start, {load_average()} at the end"
        (work / "samples.json").write_text(json.dumps(results))
        print(f"  every sample (ms created, admitted, running): {work / 'samples.json'}")
    finally:
        if watch is not None:
            watch.stop()
        if dispatcher is not None:
            dispatcher.terminate()
            dispatcher.wait(60)
        for job in batch.list_namespaced_job(namespace).items:
            if FINALIZER in (job.metadata.finalizers or []):
                batch.patch_namespaced_job(
                    job.metadata.name, namespace, {"metadata": {"finalizers": None}}
                )
        if queues is not None:
            queues.delete()
        core.delete_namespace(namespace, propagation_policy="Background")
        asyncio.run(delete_queue(url, queue))
    report(results, args, load)
    print(f"wall time {time.time() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
