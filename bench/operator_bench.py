"""Operator-mode figures on the local stack, with the default lease timings unless told:

* takeover: two replicas, one busy ScaledJob; its owner is SIGKILLed (then, in a second
  round, SIGTERMed) and the time until the other replica dispatches it is measured;
* memory: one replica serving N ScaledJobs (default 200, each its own RabbitMQ queue,
  idle), resident size once every one is Ready;
* API cost at idle: R replicas (default 3) sharing the same N ScaledJobs, requests sent to
  the API server per second over a window, from each replica's
  ``jobrunner_kube_requests_total``.

    python bench/operator_bench.py takeover [--rounds 3]
    python bench/operator_bench.py idle [--scaledjobs 200] [--replicas 3] [--window 300]

Everything it creates lives in a namespace of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aio_pika
from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.operator_harness import CRDS, apply_crds  # noqa: E402
from tests.services import read_stack_env  # noqa: E402

ENV = {**read_stack_env(), **os.environ}
KUBECONFIG = ENV.get("JOBRUNNER_TEST_KUBECONFIG", "/tmp/jobrunner-stack/kubeconfig")
RABBITMQ = ENV.get("JOBRUNNER_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


class Replica:
    def __init__(
        self, name: str, namespace: str, port: int, log_dir: Path, env: dict[str, str]
    ) -> None:
        self.name, self.port = name, port
        self.log = log_dir / f"{name}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobrunner.cli",
                "--kubeconfig",
                KUBECONFIG,
                "operator",
                "--watch-namespace",
                namespace,
                "--lease-namespace",
                namespace,
                "--identity",
                name,
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "JOBRUNNER_TELEMETRY__HTTP_PORT": str(port),
                "JOBRUNNER_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
                **env,
            },
            cwd=ROOT,
        )

    def metrics(self) -> dict[str, float]:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10)
            .read()
            .decode()
        )
        out = {}
        for line in text.splitlines():
            match = re.match(r'^(jobrunner_kube_requests_total)\{verb="(\w+)"\} ([0-9.e+]+)$', line)
            if match:
                out[match.group(2)] = float(match.group(3))
        return out

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]

    def threads(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def scaledjob(name: str, namespace: str, queue: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "jobTargetRef": {
                "backoffLimit": 0,
                "template": {
                    "metadata": {
                        "annotations": {
                            "kwok.jobrunner.dev/run-duration": "{{ message.json.get('seconds', 0) }}s"
                        }
                    },
                    "spec": {
                        "containers": [
                            {"name": "w", "image": "busybox", "args": ["{{ message.json.task }}"]}
                        ]
                    },
                },
            },
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": RABBITMQ}}],
            **spec,
        },
    }


async def declare(queues: list[str], *, delete: bool = False) -> None:
    async with await aio_pika.connect(RABBITMQ) as connection:
        channel = await connection.channel()
        for queue in queues:
            if delete:
                await channel.queue_delete(queue)
                await channel.queue_delete(f"{queue}.dead-letter")
            else:
                await channel.declare_queue(queue, durable=True)


async def publish(queue: str, count: int, seconds: int) -> None:
    async with await aio_pika.connect(RABBITMQ) as connection:
        channel = await connection.channel()
        for i in range(count):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps({"task": f"m{i}", "seconds": seconds}).encode(), message_id=f"m{i}"
                ),
                routing_key=queue,
            )


def ready_count(custom: client.CustomObjectsApi, namespace: str) -> int:
    items = custom.list_namespaced_custom_object(
        "jobrunner.dev", "v1alpha1", namespace, "scaledjobs"
    )["items"]
    return sum(
        1
        for item in items
        for c in (item.get("status") or {}).get("conditions") or []
        if c["type"] == "Ready" and c["status"] == "True"
    )


def wait(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def setup(api: client.ApiClient) -> str:
    apply_crds(api, sorted(CRDS.glob("*.yaml")))  # this tree's CRDs, as `helm install` would
    namespace = f"bench-op-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
    )
    return namespace


def teardown(api: client.ApiClient, namespace: str) -> None:
    batch = client.BatchV1Api(api)
    for job in batch.list_namespaced_job(namespace).items:
        if job.metadata.finalizers:
            batch.patch_namespaced_job(
                job.metadata.name, namespace, {"metadata": {"finalizers": None}}
            )
    client.CoreV1Api(api).delete_namespace(namespace, propagation_policy="Background")


def takeover_round(api: client.ApiClient, sig: signal.Signals, tmp: Path) -> float:
    """Seconds from ``sig`` to the owner of a busy ScaledJob until the other replica
    dispatches it."""
    custom = client.CustomObjectsApi(api)
    namespace = setup(api)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    asyncio.run(declare([queue]))
    replicas = [Replica(n, namespace, 18200 + i, tmp, {}) for i, n in enumerate(("a", "b"))]
    try:
        custom.create_namespaced_custom_object(
            "jobrunner.dev",
            "v1alpha1",
            namespace,
            "scaledjobs",
            scaledjob("busy", namespace, queue, maxReplicaCount=3),
        )

        def owner() -> str:
            obj = custom.get_namespaced_custom_object(
                "jobrunner.dev", "v1alpha1", namespace, "scaledjobs", "busy"
            )
            return str((obj.get("status") or {}).get("owner") or "")

        # Both replicas in and the split settled before the clock starts.
        wait(
            lambda: all("took bucket" in r.logs() for r in replicas) and bool(owner()),
            120,
            "the split",
        )
        time.sleep(5)
        victim = next(r for r in replicas if r.name == owner())
        other = next(r for r in replicas if r is not victim)
        asyncio.run(publish(queue, 30, 2))
        time.sleep(3)
        before = other.logs().count("dispatching busy from")
        start = time.monotonic()
        victim.process.send_signal(sig)
        wait(lambda: other.logs().count("dispatching busy from") > before, 120, "the takeover")
        return time.monotonic() - start
    finally:
        for r in replicas:
            if r.process.poll() is None:
                r.process.kill()
                r.process.wait()
        asyncio.run(declare([queue], delete=True))
        teardown(api, namespace)


def takeover(args: argparse.Namespace) -> None:
    api = config.new_client_from_config(config_file=KUBECONFIG)
    results: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for sig in (signal.SIGKILL, signal.SIGTERM):
                took = takeover_round(api, sig, Path(tmp))
                results[sig.name].append(took)
                print(f"round {round_ + 1}: {sig.name} -> taken over in {took:.2f}s", flush=True)
    for sig_name, values in results.items():
        print(
            f"takeover after {sig_name}: "
            + ", ".join(f"{v:.2f}s" for v in values)
            + f" (mean {sum(values) / len(values):.2f}s)"
        )


def idle(args: argparse.Namespace) -> None:
    api = config.new_client_from_config(config_file=KUBECONFIG)
    custom = client.CustomObjectsApi(api)
    namespace = setup(api)
    queues = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(args.scaledjobs)]
    asyncio.run(declare(queues))
    replicas: list[Replica] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.log_dir or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        try:
            for i, queue in enumerate(queues):
                custom.create_namespaced_custom_object(
                    "jobrunner.dev",
                    "v1alpha1",
                    namespace,
                    "scaledjobs",
                    scaledjob(f"sj{i:03d}", namespace, queue),
                )
            if not args.skip_single:
                one = Replica("solo", namespace, 18300, Path(tmp), {})
                replicas.append(one)
                started = time.monotonic()
                wait(
                    lambda: ready_count(custom, namespace) == args.scaledjobs,
                    600,
                    "every ScaledJob Ready",
                )
                print(
                    f"one replica: {args.scaledjobs} ScaledJobs Ready {time.monotonic() - started:.0f}s after start",
                    flush=True,
                )
                time.sleep(30)
                print(
                    f"one replica serving {args.scaledjobs} idle ScaledJobs: RSS {one.rss_mib():.0f} MiB, {one.threads()} threads",
                    flush=True,
                )
            for r in replicas:
                r.stop()
            replicas.clear()
            replicas.extend(
                Replica(f"r{i}", namespace, 18310 + i, Path(tmp), {}) for i in range(args.replicas)
            )
            time.sleep(10)

            def settled() -> bool:
                objs = custom.list_namespaced_custom_object(
                    "jobrunner.dev", "v1alpha1", namespace, "scaledjobs"
                )["items"]
                owners = {(o.get("status") or {}).get("owner") for o in objs}
                return (
                    owners <= {r.name for r in replicas}
                    and ready_count(custom, namespace) == args.scaledjobs
                )

            wait(settled, 600, "the replicas to share every ScaledJob")
            time.sleep(60)  # past start-up: lists, first status writes, bucket moves
            before = [r.metrics() for r in replicas]
            t0 = time.monotonic()
            time.sleep(args.window)
            after = [r.metrics() for r in replicas]
            seconds = time.monotonic() - t0
            total: dict[str, float] = {}
            for b, a in zip(before, after, strict=True):
                for verb in a:
                    total[verb] = total.get(verb, 0) + a[verb] - b.get(verb, 0)
            rate = sum(total.values()) / seconds
            print(
                f"{args.replicas} replicas, {args.scaledjobs} idle ScaledJobs, {seconds:.0f}s window: "
                f"{rate:.2f} requests/s ("
                + ", ".join(f"{v} {n / seconds:.2f}/s" for v, n in sorted(total.items()))
                + ")"
            )
            for r in replicas:
                print(f"  {r.name}: RSS {r.rss_mib():.0f} MiB, {r.threads()} threads")
        finally:
            for r in replicas:
                r.stop()
            asyncio.run(declare(queues, delete=True))
            teardown(api, namespace)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("takeover")
    t.add_argument("--rounds", type=int, default=3)
    i = sub.add_parser("idle")
    i.add_argument("--scaledjobs", type=int, default=200)
    i.add_argument("--replicas", type=int, default=3)
    i.add_argument("--window", type=float, default=300)
    i.add_argument("--skip-single", action="store_true", help="only the replicas' API cost")
    i.add_argument(
        "--log-dir", help="keep the replicas' logs here (BENCH_LOG_LEVEL=DEBUG for more)"
    )
    args = parser.parse_args()
    {"takeover": takeover, "idle": idle}[args.what](args)


if __name__ == "__main__":
    main()
