"""`make demo` (no cluster, no broker) and `make demo-cluster` (the local stack).

Publishes a batch of example messages, runs a dispatcher for the example ScaledJob in
this process with a live progress display (messages settled, Jobs in flight), waits
until every message is settled and prints what became of each: its Job, the outcome and
how long the Job took. Exits 0 when every message ended as expected, 1 otherwise.

* default: the embedded SQLite queue and the local executor (Jobs are processes here),
  from deploy/examples/scaledjob-local.yaml, in a fresh state directory it prints;
* ``--cluster``: RabbitMQ and the Kubernetes control plane of ``make stack-up`` (KWOK
  plays the pods), in a namespace and queue of its own that it deletes afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from jobrunner import filemode
from jobrunner.core.naming import job_name
from jobrunner.core.settings import Executor, Settings
from jobrunner.manifest.loader import ManifestSet, load_manifest
from jobrunner.manifest.triggers import Reach
from jobrunner.observability.telemetry import Telemetry, configure_logging
from jobrunner.views.console import JobRow, in_flight_table, rows_of, seconds
from jobrunner.views.queries import list_all, make_console, publish, read_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_common import (
    EXIT_INTERRUPTED,
    Interrupt,
    demo_dir,
    exit_interrupted,
    stop_local_jobs,
)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90.0


@dataclass(frozen=True)
class Message:
    id: str
    body: bytes
    expected: str
    """``succeeded`` or ``dead-lettered (<reason>)``."""


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value).encode()


LOCAL_MESSAGES = [
    *(
        Message(f"photo-{i}", _json({"image": f"photo-{i}.png", "seconds": s}), "succeeded")
        for i, s in enumerate([1.5, 0.5, 2.0, 1.0, 0.8, 1.2, 2.5, 0.6], start=1)
    ),
    Message(
        "corrupt-1",
        _json({"image": "corrupt.png", "fail": True, "seconds": 0.2}),
        "dead-lettered (BackoffLimitExceeded)",
    ),
    Message(
        "huge-1",
        _json({"image": "huge.tiff", "seconds": 60}),
        "dead-lettered (DeadlineExceeded)",
    ),
    Message("garbage-1", b"this is not JSON", "dead-lettered (InvalidMessage)"),
]

CLUSTER_MESSAGES = [
    Message("resize-1", _json({"task": "resize", "seconds": 2}), "succeeded"),
    Message("resize-2", _json({"task": "resize", "seconds": 4}), "succeeded"),
    Message("thumb-1", _json({"task": "thumbnail", "seconds": 1}), "succeeded"),
    Message("report-1", _json({"task": "report", "seconds": 3}), "succeeded"),
    Message(
        "broken-1",
        _json({"task": "crash", "fail": "failed"}),
        "dead-lettered (BackoffLimitExceeded)",
    ),
    Message("garbage-1", b"this is not JSON", "dead-lettered (InvalidMessage)"),
]


@dataclass
class Setup:
    manifests: ManifestSet
    settings: Settings
    messages: list[Message]
    publish: Callable[[], Awaitable[None]]
    dead_letters: Callable[[], Awaitable[dict[str, str]]]
    """message id -> the x-jobrunner-reason it was dead-lettered with."""
    cleanup: Callable[[], Awaitable[None]]
    where: str
    root: Path
    """The demo's own directory (demo_dir), made for the run: Ctrl-C removes it."""


async def local_setup() -> Setup:
    from jobrunner.sources.sqlite import SQLiteQueue

    state = demo_dir()
    manifests = load_manifest(ROOT / "deploy/examples/scaledjob-local.yaml")
    settings = Settings(executor=Executor.LOCAL, local={"state_dir": state, "retry_seconds": 0.5})
    scaledjob = manifests.scaledjobs[0]

    async def send() -> None:
        for message in LOCAL_MESSAGES:
            await publish(scaledjob, settings, [message.body], message_id=message.id)

    async def dead_letters() -> dict[str, str]:
        queue = await SQLiteQueue.open(state / "queue.db")
        try:
            found = await queue.messages("thumbnails.dead-letter")
        finally:
            await queue.close()
        return {m.message_id or "": m.headers.get("x-jobrunner-reason", "") for m in found}

    async def nothing() -> None:
        return None

    return Setup(
        manifests=manifests,
        settings=settings,
        messages=LOCAL_MESSAGES,
        publish=send,
        dead_letters=dead_letters,
        cleanup=nothing,
        where=f"this machine: Jobs are processes, the queue is {state / 'queue.db'}",
        root=state,
    )


def _stack_env() -> dict[str, str]:
    path = Path(os.environ.get("JOBRUNNER_STACK_ENV", "/tmp/jobrunner-stack/stack.env"))
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


async def cluster_setup() -> Setup:
    import aio_pika
    from kubernetes import client, config

    env = _stack_env()
    url, kubeconfig = env["JOBRUNNER_TEST_RABBITMQ_URL"], env["JOBRUNNER_TEST_KUBECONFIG"]
    run = uuid.uuid4().hex[:6]
    namespace, queue = f"jobrunner-demo-{run}", f"demo-{run}"
    api = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    work = demo_dir()
    template = yaml.safe_load((ROOT / "job_templates/echo-job.yaml").read_text())
    # The demo's Jobs may fail on request (KWOK honours the annotation).
    template["spec"]["template"]["metadata"]["annotations"]["kwok.jobrunner.dev/outcome"] = (
        "{{ message.json.get('fail', 'no') }}"
    )
    (work / "demo-job.yaml").write_text(yaml.safe_dump(template))
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "demo", "namespace": namespace},
        "spec": {
            "jobTemplate": str(work / "demo-job.yaml"),
            "maxReplicaCount": 3,
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
        },
    }
    (work / "demo.yaml").write_text(yaml.safe_dump(doc))
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True)
    settings = Settings()
    settings.kube.kubeconfig = kubeconfig

    async def send() -> None:
        for message in CLUSTER_MESSAGES:
            await channel.default_exchange.publish(
                aio_pika.Message(message.body, message_id=message.id), routing_key=queue
            )

    async def dead_letters() -> dict[str, str]:
        dead = await channel.declare_queue(f"{queue}.dead-letter", passive=True)
        out = {}
        while (got := await dead.get(fail=False)) is not None:
            reason = (got.headers or {}).get("x-jobrunner-reason", "")
            out[got.message_id or ""] = reason.decode() if isinstance(reason, bytes) else reason
            await got.ack()
        return out

    async def cleanup() -> None:
        await channel.queue_delete(queue)
        await channel.queue_delete(f"{queue}.dead-letter")
        await connection.close()
        core.delete_namespace(namespace)

    return Setup(
        manifests=load_manifest(work / "demo.yaml"),
        settings=settings,
        messages=CLUSTER_MESSAGES,
        publish=send,
        dead_letters=dead_letters,
        cleanup=cleanup,
        where=f"the local stack: namespace {namespace}, RabbitMQ queue {queue}",
        root=work,
    )


def settled_count(telemetry: Telemetry, namespace: str, scaledjob: str) -> int:
    labels = {"namespace": namespace, "scaledjob": scaledjob}
    registry = telemetry.metrics.registry
    succeeded = registry.get_sample_value("jobrunner_jobs_succeeded_total", labels)
    dead = sum(
        s.value
        for m in telemetry.metrics.dead_lettered.collect()
        for s in m.samples
        if s.name.endswith("_total") and labels.items() <= s.labels.items()
    )
    return int((succeeded or 0) + dead)


def summary(
    messages: list[Message], scaledjob: str, rows: dict[str, JobRow], dead: dict[str, str]
) -> tuple[Table, bool]:
    table = Table(title="what became of each message", title_justify="left")
    for column in ("MESSAGE", "JOB", "OUTCOME", "ATTEMPTS", "DURATION", "AS EXPECTED"):
        table.add_column(column, no_wrap=True)
    all_ok = True
    for message in messages:
        name = job_name(scaledjob, message.id)
        row = rows.get(name)
        if message.id in dead:
            outcome = f"dead-lettered ({dead[message.id]})"
        elif row is not None and row.state == "succeeded":
            outcome = "succeeded"
        else:
            outcome = row.state if row is not None else "lost"
        ok = outcome == message.expected
        all_ok = all_ok and ok
        style = "green" if outcome == "succeeded" else "red" if "dead" in outcome else "yellow"
        table.add_row(
            message.id,
            name if row is not None else "- (no Job)",
            Text(outcome, style=style),
            str(row.attempts) if row is not None else "-",
            seconds(row.duration) if row is not None else "-",
            Text("yes", style="green") if ok else Text(f"NO (expected {message.expected})", "red"),
        )
    return table, all_ok


async def main(cluster: bool) -> int:
    console = make_console()
    configure_logging("ERROR")  # the live view and the table tell the story
    interrupt = Interrupt()
    interrupt.install()
    setup = await (cluster_setup() if cluster else local_setup())
    scaledjob = setup.manifests.scaledjobs[0]
    total = len(setup.messages)
    console.print(f"[bold]jobrunner demo[/] on {setup.where}")
    if not cluster:
        console.print(
            "  the Job template names image python:3.12-slim; locally images are ignored and "
            "the container's command runs here"
        )
    telemetry = Telemetry.create()
    stop = asyncio.Event()
    start = time.monotonic()
    dispatcher = asyncio.create_task(
        filemode.run(
            setup.manifests,
            setup.settings,
            stop=stop,
            telemetry=telemetry,
            reach=Reach.own(os.environ),  # a dispatcher of the user's own
        ),
        name="demo-dispatcher",
    )
    reader = read_client(setup.settings)
    try:
        await setup.publish()
        console.print(
            f"  published {total} messages; dispatching (up to "
            f"{scaledjob.spec.maxReplicaCount} Jobs at a time)"
        )
        progress = Progress(
            TextColumn("settled"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        bar = progress.add_task("settled", total=total)
        rows: list[JobRow] = []
        with Live(progress, console=console, refresh_per_second=4) as live:
            while time.monotonic() - start < TIMEOUT and not interrupt.is_set:
                if dispatcher.done():
                    break
                done = settled_count(telemetry, scaledjob.namespace, scaledjob.name)
                rows = rows_of(await list_all(reader, scaledjob))
                progress.update(bar, completed=done)
                live.update(Group(progress, in_flight_table(rows, title="in flight")))
                if done >= total:
                    break
                await interrupt.sleep(0.25)
            live.update(progress)
        if not console.is_terminal:
            console.print()  # a live view that was not live leaves its last line open
        stop.set()
        await dispatcher
        if interrupt.is_set:
            if cluster:
                shutil.rmtree(setup.root, ignore_errors=True)
                gone = (
                    f"its namespace and queues are deleted with their Jobs, and its directory "
                    f"{setup.root} is removed"
                )
            else:
                stopped = await stop_local_jobs(setup.settings.local.state_dir, remove=setup.root)
                gone = (
                    f"stopped its {stopped} running Job(s) and removed its directory "
                    f"{setup.root} (its state)"
                )
            console.print(f"demo: interrupted; stopped the dispatcher, {gone}")
            return EXIT_INTERRUPTED
        rows = rows_of(await list_all(reader, scaledjob))
        table, ok = summary(
            setup.messages, scaledjob.name, {r.name: r for r in rows}, await setup.dead_letters()
        )
        console.print(table)
        if not cluster:
            state = setup.settings.local.state_dir
            command = Path(sys.executable).parent / "jobrunner"
            console.print(
                f"  look around: {command if command.exists() else 'jobrunner'} jobs --local "
                f"--state-dir {state} -f deploy/examples/scaledjob-local.yaml"
            )
        verdict = "every message ended as expected" if ok else "UNEXPECTED outcome"
        console.print(f"demo: {verdict} in {time.monotonic() - start:.1f}s")
        return 0 if ok else 1
    finally:
        if not dispatcher.done():
            stop.set()
            await dispatcher
        await reader.close()
        await setup.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", action="store_true", help="run on the local stack")
    # The demo gives up waiting after TIMEOUT; should it hang past that anyway, every
    # thread's stack goes to stderr and the process exits, so a hang says where it is.
    faulthandler.dump_traceback_later(TIMEOUT + 30, exit=True)
    code = asyncio.run(main(parser.parse_args().cluster))
    if code == EXIT_INTERRUPTED:
        exit_interrupted()
    sys.exit(code)
