"""What a person sees: the operator's tables (``jobrunner status``, ``jobrunner jobs``,
``jobrunner dead-letters``) and the demo's summary, built from Job objects as any
JobClient lists them, so the cluster and the local executor look the same. Rendering uses
rich; nothing here does I/O.

Tables are kubectl's: upper-case headers, no borders, columns two spaces apart. They fit
the terminal they are printed on: long names lose their middle (``thumbna…58750ecd6``),
previews their end, and the outcome and reason are never cut. Piped output (no terminal,
no ``COLUMNS``) is never cut, as kubectl's is not.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.text import Text

from jobrunner.core.models import ANNOTATION_MESSAGE_ID, Action
from jobrunner.core.timestamps import epoch
from jobrunner.tracking.tracker import JobState

_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "running": "yellow",
    "pending": "dim",
    "queued": "magenta",
    "admitted": "dim",
}
_GAP = 2
ELLIPSIS = "…"


def middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its middle replaced by an ellipsis (the
    start and the end of a Job name are what tell Jobs apart)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def short(text: str, width: int = 24) -> str:
    """``text`` in at most ``width`` characters, its end replaced by an ellipsis."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SPACES = frozenset("\t\n\v\f\r")


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SPACES:
        return " "
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def inert(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1, ESC among them) and every
    bidirectional override shown as its escape (``\\x1b``), whitespace as a space, so
    that a message id, a body or a dead letter's detail, which publishers and tenants
    write, cannot move the cursor, hide or rewrite what is printed around it, set the
    terminal's title or clipboard (OSC 52), or reorder a line on the terminal of whoever
    runs ``status``, ``jobs`` or ``dead-letters``."""
    return _UNSAFE.sub(_escaped, text)


def one_line(text: str) -> str:
    """Whitespace (newlines included) as single spaces: a cell or a preview is one line."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Column:
    header: str
    shrink: str = "never"
    """How a cell too wide is cut: ``middle``, ``end`` or ``never``."""
    min_width: int = 0
    """Narrowest a shrinking column gets."""
    drop: int = 0
    """Columns with drop > 0 are left out, highest first, when shrinking is not enough."""


@dataclass
class Cell:
    text: str
    style: str = ""

    def __post_init__(self) -> None:
        # Whatever a cell holds is shown inert (see ``inert``), whoever made the cell.
        object.__setattr__(self, "text", inert(self.text))


@dataclass
class FitTable:
    """A kubectl-style table that fits the width it is rendered at (see the module
    docstring). ``wide``: never cut (``-o wide``)."""

    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)
    title: str = ""
    notes: list[list[Cell]] = field(default_factory=list)
    """Per row, extra indented lines under it (cut to the width)."""
    wide: bool = False

    def add_row(self, *cells: str | Cell, notes: Sequence[str | Cell] = ()) -> None:
        self.rows.append([c if isinstance(c, Cell) else Cell(c) for c in cells])
        self.notes.append([c if isinstance(c, Cell) else Cell(c) for c in notes])

    def widths(self, available: int | None) -> list[int | None]:
        """Each column's width (None: left out) for ``available`` characters: the
        natural widths when they fit; else shrinking columns cut (the widest first, down
        to their minimum); else columns that may be left out dropped (highest ``drop``
        first) and the rest cut again, with the room that freed."""
        natural: list[int | None] = [
            max([len(col.header), *(len(row[i].text) for row in self.rows)])
            for i, col in enumerate(self.columns)
        ]
        if available is None or self.wide:
            return natural
        droppable = sorted(
            (i for i, c in enumerate(self.columns) if c.drop), key=lambda i: -self.columns[i].drop
        )
        widths = self._shrunk(natural, available)
        for i in droppable:
            if _total(widths) <= available:
                break
            natural[i] = None
            widths = self._shrunk(natural, available)
        return widths

    def _shrunk(self, natural: list[int | None], available: int) -> list[int | None]:
        widths = list(natural)
        shrinkable = [i for i, c in enumerate(self.columns) if c.shrink != "never"]
        while _total(widths) > available:
            candidates = [
                i for i in shrinkable if widths[i] is not None and (widths[i] or 0) > self._min(i)
            ]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: (widths[i] or 0) - self._min(i))
            excess = _total(widths) - available
            widths[widest] = max(self._min(widest), (widths[widest] or 0) - excess)
        return widths

    def _min(self, i: int) -> int:
        column = self.columns[i]
        return max(column.min_width, len(column.header))

    def lines(self, available: int | None) -> Iterator[Text]:
        widths = self.widths(available)
        if self.title:
            yield Text(inert(self.title), style="bold")
        shown = [i for i, w in enumerate(widths) if w is not None]
        header = [Cell(self.columns[i].header) for i in shown]
        yield self._line(header, [widths[i] or 0 for i in shown], shown)
        for row, notes in zip(self.rows, self.notes, strict=True):
            yield self._line([row[i] for i in shown], [widths[i] or 0 for i in shown], shown)
            for note in notes:
                text = "    " + inert(one_line(note.text))
                if available is not None and not self.wide:
                    text = short(text, available)
                yield Text(text, style=note.style)

    def _line(self, cells: list[Cell], widths: list[int], which: list[int]) -> Text:
        line = Text()
        for n, (cell, width, i) in enumerate(zip(cells, widths, which, strict=True)):
            text = cell.text
            if len(text) > width:
                text = (
                    middle(text, width)
                    if self.columns[i].shrink == "middle"
                    else short(text, width)
                )
            last = n == len(cells) - 1
            line.append(text, style=cell.style)
            if not last:
                line.append(" " * (width - len(text) + _GAP))
        return line

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        available = None if options.max_width >= UNLIMITED else options.max_width
        for n, line in enumerate(self.lines(available)):
            if n or not self.title:  # a title may wrap; table lines never do
                line.no_wrap = True
                line.overflow = "crop"
            yield line


def _total(widths: list[int | None]) -> int:
    shown = [w for w in widths if w is not None]
    return sum(shown) + _GAP * (len(shown) - 1)


UNLIMITED = 10_000
"""The console width that means "not a terminal: never cut" (see views.make_console)."""


def message_label(identity: str, preview: str | None) -> str:
    """What the MESSAGE column shows: the message id, a replay marked as such, a Kafka
    record's topic/partition/offset, or, for a message without an id (its identity is
    a digest), a preview of its body."""
    base, sep, _ = identity.partition("#replay-")
    if base.startswith("sha256:"):
        base = one_line(preview) if preview else base[:15]
    return f"{base} (replay)" if sep else base


@dataclass(frozen=True)
class JobRow:
    name: str
    message: str
    """What the MESSAGE column shows (see ``message_label``)."""
    state: str
    """pending, running, succeeded or failed; for a Job Kueue manages, queued (waiting
    for admission, or evicted and requeued) and admitted (no pod active yet) too."""
    reason: str
    created: float | None
    started: float | None
    finished: float | None
    attempts: int
    dead_lettered: bool
    identity: str = ""
    detail: str = ""
    evictions: int = 0
    """Kueue evictions of the Job."""

    @classmethod
    def of(cls, job: Mapping[str, Any], *, body_env: str = "JOBRUNNER_MESSAGE") -> JobRow:
        state = JobState.from_object(job)
        status = job.get("status") or {}
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        outcome = state.outcome
        if outcome is not None:
            label = outcome.outcome.value
        elif status.get("active"):
            label = "running"
        elif state.queued:
            label = "queued" if state.suspended else "admitted"
        else:
            label = "pending"
        attempts = sum(int(status.get(k) or 0) for k in ("failed", "succeeded", "active"))
        identity = annotations.get(ANNOTATION_MESSAGE_ID, "")
        return cls(
            name=state.name,
            message=message_label(identity, body_preview(job, body_env)),
            state=label,
            reason=outcome.reason if outcome else "",
            created=epoch(state.created),
            started=epoch(status.get("startTime")),
            finished=epoch(state.finished_at),
            attempts=attempts,
            dead_lettered=state.settled == Action.DEAD_LETTER.value,
            identity=identity,
            detail=outcome.message if outcome else "",
            evictions=state.evictions,
        )

    @property
    def duration(self) -> float | None:
        start = self.started or self.created
        if start is None:
            return None
        return max(0.0, (self.finished or time.time()) - start)

    def as_dict(self) -> dict[str, Any]:
        """For ``-o json|yaml``: times in RFC 3339, durations in seconds."""
        return {
            "job": self.name,
            "message": self.identity,
            "state": self.state,
            "reason": self.reason or None,
            "detail": self.detail or None,
            "deadLettered": self.dead_lettered,
            "attempts": self.attempts,
            "created": rfc3339(self.created),
            "started": rfc3339(self.started),
            "finished": rfc3339(self.finished),
            "durationSeconds": None if self.duration is None else round(self.duration, 3),
        }


def rfc3339(value: float | None) -> str | None:
    if value is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(value)) + f".{int(value % 1 * 1000):03d}Z"


def body_preview(job: Mapping[str, Any], env_name: str) -> str | None:
    """The body as its Job got it in ``env_name`` (the kubelet's ``$$`` escape undone),
    when it went by env; None otherwise."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in pod.get("containers") or []:
        for item in container.get("env") or []:
            if item.get("name") == env_name and "value" in item:
                return str(item["value"]).replace("$$", "$")
    return None


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d"


def age(when: float | None, now: float | None = None) -> str:
    """kubectl's AGE: ``45s``, ``12m``, ``3h``, ``6d``."""
    if when is None:
        return "-"
    delta = max(0, int((now or time.time()) - when))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta // size}{unit}"
    return f"{delta}s"


def rows_of(
    jobs: Iterable[Mapping[str, Any]], *, body_env: str = "JOBRUNNER_MESSAGE"
) -> list[JobRow]:
    return [JobRow.of(job, body_env=body_env) for job in jobs]


def state_text(row: JobRow) -> Text:
    label = row.state
    if row.dead_lettered:
        label += " (dead-lettered)"
    return Text(label, style=_STYLE.get(row.state, ""))


def in_flight_table(rows: Sequence[JobRow], *, title: str = "", wide: bool = False) -> FitTable:
    table = FitTable(
        columns=[
            Column("JOB", shrink="middle", min_width=16),
            Column("MESSAGE", shrink="end", min_width=10),
            Column("STATE"),
            Column("ATTEMPT"),
            Column("RUNNING FOR"),
        ],
        title=title,
        wide=wide,
    )
    for row in sorted((r for r in rows if r.finished is None), key=lambda r: r.created or 0):
        table.add_row(
            row.name,
            row.message or "-",
            Cell(row.state, _STYLE.get(row.state, "")),
            str(max(row.attempts, 1)),
            seconds(row.duration),
        )
    return table


def finished_rows(rows: Sequence[JobRow], limit: int) -> list[JobRow]:
    """Finished Jobs, newest first, at most ``limit``."""
    done = sorted((r for r in rows if r.finished is not None), key=lambda r: -(r.finished or 0))
    return done[:limit]


def history_table(
    rows: Sequence[JobRow], *, limit: int = 50, title: str = "", wide: bool = False
) -> FitTable:
    """Finished Jobs, newest first. OUTCOME is ``succeeded`` or ``failed``; ``DL`` says
    whether the message went to the dead-letter queue. On a narrow terminal DL, then
    AGE, then ATTEMPTS are left out before the outcome or reason would be cut."""
    table = FitTable(
        columns=[
            Column("JOB", shrink="middle", min_width=14),
            Column("MESSAGE", shrink="end", min_width=8),
            Column("OUTCOME"),
            Column("REASON"),
            Column("DL", drop=3),
            Column("ATTEMPTS", drop=1),
            Column("DURATION"),
            Column("AGE", drop=2),
        ],
        title=title,
        wide=wide,
    )
    now = time.time()
    for row in finished_rows(rows, limit):
        table.add_row(
            row.name,
            row.message or "-",
            Cell(row.state, _STYLE.get(row.state, "")),
            # A success's reason (CompletionsReached) says nothing the outcome does not.
            Cell(row.reason if row.state == "failed" else "-", "red"),
            "yes" if row.dead_lettered else "-",
            str(row.attempts),
            seconds(row.duration),
            age(row.finished, now),
        )
    return table


@dataclass(frozen=True)
class QueueLine:
    queue: str
    ready: int
    in_hand: int
    dead_letter: int


@dataclass(frozen=True)
class DispatcherLine:
    """Whether a dispatcher consumes the queue, as far as can be seen from here."""

    alive: bool | None
    """True: a live process holds the consumer lock; False: none does (a stale lock
    names the last one); None: cannot be told from here."""
    text: str
    pid: int | None = None
    """The live one's, or the last one's."""


def status_view(
    *,
    scaledjob: str,
    namespace: str,
    where: str,
    max_replicas: int,
    rows: Sequence[JobRow],
    queue: QueueLine | None,
    dispatcher: DispatcherLine | None = None,
    wide: bool = False,
) -> RenderableType:
    active = [r for r in rows if r.finished is None]
    done = [r for r in rows if r.finished is not None]
    succeeded = sum(1 for r in done if r.state == "succeeded")
    head = Text()
    head.append(f"{namespace}/{scaledjob}", style="bold")
    head.append(f"  on {where}")
    parts: list[RenderableType] = [head]
    counts = Text()
    counts.append(f"in flight {len(active)}/{max_replicas}", style="yellow")
    counts.append(f"  finished {len(done)} ({succeeded} succeeded, {len(done) - succeeded} failed)")
    parts.append(counts)
    admission = admission_counts(rows)
    if admission is not None:
        parts.append(
            Text(
                "Kueue: {queued} waiting for admission, {admitted} admitted, {running} running,"
                " {evicted} eviction(s)".format(**admission),
                style="magenta",
            )
        )
    if dispatcher is not None:
        style = {True: "green", False: "red", None: "dim"}[dispatcher.alive]
        parts.append(Text(f"dispatcher: {inert(dispatcher.text)}", style=style))
    if queue is not None:
        parts.append(
            Text(
                f"queue {inert(queue.queue)}: {queue.ready} waiting, {queue.in_hand} in hand, "
                f"{queue.dead_letter} dead-lettered"
            )
        )
    if active:
        parts.append(in_flight_table(active, wide=wide))
    else:
        parts.append(Text("no Job in flight", style="dim"))
    return Group(*parts)


def admission_counts(rows: Sequence[JobRow]) -> dict[str, int] | None:
    """Jobs in flight by admission stage and the evictions recorded, None when no Job is
    Kueue's (queued or admitted now, or evicted once)."""
    active = [r for r in rows if r.finished is None]
    queued = sum(1 for r in active if r.state == "queued")
    admitted = sum(1 for r in active if r.state == "admitted")
    evicted = sum(r.evictions for r in rows)
    if not (queued or admitted or evicted):
        return None
    running = sum(1 for r in active if r.state == "running")
    return {"queued": queued, "admitted": admitted, "running": running, "evicted": evicted}


def preview(body: bytes, width: int = 60) -> str:
    """A body on one line: its text, or ``<N bytes, binary>``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(body)} bytes, binary>"
    return short(one_line(text), width) if width else one_line(text)


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, default=str)
