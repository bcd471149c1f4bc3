"""Helpers the benchmarks share (``bench_dispatch.py``, ``bench_keda.py``): the local
stack's settings, publishing to RabbitMQ with timestamps, starting a dispatcher process,
a list-then-watch loop over Kubernetes objects, and percentiles.

Run the benchmarks as scripts (``python bench/<name>.py``); this directory is then first
on ``sys.path``, which is how they import this module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
from kubernetes import client, watch

from jobrunner.core.models import FINALIZER, Delivery
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.rendering.renderer import Renderer

ROOT = Path(__file__).resolve().parents[1]


def env_file() -> dict[str, str]:
    """The settings ``stack-up.sh`` wrote for the tests (kubeconfig, broker URLs),
    overridden by ``JOBRUNNER_TEST_*`` variables of the environment (as the test
    fixtures take them)."""
    path = Path(os.environ.get("JOBRUNNER_STACK_ENV", "/tmp/jobrunner-stack/stack.env"))
    if not path.exists():
        raise SystemExit(f"no {path}: bring the local stack up first (make stack-up)")
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            # Single-quoted values (they hold ';') read as the shell reads them.
            out[k] = v[1:-1] if len(v) >= 2 and v[0] == v[-1] == "'" else v
    out.update({k: v for k, v in os.environ.items() if k.startswith("JOBRUNNER_TEST_")})
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def publish_many(
    url: str, queue: str, ids: list[str], rate: float | None
) -> dict[str, float]:
    """Publishes one message per id (body ``{"n": i}``, ``message_id`` the id) at ``rate``
    per second, or all at once; returns when each publish call was made."""
    sent: dict[str, float] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        start = time.monotonic()
        for i, mid in enumerate(ids):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent[mid] = time.time()
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"n": i}).encode(), message_id=mid), routing_key=queue
            )
    return sent


async def declare_queue(url: str, queue: str) -> None:
    async with await aio_pika.connect(url) as connection:
        await (await connection.channel()).declare_queue(queue, durable=True)


async def delete_queue(url: str, queue: str) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.queue_delete(f"{queue}.dead-letter")


def rendered_jobs(doc: dict[str, Any], prefix: str, count: int) -> list[dict[str, Any]]:
    """The Jobs jobrunner would create for messages ``<prefix>-<i>`` (body ``{"n": i}``),
    rendered by its own renderer: a bare client creating these creates the same Jobs, less
    jobrunner's settlement finalizer (no dispatcher will ever settle these, and a Job
    that keeps it would keep its namespace from ever being deleted)."""
    renderer = Renderer(parse_scaledjob(doc))
    jobs = []
    for i in range(count):
        body = json.dumps({"n": i}).encode()
        jobs.append(
            renderer.render(
                Delivery(
                    source="rabbitmq",
                    identity=f"{prefix}-{i}",
                    body=body,
                    message_id=f"{prefix}-{i}",
                )
            ).job
        )
    for job in jobs:
        meta = job["metadata"]
        meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
    return jobs


def wait_for_earlier_runs(
    core: client.CoreV1Api, prefixes: tuple[str, ...], timeout: float = 900
) -> float:
    """An earlier run's namespace (thousands of Jobs) takes minutes to delete and loads the
    API server meanwhile; measure only once it is gone. Returns the seconds waited."""
    start = time.time()
    while time.time() - start < timeout:
        names = [n.metadata.name for n in core.list_namespace().items]
        if not any(n.startswith(prefixes) for n in names):
            return time.time() - start
        time.sleep(2)
    raise SystemExit(
        f"an earlier benchmark namespace ({', '.join(p + '*' for p in prefixes)}) is still "
        "being deleted"
    )


def start_dispatcher(
    manifest: Path,
    kubeconfig: str,
    log: Path,
    level: str = "INFO",
    tree: Path = ROOT,
    guarded: bool = True,
) -> subprocess.Popen[bytes]:
    """A real ``jobrunner run`` process, its output appended to ``log``; ``tree`` is the
    jobrunner source tree it runs (``python -m`` puts its working directory first on
    ``sys.path``): another one measures a change against where it began, in one run.
    ``guarded`` False: through ``nofinalizer.py``, jobrunner without its settlement
    finalizer (a baseline for benchmarks only)."""
    env = {**os.environ, "JOBRUNNER_LOG_LEVEL": level, "TZ": "UTC"}
    if not guarded:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobrunner.cli" if guarded else "nofinalizer",
            "--kubeconfig",
            kubeconfig,
            "run",
            "-f",
            str(manifest),
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=tree,
        env=env,
    )


def wait_log(log: Path, text: str, timeout: float, what: str = "dispatcher") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} never logged {text!r} within {timeout:.0f}s; see {log}")


# (event type, object as plain JSON, when this process received it)
WatchHandler = Callable[[str, dict[str, Any], float], None]


class ListWatch:
    """Lists, then watches, one kind of object in a namespace from a thread of its own,
    and hands every event to ``handler`` with the time it arrived. Objects found by a
    (re)list arrive as ADDED with the time of the list, which can only make a latency
    look worse, never better. Re-lists after an ERROR event (410 Gone) or a failure."""

    def __init__(
        self,
        list_call: Callable[..., Any],
        namespace: str,
        handler: WatchHandler,
        *,
        name: str = "watch",
    ) -> None:
        self._list = list_call
        self._namespace = namespace
        self._handler = handler
        self._stop = threading.Event()
        self.synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    raw = json.loads(self._list(self._namespace, _preload_content=False).data)
                    now = time.time()
                    for item in raw["items"]:
                        self._handler("ADDED", item, now)
                    rv = raw["metadata"]["resourceVersion"]
                    self.synced.set()
                w = watch.Watch()
                for event in w.stream(
                    self._list,
                    self._namespace,
                    resource_version=rv,
                    timeout_seconds=60,
                    allow_watch_bookmarks=True,
                    _preload_content=False,
                    deserialize=False,
                ):
                    now = time.time()
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        rv = None
                        break
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] != "BOOKMARK":
                        self._handler(event["type"], obj, now)
                    if self._stop.is_set():
                        break
            except Exception as exc:
                if self._stop.is_set():
                    return
                print(f"  ({self._thread.name}: {exc!r}; listing again)", flush=True)
                rv = None
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
