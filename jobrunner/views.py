"""The operator's commands behind the CLI: publish to the embedded queue, and the live
``status``, ``jobs`` and ``logs`` views. They read through the same JobClient the
dispatcher uses, so a view of the cluster and of the local executor are one code path."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from jobrunner.config import Executor, ManifestError, ScaledJob, Settings
from jobrunner.console import QueueLine, history_table, rows_of, status_view
from jobrunner.local.client import LocalJobClient
from jobrunner.protocols import JobClient
from jobrunner.runner import ClosableJobClient, job_client, selector_for
from jobrunner.sources.sqlite import SQLiteQueue, dead_letter_queue_name
from jobrunner.triggers.sqlite import sqlite_location


def make_console() -> Console:
    """Wide enough for a Job name and a message id side by side even when piped (rich
    assumes 80 columns without a terminal)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    return console


def _embedded(scaledjob: ScaledJob, settings: Settings) -> tuple[Path, str] | None:
    trigger = scaledjob.spec.triggers[0]
    if trigger.type != "sqlite":
        return None
    resolved = sqlite_location(trigger.metadata, settings.local.state_dir)
    return resolved.path, resolved.queue


async def publish(
    scaledjob: ScaledJob,
    settings: Settings,
    bodies: Sequence[bytes],
    *,
    message_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str | None = None,
) -> tuple[str, Path]:
    embedded = _embedded(scaledjob, settings)
    if embedded is None:
        trigger = scaledjob.spec.triggers[0]
        raise ManifestError(
            f"ScaledJob {scaledjob.name} reads from a {trigger.type} trigger; `jobrunner publish` "
            "writes to the embedded queue (a `type: sqlite` trigger). Publish with your "
            "broker's own tools instead"
        )
    path, queue_name = embedded
    queue = await SQLiteQueue.open(path)
    try:
        await queue.publish(
            queue_name,
            bodies,
            message_ids=[message_id] if message_id else None,
            headers=headers,
            content_type=content_type,
        )
    finally:
        await queue.close()
    return queue_name, path


def read_client(settings: Settings) -> ClosableJobClient:
    """A client for looking only: the local one starts and deletes nothing."""
    if settings.executor is Executor.LOCAL:
        return LocalJobClient(settings.local.state_dir, controller=False)
    return job_client(settings)


async def list_all(client: JobClient, scaledjob: ScaledJob) -> list[Mapping[str, Any]]:
    items: list[Mapping[str, Any]] = []
    token: str | None = None
    while True:
        page = await client.list_jobs(
            scaledjob.namespace, selector_for(scaledjob), continue_token=token
        )
        items.extend(page.items)
        token = page.continue_token
        if not token:
            return items


async def queue_line(scaledjob: ScaledJob, settings: Settings) -> QueueLine | None:
    embedded = _embedded(scaledjob, settings)
    if embedded is None or not embedded[0].exists():
        return None
    path, name = embedded
    queue = await SQLiteQueue.open(path)
    try:
        counts = await queue.counts(
            name, dead_letter_queue_name(name, scaledjob.spec.deadLetter.queue)
        )
    finally:
        await queue.close()
    return QueueLine(name, counts.ready, counts.in_hand, counts.dead_letter)


def _where(settings: Settings) -> str:
    if settings.executor is Executor.LOCAL:
        return f"this machine ({settings.local.state_dir})"
    return "the cluster"


async def status_renderable(
    client: JobClient, scaledjobs: Sequence[ScaledJob], settings: Settings
) -> RenderableType:
    parts: list[RenderableType] = []
    for scaledjob in scaledjobs:
        rows = rows_of(await list_all(client, scaledjob))
        parts.append(
            status_view(
                scaledjob=scaledjob.name,
                namespace=scaledjob.namespace,
                where=_where(settings),
                max_replicas=scaledjob.spec.maxReplicaCount,
                rows=rows,
                queue=await queue_line(scaledjob, settings),
            )
        )
    return Group(*parts)


async def show_status(
    scaledjobs: Sequence[ScaledJob], settings: Settings, *, watch: bool, interval: float
) -> None:
    console = make_console()
    client = read_client(settings)
    try:
        view = await status_renderable(client, scaledjobs, settings)
        if not watch:
            console.print(view)
            return
        if not console.is_terminal:
            # Piped or logged: a live view would only print when it ends; print each
            # refresh instead, stamped.
            while True:
                console.print(Text(time.strftime("-- %H:%M:%S --"), style="dim"))
                console.print(view)
                await asyncio.sleep(interval)
                view = await status_renderable(client, scaledjobs, settings)
        with Live(view, console=console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(await status_renderable(client, scaledjobs, settings), refresh=True)
    finally:
        await client.close()


async def show_history(scaledjobs: Sequence[ScaledJob], settings: Settings, *, limit: int) -> None:
    console = make_console()
    client = read_client(settings)
    try:
        for scaledjob in scaledjobs:
            rows = rows_of(await list_all(client, scaledjob))
            title = f"{scaledjob.namespace}/{scaledjob.name} on {_where(settings)}"
            if not any(r.finished for r in rows):
                console.print(Text(f"{title}: no finished Job yet", style="dim"))
                continue
            console.print(history_table(rows, limit=limit, title=title))
        if settings.executor is Executor.LOCAL:
            console.print(Text("logs of a Job: jobrunner logs --local JOB", style="dim"))
    finally:
        await client.close()


def show_logs(settings: Settings, job: str, *, namespace: str) -> int:
    jobdir = LocalJobClient(settings.local.state_dir, controller=False).jobdir(namespace, job)
    if not jobdir.path.is_dir():
        print(
            f"error: no local Job {namespace}/{job} in {settings.local.state_dir}; "
            "`jobrunner jobs --local -f MANIFEST` lists them",
            file=sys.stderr,
        )
        return 1
    files = sorted(jobdir.logs.glob("*.log"), key=lambda p: (int(p.name.split("-")[0]), p.name))
    for log in files:
        attempt, _, container = log.stem.partition("-")
        print(f"==> attempt {attempt}, container {container} <==")
        sys.stdout.write(log.read_text(errors="replace"))
    if not files:
        print("(no output yet)")
    return 0
