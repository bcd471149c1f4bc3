"""The operator's views behind the CLI: publish to the embedded queue, and what ``status``,
``jobs`` and ``logs`` show. They read through the same JobClient the dispatcher uses, so
a view of the cluster and of the local executor are one code path; each view is data
first (``-o json|yaml``) and a rich renderable second (the table)."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.live import Live
from rich.text import Text

from jobrunner.core.naming import message_secret_name
from jobrunner.core.protocols import ApiRejected, JobClient, TransientError
from jobrunner.core.settings import Executor, Settings
from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from jobrunner.manifest.scaledjob import ManifestError, ScaledJob
from jobrunner.manifest.triggers.sqlite import sqlite_location
from jobrunner.runner import ClosableJobClient, job_client, selector_for
from jobrunner.sources.sqlite import (
    SQLiteQueue,
    consumer_lock,
    dead_letter_queue_name,
)
from jobrunner.tracking.tracker import outcome_of
from jobrunner.views.console import (
    UNLIMITED,
    DispatcherLine,
    JobRow,
    QueueLine,
    admission_counts,
    body_preview,
    finished_rows,
    history_table,
    message_label,
    preview,
    rows_of,
    status_view,
)


class _Console(Console):
    """rich's Console, but a reader that went away (``jobrunner jobs | head``) is a
    ``BrokenPipeError`` for the command line to answer (exit 141, as for every other
    output), not rich's own ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more from this console (a ``finally`` may print)
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def make_console(*, wide: bool = False) -> Console:
    """The terminal's width on a terminal; piped, ``COLUMNS`` when set (a script or
    ``watch`` that sets it asks for that width), else no limit (tables are never cut
    when their output goes to a file or a program). ``wide`` (``-o wide``): no limit
    anywhere, so nothing of the wide table is cut, as kubectl's ``-o wide`` is not."""
    console = _Console()
    if wide:
        return _Console(width=UNLIMITED)
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        console = _Console(width=int(columns) if columns.isdigit() else UNLIMITED)
    return console


def embedded_queue(scaledjob: ScaledJob, settings: Settings) -> tuple[Path, str] | None:
    """(queue file, queue name) of a ``type: sqlite`` trigger; None for a broker."""
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
    embedded = embedded_queue(scaledjob, settings)
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


async def job_rows(
    client: JobClient, scaledjob: ScaledJob, *, finished_limit: int = 50
) -> list[JobRow]:
    """A row per Job. A message without an id is named by its body's start: taken from
    the Job's env when the body went by env, else (``messageDelivery: file``, or a body
    too large for env) from the Job's message Secret, read for the rows a listing shows
    (those in flight and the ``finished_limit`` newest finished) and only when the
    caller may read it; else the digest stays."""
    jobs = await list_all(client, scaledjob)
    env = scaledjob.spec.messageDelivery.envVarName
    rows = rows_of(jobs, body_env=env)
    shown = {r.name for r in finished_rows(rows, finished_limit)}
    shown |= {r.name for r in rows if r.finished is None}
    out = []
    for job, row in zip(jobs, rows, strict=True):
        by_digest = row.identity.startswith("sha256:") and body_preview(job, env) is None
        if row.name in shown and by_digest:
            row = await _labelled_from_secret(client, scaledjob.namespace, row)
        out.append(row)
    return out


async def _labelled_from_secret(client: JobClient, namespace: str, row: JobRow) -> JobRow:
    try:
        data = await client.read_secret(namespace, message_secret_name(row.name))
    except (ApiRejected, TransientError):
        return row  # no right to read it (or the API is away): the digest will do
    encoded = (data or {}).get("body")
    if not encoded:
        return row
    try:
        body = base64.b64decode(encoded)
    except ValueError:
        return row
    return replace(row, message=message_label(row.identity, preview(body, 60)))


async def queue_line(scaledjob: ScaledJob, settings: Settings) -> QueueLine | None:
    embedded = embedded_queue(scaledjob, settings)
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


def dispatcher_line(
    scaledjob: ScaledJob, settings: Settings, queue: QueueLine | None, *, start: str
) -> DispatcherLine | None:
    """Whether a dispatcher consumes the embedded queue: its consumer lock is held by a
    live process, or left by one that is gone. None for a broker (the broker knows its
    consumers; the dispatcher's /healthz says whether it lives)."""
    embedded = embedded_queue(scaledjob, settings)
    if embedded is None:
        return None
    lock = consumer_lock(*embedded)
    if lock is not None and lock.live and lock.paused_by is not None:
        return DispatcherLine(True, paused_text(lock.pid, lock.paused_by), lock.pid)
    if lock is not None and lock.live:
        return DispatcherLine(True, f"running (pid {lock.pid or '?'})", lock.pid)
    waiting = queue.ready + queue.in_hand if queue is not None else 0
    then = f"{waiting} message(s) wait for one: {start}" if waiting else f"start one: {start}"
    if lock is None:
        return DispatcherLine(False, f"none has consumed this queue yet; {then}")
    held = (
        f"; {queue.in_hand} message(s) it held are delivered again when the next one starts"
        if queue is not None and queue.in_hand
        else ""
    )
    return DispatcherLine(
        False, f"not running (the last one, pid {lock.pid or '?'}, is gone{held}); {then}", lock.pid
    )


def paused_text(pid: int | None, annotation: str) -> str:
    """A dispatcher that serves the queue, paused: what ``status`` says of it (and, after
    "the dispatcher that serves it is", ``publish`` and a replay)."""
    return (
        f"paused (pid {pid or '?'}, annotation {annotation}): it consumes nothing until the "
        "annotation is removed from the file; running Jobs go on"
    )


def where(settings: Settings) -> str:
    if settings.executor is Executor.LOCAL:
        return f"this machine ({settings.local.state_dir})"
    return "the cluster"


@dataclass
class ScaledJobStatus:
    scaledjob: ScaledJob
    where: str
    rows: list[JobRow]
    queue: QueueLine | None
    dispatcher: DispatcherLine | None

    def renderable(self, *, wide: bool = False) -> RenderableType:
        return status_view(
            scaledjob=self.scaledjob.name,
            namespace=self.scaledjob.namespace,
            where=self.where,
            max_replicas=self.scaledjob.spec.maxReplicaCount,
            rows=self.rows,
            queue=self.queue,
            dispatcher=self.dispatcher,
            wide=wide,
        )

    def as_dict(self) -> dict[str, Any]:
        done = [r for r in self.rows if r.finished is not None]
        return {
            "scaledjob": self.scaledjob.name,
            "namespace": self.scaledjob.namespace,
            "where": self.where,
            "maxReplicaCount": self.scaledjob.spec.maxReplicaCount,
            "inFlight": [r.as_dict() for r in self.rows if r.finished is None],
            "finished": {
                "total": len(done),
                "succeeded": sum(1 for r in done if r.state == "succeeded"),
                "failed": sum(1 for r in done if r.state == "failed"),
            },
            "admission": admission_counts(self.rows),
            "queue": None
            if self.queue is None
            else {
                "name": self.queue.queue,
                "waiting": self.queue.ready,
                "inHand": self.queue.in_hand,
                "deadLettered": self.queue.dead_letter,
            },
            "dispatcher": None
            if self.dispatcher is None
            else {
                "alive": self.dispatcher.alive,
                "pid": self.dispatcher.pid,
                "detail": self.dispatcher.text,
            },
        }


async def status_of(
    client: JobClient,
    scaledjobs: Sequence[ScaledJob],
    settings: Settings,
    *,
    start_hint: Callable[[ScaledJob], str] = lambda s: "jobrunner run --local -f MANIFEST",
) -> list[ScaledJobStatus]:
    out = []
    for scaledjob in scaledjobs:
        queue = await queue_line(scaledjob, settings)
        out.append(
            ScaledJobStatus(
                scaledjob=scaledjob,
                where=where(settings),
                rows=await job_rows(client, scaledjob),
                queue=queue,
                dispatcher=dispatcher_line(scaledjob, settings, queue, start=start_hint(scaledjob)),
            )
        )
    return out


async def refresh(
    console: Console,
    render: Callable[[], Any],
    *,
    interval: float,
    watching: bool,
) -> None:
    """Print ``await render()`` once, or every ``interval`` seconds (live on a terminal;
    piped, each refresh printed under a time stamp, since a live view would print only
    when it ends)."""
    view = await render()
    if not watching:
        console.print(view)
        return
    if not console.is_terminal:
        while True:
            console.print(Text(time.strftime("-- %H:%M:%S --"), style="dim"))
            console.print(view)
            await asyncio.sleep(interval)
            view = await render()
    with Live(view, console=console, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(interval)
            live.update(await render(), refresh=True)


def history_renderable(
    scaledjob: ScaledJob, rows: list[JobRow], *, where: str, limit: int, wide: bool
) -> RenderableType:
    title = f"{scaledjob.namespace}/{scaledjob.name} on {where}"
    if not any(r.finished for r in rows):
        return Text(f"{title}: no finished Job yet", style="dim")
    return history_table(rows, limit=limit, title=title, wide=wide)


# ---------------------------------------------------------------------- local logs
@dataclass(frozen=True)
class LogPart:
    """One container's output in one attempt, with how it ended."""

    attempt: int
    container: str
    init: bool
    path: Path
    state: str
    """``exit 0 (Completed)``, ``exit 1 (Error)``, ``running``, ``stopped at the
    deadline (DeadlineExceeded)``, ``not run``..."""

    def header(self) -> str:
        kind = "init container" if self.init else "container"
        return f"==> attempt {self.attempt}, {kind} {self.container}: {self.state} <=="


def _exit_state(code: int | None, problem: str) -> str:
    if code is None:
        if problem == "deadline exceeded":
            return "stopped at the deadline (DeadlineExceeded)"
        if problem:
            return problem
        return "not run"
    if code == -1:
        return "lost with its supervisor"
    return f"exit {code} ({'Completed' if code == 0 else 'Error'})"


def _sidecar_state(end: dict[str, Any]) -> str:
    """A native sidecar's own end, as its supervisor recorded it: stopped when and why,
    and how it went (``stopped after the main containers ended: SIGTERM, exit 143``), as
    the kubelet stops a sidecar once the main containers end; never the attempt's
    result, which the other containers decided."""
    when = str(end.get("when") or "")
    code = end.get("exitCode")
    if code is None:  # it never started: ``when`` says why
        return when or "not run"
    sig = end.get("signal")
    how = f"{sig}, exit {code}" if sig else f"exit {code} ({'Completed' if code == 0 else 'Error'})"
    return f"stopped {when}: {how}" if when else how


class LocalLogs:
    """A local Job's logs: per attempt, its init containers in order, then its
    containers, each with its exit code and reason."""

    def __init__(self, settings: Settings, namespace: str, job: str) -> None:
        self.jobdir: JobDir = LocalJobClient(settings.local.state_dir, controller=False).jobdir(
            namespace, job
        )

    @property
    def exists(self) -> bool:
        return self.jobdir.path.is_dir()

    def containers(self) -> list[tuple[str, bool]]:
        """(name, is init) in the order they run."""
        job = self.jobdir.job() or {}
        pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        return [(c.get("name", "main"), True) for c in pod.get("initContainers") or []] + [
            (c.get("name", "main"), False) for c in pod.get("containers") or []
        ]

    def finished(self) -> bool:
        job = self.jobdir.job()
        if job is None:
            return True  # deleted
        job["status"] = self.jobdir.status()
        return outcome_of(job) is not None

    def outcome(self) -> str | None:
        job = self.jobdir.job()
        if job is None:
            return None
        job["status"] = self.jobdir.status()
        outcome = outcome_of(job)
        if outcome is None:
            return None
        text = f"Job {outcome.outcome.value}: {outcome.reason}"
        return text if outcome.succeeded else f"{text} ({outcome.message})"

    def parts(self, container: str | None = None) -> list[LogPart]:
        status = self.jobdir.status()
        attempts = status.get("attempts") or []
        order = self.containers()
        out = []
        for index, attempt in enumerate(attempts, start=1):
            number = int(attempt.get("attempt") or index)
            codes: dict[str, int] = attempt.get("exitCodes") or {}
            sidecars: dict[str, dict[str, Any]] = attempt.get("sidecars") or {}
            problem = str(attempt.get("problem") or "")
            running = "finished" not in attempt
            for name, init in order:
                if container is not None and name != container:
                    continue
                path = self.jobdir.logs / f"{number}-{name}.log"
                if init and name in sidecars:
                    state = _sidecar_state(sidecars[name])
                elif name in codes:
                    state = _exit_state(codes[name], "")
                elif running and path.exists():
                    state = "running"
                elif running:
                    state = "waiting"
                elif path.exists():
                    state = _exit_state(None, problem)
                elif "lost" in codes:
                    state = _exit_state(-1, "")
                else:
                    continue  # never started (an earlier init container failed)
                out.append(LogPart(number, name, init, path, state))
        return out


def print_local_logs(
    logs: LocalLogs, out: TextIO, *, container: str | None, follow: bool, poll: float = 0.2
) -> None:
    """Every part's output under a header saying how it ended (or that it runs); with
    ``follow``, then what is written next, a closing line as each running part ends,
    and new attempts as they start, until the Job has finished."""
    offsets: dict[Path, int] = {}
    announced: set[Path] = set()
    ended: set[Path] = set()
    current: list[Path | None] = [None]

    def show(part: LogPart) -> None:
        # The state was read before the output: once it is final, the output is complete.
        final = part.state not in ("running", "waiting")
        if part.state == "waiting" and not part.path.exists():
            return  # not started yet
        try:
            with part.path.open("rb") as f:
                f.seek(offsets.get(part.path, 0))
                data = f.read()
        except FileNotFoundError:
            data = b""
        if part.path not in announced:
            out.write(part.header() + "\n")
            announced.add(part.path)
            if final:
                ended.add(part.path)
        elif data and current[0] != part.path:
            kind = "init container" if part.init else "container"
            out.write(f"==> attempt {part.attempt}, {kind} {part.container} <==\n")
        if data:
            offsets[part.path] = offsets.get(part.path, 0) + len(data)
            text = data.decode("utf-8", errors="replace")
            out.write(text if text.endswith("\n") or not final else text + "\n")
            current[0] = part.path
        if final and part.path not in ended:
            out.write(part.header() + "\n")
            ended.add(part.path)
            current[0] = None
        out.flush()

    parts = logs.parts(container)
    for part in parts:
        show(part)
    if not parts:
        out.write("(no output yet: the Job has not started a container)\n")
    while follow:
        done = logs.finished()
        for part in logs.parts(container):
            show(part)
        if done:
            break
        time.sleep(poll)
    _write_outcome(logs, out)


def _write_outcome(logs: LocalLogs, out: TextIO) -> None:
    outcome = logs.outcome()
    if outcome is not None:
        out.write(f"==> {outcome} <==\n")
        out.flush()
