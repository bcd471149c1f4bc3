"""What the settlement finalizer costs a burst (issue 23): the burst of ``make bench-keda``
(300 messages at once, ``maxReplicaCount`` 100, history limits 100, pods that run 3 s on
the benchmark's own KWOK node), run by jobrunner as it is and by jobrunner without the
finalizer (``nofinalizer.py``: no finalizer on its Jobs, no release write; a baseline
only, never a setting of the product), alternating, in one sitting.

Each run gets a fresh namespace and dispatcher; 100 messages at once come first, so the
history is full when the burst starts (as after ``bench_keda``'s steady phase) and the
burst's Jobs are deleted beyond the limit as they are there. The figure is the one of
``bench_keda``: every message has a Job (watch ADDED), after the first publish. Beside
it, the CPU seconds kube-apiserver and etcd used during the burst, and the dispatcher's
the dispatcher's log.

    .venv/bin/python bench/bench_finalizer.py [--rounds 3] [--before /path/to/main/tree]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from bench_keda import (
    DEPLOY,
    NODE,
    PREFIX,
    RUN_FOR,
    SYSTEMS,
    Bench,
    JobrunnerAttribution,
    Observer,
    Process,
    _delete_node,
    _s,
    attempt,
    busiest,
    create_namespace,
    delete_namespace,
    free_port,
    load,
    measure_flow,
    node_ready,
    release_finalizers,
    scaledjob_doc,
    stack_processes,
    wait_done,
)
from benchlib import ROOT, delete_queue, env_file, pct, publish_many, wait_log
from kubernetes import client, config

WARM, BURST = 100, 300
VARIANTS: tuple[str, ...] = ("guarded", "unguarded")
"""jobrunner as it is; jobrunner without the finalizer (the baseline)."""


def cpu_seconds(state: Path, part: str) -> float:
    """CPU time (user + system) a stack process has used so far."""
    pid = (state / "pids" / f"{part}.pid").read_text().strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def start(
    variant: str, manifest: Path, kubeconfig: str, log: Path, before: Path | None
) -> subprocess.Popen[bytes]:
    """A dispatcher process: jobrunner of this tree (``guarded``), of the tree given by
    ``--before`` (``before``: the same run measures a change against where it began), or
    this tree without the finalizer (``unguarded``, through ``nofinalizer.py``)."""
    module = "nofinalizer" if variant == "unguarded" else "jobrunner.cli"
    env = {**os.environ, "JOBRUNNER_LOG_LEVEL": "INFO", "TZ": "UTC"}
    paths = [str(ROOT / "bench")]
    if variant == "before" and before is not None:
        paths.insert(0, str(before))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", module, "--kubeconfig", kubeconfig, "run", "-f", str(manifest)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        # python -m puts the working directory first on sys.path: the tree that runs.
        cwd=before if variant == "before" and before is not None else ROOT,
        env=env,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def one_run(bench: Bench, variant: str, index: int, before: Path | None) -> dict[str, Any]:
    namespace = f"{PREFIX}{bench.run_id}-{variant[0]}{index}"
    create_namespace(bench.core, namespace)
    observer = Observer(bench.api, namespace, None)
    attribution = JobrunnerAttribution(observer)
    name = "fast"
    queue = bench.queue(namespace, name)
    doc = scaledjob_doc(
        name,
        namespace,
        queue,
        bench.url,
        SYSTEMS[0],
        pod_annotations={"kwok.jobrunner.dev/run-duration": RUN_FOR},
    )
    manifest = bench.work / f"{namespace}.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    log = bench.work / f"dispatcher-{namespace}.log"
    processes = stack_processes(bench.state)
    proc = start(variant, manifest, bench.kubeconfig, log, before)
    out: dict[str, Any] = {"variant": variant, "load": load()}
    try:
        wait_log(log, f"dispatching {name} from queue", timeout=60)
        warm = asyncio.run(publish_many(bench.url, queue, [f"w-{i}" for i in range(WARM)], None))
        wait_done(observer, attribution, name, warm, 120)
        time.sleep(2)
        cpu = {p: cpu_seconds(bench.state, p) for p in ("kube-apiserver", "etcd")}
        since = time.time()
        ids = [f"b-{i}" for i in range(BURST)]
        sent = asyncio.run(publish_many(bench.url, queue, ids, None))
        until, done = wait_done(observer, attribution, name, sent, 180)
        out["cpu"] = {p: cpu_seconds(bench.state, p) - c for p, c in cpu.items()}
        figures = measure_flow(SYSTEMS[0], observer, attribution, name, sent, since, until)
        out.update(figures)
        out["done"] = done
        out["wall"] = until - since
    finally:
        stop(proc)
        observer.stop()
        now = stack_processes(bench.state)
        out["disturbed"] = [p for p, pid in processes.items() if now.get(p) != pid]
        attempt("releasing finalizers", lambda: release_finalizers(bench.api, namespace))
        attempt(
            f"deleting namespace {namespace}",
            lambda: delete_namespace(bench.core, namespace, timeout=240),
        )
        attempt(f"deleting queue {queue}", lambda: asyncio.run(delete_queue(bench.url, queue)))
    created = out.get("created") or []
    print(
        f"  {variant:9} #{index}: every message has a Job after {_s(out.get('all_jobs'))}; "
        f"publish->Job created p50 {_s(pct(created, 50)) if created else '—'} "
        f"p95 {_s(pct(created, 95)) if created else '—'}; all started after "
        f"{_s(out.get('all_started'))}; kube-apiserver {out['cpu']['kube-apiserver']:.1f} s "
        f"CPU, etcd {out['cpu']['etcd']:.1f} s; load {out['load']}"
        f"{'' if out.get('done') else ' (NOT DONE)'}"
        f"{' DISTURBED: ' + ', '.join(out['disturbed']) if out['disturbed'] else ''}",
        flush=True,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--before",
        type=Path,
        help="a jobrunner source tree (say a worktree of main) to run as a third variant",
    )
    args = parser.parse_args()
    variants = VARIANTS + (("before",) if args.before else ())
    stack = env_file()
    kubeconfig, url = stack["JOBRUNNER_TEST_KUBECONFIG"], stack["JOBRUNNER_TEST_RABBITMQ_URL"]
    api = config.new_client_from_config(config_file=kubeconfig)
    api.configuration.connection_pool_maxsize = 16
    core = client.CoreV1Api(api)
    work = Path(tempfile.mkdtemp(prefix="jobrunner-bench-finalizer-"))
    state = Path(stack.get("JOBRUNNER_TEST_STACK_STATE", "/tmp/jobrunner-stack"))
    bench = Bench(api, kubeconfig, url, uuid.uuid4().hex[:6], work, state)
    print(
        f"bench-finalizer: {BURST} messages at once after {WARM}, guarded (jobrunner) and "
        f"unguarded (no finalizer, no release write) alternating, {args.rounds} rounds; "
        f"logs in {work}\n  load {load()}; {busiest()}",
        flush=True,
    )
    node = Process(
        "kwok (bench node)",
        ["bash", str(DEPLOY / "kwok-node-run.sh"), NODE, str(free_port())],
        work / "kwok-node.log",
    )
    runs: list[dict[str, Any]] = []
    try:
        deadline = time.time() + 60
        while not node_ready(core):
            node.check()
            if time.time() > deadline:
                raise SystemExit(f"node {NODE} not Ready within 60s; see {node.log}")
            time.sleep(0.5)
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else variants[::-1]
            for variant in order:
                try:
                    runs.append(one_run(bench, variant, i, args.before))
                except Exception as exc:  # the shared stack restarted under it: go on
                    print(f"  {variant} #{i}: FAILED ({exc!r:.200})", flush=True)
    finally:
        node.stop()
        attempt(f"deleting node {NODE}", lambda: _delete_node(core))
    print("\n| variant | every message has a Job after (each run) | mean | kube-apiserver CPU s |")
    print("| --- | --- | --- | --- |")
    means = {}
    for variant in variants:
        mine = [
            r
            for r in runs
            if r["variant"] == variant and r.get("all_jobs") is not None and not r["disturbed"]
        ]
        values = [r["all_jobs"] for r in mine]
        means[variant] = statistics.mean(values) if values else float("nan")
        print(
            f"| {variant} | {', '.join(f'{v:.1f} s' for v in values)} | {means[variant]:.2f} s "
            f"| {', '.join(str(round(r['cpu']['kube-apiserver'])) for r in mine)} |"
        )
    for variant in (v for v in variants if v != "unguarded"):
        ratio = means[variant] / means["unguarded"]
        print(f"\n{variant} / unguarded: {ratio:.3f} (target <= 1.05)", flush=True)
    print("(runs during which a stack process restarted are left out of the table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
