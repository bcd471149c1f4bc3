"""The HTTP trigger (``type: http``): POST → ``202 Accepted`` and POST → Job seen, beside a
bare ``create`` of the same Job by one API call, measured in the same run.

* jobrunner: a real ``jobrunner run`` process serves a ScaledJob whose trigger is
  ``type: http`` (bearer auth from a TriggerAuthentication, as outside ``--local`` it
  must be); a client POSTs CloudEvents in binary mode (``Ce-*`` headers) and times each
  answer. The ``202`` is sent only once the Job exists (the API server answered the
  create), so POST → 202 is POST → Job created, plus the HTTP round trip;
* bare create: the same Job (rendered by jobrunner's own renderer, less its settlement
  finalizer) created by ``create_namespaced_job``, timed from the call to its answer;
* both are also timed to the Job's first appearance in a separate watch (a thread of this
  process), which is where a consumer of the Jobs would see them.

Both clients run in processes of their own (as the dispatcher does), with their
connections warmed first; at each concurrency (``--concurrency 1,16``: that many requests
in flight at once, each client) jobrunner's block and the bare block alternate
``--rounds`` times, so both see the same load. The ratios are of the medians.

    python bench/bench_http.py [--runs 100] [--concurrency 1,16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from bench_dispatch import JobWatcher
from benchlib import env_file, pct, rendered_jobs, start_dispatcher, wait_log
from kubernetes import client, config

from jobrunner.core.models import FINALIZER
from jobrunner.core.naming import job_name

NAME = "web"
SOURCE = "/bench/http"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def documents(namespace: str, port: int, max_pending: int, token: str) -> list[dict[str, Any]]:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "http-token", "namespace": namespace},
        "stringData": {"token": token},
    }
    auth = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "http-token", "namespace": namespace},
        "spec": {"secretTargetRef": [{"parameter": "token", "name": "http-token", "key": "token"}]},
    }
    scaledjob = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "maxReplicaCount": 1000,
            "successfulJobsHistoryLimit": 1000,
            "messageDelivery": {"mode": "env"},
            "jobTargetRef": {
                "backoffLimit": 0,
                "template": {
                    "metadata": {"annotations": {"kwok.jobrunner.dev/run-duration": "0s"}},
                    "spec": {"containers": [{"name": "work", "image": "busybox:1.36"}]},
                },
            },
            "triggers": [
                {
                    "type": "http",
                    "metadata": {
                        "path": "/events",
                        "listenAddress": f"127.0.0.1:{port}",
                        "maxPendingRequests": str(max_pending),
                    },
                    "authenticationRef": {"name": "http-token"},
                }
            ],
        },
    }
    return [secret, auth, scaledjob]


def post_block(
    url: str, token: str, ids: list[str], concurrency: int
) -> list[tuple[str, float, float, int]]:
    """POSTs one binary-mode CloudEvent per id, ``concurrency`` in flight; for each:
    (id, sent at epoch s, ms to the answer, status)."""

    async def run() -> list[tuple[str, float, float, int]]:
        out: list[tuple[str, float, float, int]] = []
        todo = list(ids)
        limits = aiohttp.TCPConnector(limit=concurrency)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession(connector=limits) as session:
            # Warm the connections (a 404 path: no Job).
            await asyncio.gather(
                *(
                    session.get(url.rsplit("/", 1)[0] + "/nothing", headers=headers)
                    for _ in range(concurrency)
                )
            )

            async def worker() -> None:
                while todo:
                    event_id = todo.pop(0)
                    ce = {
                        "Ce-Specversion": "1.0",
                        "Ce-Id": event_id,
                        "Ce-Source": SOURCE,
                        "Ce-Type": "dev.jobrunner.bench",
                    }
                    sent = time.time()
                    began = time.perf_counter()
                    async with session.post(url, data=b'{"n":1}', headers={**headers, **ce}) as r:
                        await r.read()
                        out.append((event_id, sent, (time.perf_counter() - began) * 1000, r.status))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out

    return asyncio.run(run())


def create_block(
    kubeconfig: str, namespace: str, jobs: list[dict[str, Any]], concurrency: int
) -> list[tuple[str, float, float, int]]:
    """Creates the Jobs, ``concurrency`` calls in flight; for each: (name, called at
    epoch s, ms to the answer, 201)."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = max(concurrency, 4)
    batch = client.BatchV1Api(client.ApiClient(configuration))

    def one(job: dict[str, Any]) -> tuple[str, float, float, int]:
        sent = time.time()
        began = time.perf_counter()
        batch.create_namespaced_job(namespace, job, _preload_content=False)
        return job["metadata"]["name"], sent, (time.perf_counter() - began) * 1000, 201

    with ThreadPoolExecutor(concurrency) as pool:
        list(
            pool.map(
                lambda _: batch.list_namespaced_job(namespace, limit=1, _preload_content=False),
                range(concurrency),
            )
        )
        return list(pool.map(one, jobs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="events per block (and Jobs)")
    parser.add_argument("--concurrency", default="1,16", help="requests in flight, e.g. 1,16")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two blocks")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    env = env_file()
    kubeconfig = env["JOBRUNNER_TEST_KUBECONFIG"]
    api = config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    namespace = f"kbench-http-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    port = free_port()
    token = "bench-" + uuid.uuid4().hex
    docs = documents(namespace, port, max_pending=max(levels) * 2, token=token)
    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    manifest = work / "scaledjob.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    log = work / "dispatcher.log"
    url = f"http://127.0.0.1:{port}/events"
    watcher = JobWatcher(api, namespace)
    dispatcher = start_dispatcher(manifest, kubeconfig, log)
    # level -> what -> list of (answer ms, watch ms)
    results: dict[int, dict[str, list[tuple[float, float]]]] = {}
    try:
        wait_log(log, "serving HTTP events", 60)
        watcher._watch.synced.wait(30)
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            for level in levels:
                got = results.setdefault(level, {"http": [], "bare": []})
                for r in range(args.rounds):
                    tag = f"c{level}r{r}"
                    ids = [f"{tag}-{i}" for i in range(args.runs)]
                    posted = pool.submit(post_block, url, token, ids, level).result()
                    bad = [p for p in posted if p[3] != 202]
                    if bad:
                        raise SystemExit(f"{len(bad)} POSTs not answered 202: {bad[:3]}")
                    names = {p[0]: job_name(NAME, f"{SOURCE}#{p[0]}") for p in posted}
                    watcher.wait_for(list(names.values()), 120)
                    got["http"] += [
                        (p[2], (watcher.seen[names[p[0]]] - p[1]) * 1000) for p in posted
                    ]
                    jobs = rendered_jobs(docs[2], f"bare-{tag}", args.runs)
                    made = pool.submit(create_block, kubeconfig, namespace, jobs, level).result()
                    watcher.wait_for([m[0] for m in made], 120)
                    got["bare"] += [(m[2], (watcher.seen[m[0]] - m[1]) * 1000) for m in made]
    finally:
        watcher.stop()
        dispatcher.terminate()
        dispatcher.wait(60)
        for job in batch.list_namespaced_job(namespace).items:
            if FINALIZER in (job.metadata.finalizers or []):
                batch.patch_namespaced_job(
                    job.metadata.name, namespace, {"metadata": {"finalizers": None}}
                )
        core.delete_namespace(namespace, propagation_policy="Background")

    def fig(values: list[float]) -> str:
        return f"{pct(values, 50):6.1f} / {pct(values, 99):6.1f}"

    summary: dict[str, float] = {}
    print(f"HTTP trigger, {args.runs} events x {args.rounds} rounds per concurrency, ms p50 / p99:")
    print(f"  {'':<44} {'answer':>15}   {'seen by watch':>15}")
    for level, got in results.items():
        http_answer = [a for a, _ in got["http"]]
        http_seen = [w for _, w in got["http"]]
        bare_answer = [a for a, _ in got["bare"]]
        bare_seen = [w for _, w in got["bare"]]
        print(f"  concurrency {level} (n={len(http_answer)} each)")
        print(
            f"    {'POST -> 202 (Job exists) / Job seen':<42} {fig(http_answer)}   {fig(http_seen)}"
        )
        print(f"    {'bare create -> 201 / Job seen':<42} {fig(bare_answer)}   {fig(bare_seen)}")
        ratio = pct(http_answer, 50) / pct(bare_answer, 50)
        seen_ratio = pct(http_seen, 50) / pct(bare_seen, 50)
        print(f"    jobrunner / bare (p50): answer {ratio:.2f}x, seen {seen_ratio:.2f}x")
        print(
            f"    mean answer {statistics.mean(http_answer):.1f} vs {statistics.mean(bare_answer):.1f} ms"
        )
        summary.update(
            {
                f"c{level}_post_202_p50_ms": pct(http_answer, 50),
                f"c{level}_post_202_p99_ms": pct(http_answer, 99),
                f"c{level}_bare_create_p50_ms": pct(bare_answer, 50),
                f"c{level}_bare_create_p99_ms": pct(bare_answer, 99),
                f"c{level}_ratio_p50": ratio,
            }
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
