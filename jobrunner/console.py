"""What a person sees: the operator's tables (``jobrunner status``, ``jobrunner jobs``) and
the demo's summary, built from Job objects as any JobClient lists them, so the cluster
and the local executor look the same. Rendering uses rich; nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from jobrunner.models import ANNOTATION_MESSAGE_ID, Action
from jobrunner.timestamps import epoch
from jobrunner.tracker import JobState

_STYLE = {"succeeded": "green", "failed": "red", "running": "yellow", "pending": "dim"}


@dataclass(frozen=True)
class JobRow:
    name: str
    message: str
    state: str
    """pending, running, succeeded or failed."""
    reason: str
    created: float | None
    started: float | None
    finished: float | None
    attempts: int
    dead_lettered: bool

    @classmethod
    def of(cls, job: Mapping[str, Any]) -> JobRow:
        state = JobState.from_object(job)
        status = job.get("status") or {}
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        outcome = state.outcome
        if outcome is not None:
            label = outcome.outcome.value
        else:
            label = "running" if status.get("active") else "pending"
        attempts = sum(int(status.get(k) or 0) for k in ("failed", "succeeded", "active"))
        return cls(
            name=state.name,
            message=annotations.get(ANNOTATION_MESSAGE_ID, ""),
            state=label,
            reason=outcome.reason if outcome else "",
            created=epoch(state.created),
            started=epoch(status.get("startTime")),
            finished=epoch(state.finished_at),
            attempts=attempts,
            dead_lettered=state.settled == Action.DEAD_LETTER.value,
        )

    @property
    def duration(self) -> float | None:
        start = self.started or self.created
        if start is None:
            return None
        return max(0.0, (self.finished or time.time()) - start)


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def rows_of(jobs: Iterable[Mapping[str, Any]]) -> list[JobRow]:
    return [JobRow.of(job) for job in jobs]


def state_text(row: JobRow) -> Text:
    label = row.state
    if row.dead_lettered:
        label += " (dead-lettered)"
    return Text(label, style=_STYLE.get(row.state, ""))


def in_flight_table(rows: Sequence[JobRow], *, title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left", expand=False)
    table.add_column("JOB", no_wrap=True)
    table.add_column("MESSAGE", no_wrap=True)
    for column in ("STATE", "ATTEMPT", "RUNNING FOR"):
        table.add_column(column, no_wrap=True)
    for row in sorted((r for r in rows if r.finished is None), key=lambda r: r.created or 0):
        table.add_row(
            row.name,
            short(row.message),
            state_text(row),
            str(max(row.attempts, 1)),
            seconds(row.duration),
        )
    return table


def history_table(rows: Sequence[JobRow], *, limit: int = 50, title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for column in ("JOB", "MESSAGE", "OUTCOME", "REASON", "ATTEMPTS", "FINISHED", "DURATION"):
        table.add_column(column, no_wrap=column in ("JOB", "MESSAGE", "FINISHED"))
    done = sorted((r for r in rows if r.finished is not None), key=lambda r: -(r.finished or 0))
    for row in done[:limit]:
        finished = datetime.fromtimestamp(row.finished or 0).strftime("%H:%M:%S")
        table.add_row(
            row.name,
            short(row.message),
            state_text(row),
            row.reason,
            str(row.attempts),
            finished,
            seconds(row.duration),
        )
    return table


@dataclass(frozen=True)
class QueueLine:
    queue: str
    ready: int
    in_hand: int
    dead_letter: int


def status_view(
    *,
    scaledjob: str,
    namespace: str,
    where: str,
    max_replicas: int,
    rows: Sequence[JobRow],
    queue: QueueLine | None,
) -> RenderableType:
    active = [r for r in rows if r.finished is None]
    done = [r for r in rows if r.finished is not None]
    succeeded = sum(1 for r in done if r.state == "succeeded")
    head = Text()
    head.append(f"{namespace}/{scaledjob}", style="bold")
    head.append(f"  on {where}  ")
    head.append(f"in flight {len(active)}/{max_replicas}", style="yellow")
    head.append(f"  finished {len(done)} ({succeeded} succeeded, {len(done) - succeeded} failed)")
    parts: list[RenderableType] = [head]
    if queue is not None:
        parts.append(
            Text(
                f"queue {queue.queue}: {queue.ready} waiting, {queue.in_hand} in hand, "
                f"{queue.dead_letter} dead-lettered"
            )
        )
    if active:
        parts.append(in_flight_table(active))
    else:
        parts.append(Text("no Job in flight", style="dim"))
    return Group(*parts)
