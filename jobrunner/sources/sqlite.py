"""The embedded durable queue: a SQLite file that stands in for a broker, so jobrunner
runs with no broker at all (``jobrunner publish`` to enqueue, ``type: sqlite`` trigger to
consume) with the same settlement semantics as RabbitMQ.

Why our own small schema on aiosqlite rather than a queue library: the maintained
SQLite queues (persist-queue, litequeue) pickle or stringify items and have no notion of
a consumer that dies while holding messages, of a dead-letter queue with reasons, or of
headers and message ids; those are exactly the parts jobrunner needs.

Semantics:

* a message is a row; publishing commits it (WAL mode, so publishers in other processes
  never block the consumer for long);
* delivery marks rows ``delivered`` (at most ``prefetch`` in hand, as a RabbitMQ
  prefetch); ack deletes the row, requeue marks it ready again, dead-letter moves it to
  the dead-letter queue with ``x-jobrunner-*`` reason headers, in one transaction;
* one consumer per queue holds an exclusive lock file; when a consumer starts, rows its
  dead predecessor held are ready again and come back marked redelivered, so a crash
  loses nothing (the dispatcher then adopts the Jobs those messages already have).

The file holds message bodies: it is private to the user running jobrunner (0600, and
SQLite gives its ``-wal`` and ``-shm`` files the database's mode; a directory it creates
is 0700), whatever the umask, and files an older version left more open are tightened
when the queue is opened (see ``_make_private``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from jobrunner.core.deadletters import DeadLetter, replay_headers
from jobrunner.core.models import Action, Decision, Delivery
from jobrunner.core.naming import message_identity
from jobrunner.core.privatefs import FILE_MODE, open_private, private_dir
from jobrunner.core.protocols import MessageHandle, Refusal
from jobrunner.core.settings import Settings
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers.sqlite import SQLiteTrigger

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    message_id TEXT,
    headers TEXT NOT NULL DEFAULT '{}',
    content_type TEXT,
    published_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'ready',
    deliveries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_state ON messages (queue, state, id);
"""
READY = "ready"
DELIVERED = "delivered"


class QueueBusy(Refusal):
    """Another process consumes this queue already (an embedded queue has one consumer:
    its lock file names the holder's pid)."""


@dataclass(frozen=True)
class QueueCounts:
    ready: int
    in_hand: int
    dead_letter: int


@dataclass(frozen=True)
class StoredMessage:
    id: int
    queue: str
    body: bytes
    message_id: str | None
    headers: dict[str, str]
    content_type: str | None
    published_at: float
    deliveries: int


def dead_letter_queue_name(queue: str, configured: str | None = None) -> str:
    return configured or f"{queue}.dead-letter"


def _make_private(path: Path) -> None:
    """Create the queue file private (0600) before SQLite does (SQLite would make it
    0644 less the umask, and its -wal and -shm files after it), and tighten those an
    older version made.

    A file that exists is only chmod-ed, never opened: this process may hold SQLite
    connections to it (a source and a function's outputs share the file), and closing
    any descriptor of a file drops every POSIX lock the process holds on it (fcntl(2);
    sqlite.org/howtocorrupt.html section 2.2). Another process would then take itself for
    the last connection, remove the WAL, and this process's later commits would be lost.
    Creating is safe: no connection of this process can hold a file that did not exist."""
    private_dir(path.parent)
    try:
        os.close(open_private(path, os.O_RDWR | os.O_EXCL))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.chmod(path, FILE_MODE)
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.chmod(path.with_name(path.name + suffix), FILE_MODE)


async def _connect(path: Path, *, within: float = 30.0) -> aiosqlite.Connection:
    """An open, prepared connection. Cancelling this waits for the open under way to end
    and closes it, then re-raises: aiosqlite's worker thread finishes a connect it was
    given whatever its caller does, and one left behind answers an event loop that may be
    closed by then (a traceback from its thread as the process exits: seen when a
    dispatcher stopped while a unit was still connecting, on a busy machine)."""
    opening = asyncio.ensure_future(_open(path, within))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            db = await opening  # bounded: the open gives up after ``within`` s
            await db.close()
        raise


async def _open(path: Path, within: float) -> aiosqlite.Connection:
    await asyncio.to_thread(_make_private, path)
    db = await aiosqlite.connect(path, timeout=within)
    try:
        await _prepare(db, within)
    except BaseException:
        # An open connection's worker thread would keep the process from exiting.
        await db.close()
        raise
    return db


async def _prepare(db: aiosqlite.Connection, within: float) -> None:
    """WAL mode and the schema. Two processes opening a new file at once (a dispatcher
    and `jobrunner publish`) can meet here: switching the journal mode answers "database
    is locked" at once, without SQLite's busy wait, so it is retried for ``within`` s."""
    delay, deadline = 0.01, time.monotonic() + within
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash (which is what we
            # promise); only a power loss can drop the last transactions.
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.executescript(_SCHEMA)
            await db.commit()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


def _row(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        id=row[0],
        queue=row[1],
        body=bytes(row[2]),
        message_id=row[3],
        headers=json.loads(row[4] or "{}"),
        content_type=row[5],
        published_at=row[6],
        deliveries=row[7],
    )


_COLUMNS = "id, queue, body, message_id, headers, content_type, published_at, deliveries"


class SQLiteQueue:
    """The queue file, for publishers, consumers and ``jobrunner status``.

    One connection, one statement sequence at a time: every method holds ``_busy`` from
    its first statement to its commit. aiosqlite runs statements of concurrent
    coroutines on one thread in arrival order, so without it one coroutine's COMMIT can
    land while another's SELECT is still being read ("cannot commit transaction - SQL
    statements in progress") or commit another's half-done transaction.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._busy = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SQLiteQueue:
        return cls(await _connect(path), path)

    async def close(self) -> None:
        await self._db.close()

    async def publish(
        self,
        queue: str,
        bodies: Sequence[bytes],
        *,
        message_ids: Sequence[str | None] | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> list[int]:
        """Enqueue ``bodies`` in one transaction; returns their row ids."""
        async with self._busy:
            now = time.time()
            ids = list(message_ids) if message_ids is not None else [None] * len(bodies)
            encoded = json.dumps(dict(headers or {}), sort_keys=True)
            out = []
            for body, message_id in zip(bodies, ids, strict=True):
                cursor = await self._db.execute(
                    "INSERT INTO messages (queue, body, message_id, headers, content_type,"
                    " published_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (queue, body, message_id, encoded, content_type, now),
                )
                out.append(int(cursor.lastrowid or 0))
            await self._db.commit()
            return out

    async def publish_once(self, queue: str, body: bytes, *, message_id: str) -> bool:
        """Enqueue ``body`` unless ``queue`` already holds a message with ``message_id``
        (one transaction); True when it was enqueued now."""
        async with self._busy:
            cursor = await self._db.execute(
                "INSERT INTO messages (queue, body, message_id, headers, content_type,"
                " published_at) SELECT ?, ?, ?, '{}', NULL, ? WHERE NOT EXISTS"
                " (SELECT 1 FROM messages WHERE queue = ? AND message_id = ?)",
                (queue, body, message_id, time.time(), queue, message_id),
            )
            await self._db.commit()
            return cursor.rowcount == 1

    async def counts(self, queue: str, dead_letter_queue: str) -> QueueCounts:
        async with self._busy:
            ready = in_hand = dead = 0
            async with self._db.execute(
                "SELECT queue, state, count(*) FROM messages WHERE queue IN (?, ?)"
                " GROUP BY queue, state",
                (queue, dead_letter_queue),
            ) as cursor:
                async for name, state, count in cursor:
                    if name == dead_letter_queue:
                        dead += count
                    elif state == READY:
                        ready = count
                    else:
                        in_hand = count
            return QueueCounts(ready=ready, in_hand=in_hand, dead_letter=dead)

    async def messages(self, queue: str, *, limit: int = 1000) -> list[StoredMessage]:
        async with (
            self._busy,
            self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE queue = ? ORDER BY id LIMIT ?",
                (queue, limit),
            ) as cursor,
        ):
            return [_row(row) async for row in cursor]

    # -- consumer side (used by SQLiteSource, which holds the consumer lock) --------
    async def reclaim(self, queue: str) -> int:
        """Make every delivered row ready again (its consumer is gone)."""
        async with self._busy:
            cursor = await self._db.execute(
                "UPDATE messages SET state = ? WHERE queue = ? AND state = ?",
                (READY, queue, DELIVERED),
            )
            await self._db.commit()
            return cursor.rowcount

    async def claim(self, queue: str, limit: int) -> list[StoredMessage]:
        async with self._busy:
            async with self._db.execute(
                "UPDATE messages SET state = ?, deliveries = deliveries + 1 WHERE id IN ("
                " SELECT id FROM messages WHERE queue = ? AND state = ? ORDER BY id LIMIT ?)"
                f" RETURNING {_COLUMNS}",
                (DELIVERED, queue, READY, limit),
            ) as cursor:
                rows = [_row(row) async for row in cursor]
            await self._db.commit()
            rows.sort(key=lambda m: m.id)
            return rows

    async def ack(self, message_id: int) -> bool:
        async with self._busy:
            cursor = await self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            await self._db.commit()
            return cursor.rowcount == 1

    async def requeue(self, message_id: int) -> bool:
        async with self._busy:
            cursor = await self._db.execute(
                "UPDATE messages SET state = ? WHERE id = ?", (READY, message_id)
            )
            await self._db.commit()
            return cursor.rowcount == 1

    async def dead_letter(
        self,
        *,
        dead_letter_queue: str,
        body: bytes,
        message_id: str | None,
        headers: Mapping[str, str],
        content_type: str | None,
        remove: int | None = None,
    ) -> None:
        """Put a copy on the dead-letter queue and, in the same transaction, remove the
        original row ``remove``: the move is all or nothing."""
        async with self._busy:
            await self._db.execute(
                "INSERT INTO messages (queue, body, message_id, headers, content_type,"
                " published_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    dead_letter_queue,
                    body,
                    message_id,
                    json.dumps(dict(headers), sort_keys=True),
                    content_type,
                    time.time(),
                ),
            )
            if remove is not None:
                await self._db.execute("DELETE FROM messages WHERE id = ?", (remove,))
            await self._db.commit()

    async def move(self, moves: Sequence[tuple[int, str, Mapping[str, str]]]) -> int:
        """Move rows to other queues with new headers, in one transaction: each
        ``(row id, queue, headers)`` becomes a new ready message on ``queue`` (the same
        body, message id and content type) and the row is deleted. Rows already gone are
        skipped; returns how many moved."""
        async with self._busy:
            moved = 0
            now = time.time()
            for row_id, queue, headers in moves:
                cursor = await self._db.execute(
                    "INSERT INTO messages (queue, body, message_id, headers, content_type,"
                    " published_at) SELECT ?, body, message_id, ?, content_type, ?"
                    " FROM messages WHERE id = ?",
                    (queue, json.dumps(dict(headers), sort_keys=True), now, row_id),
                )
                if cursor.rowcount:
                    await self._db.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                    moved += 1
            await self._db.commit()
            return moved


def _lock_path(db_path: Path, queue: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", queue)
    return db_path.with_name(f"{db_path.name}.{safe}.consumer.lock")


def _paused_path(db_path: Path, queue: str) -> Path:
    return _lock_path(db_path, queue).with_suffix(".paused")


class PausedMark:
    """Held by a dispatcher that serves a queue whose ScaledJob is paused: it consumes
    nothing (so it holds no consumer lock), but the queue is its own. ``status`` and
    ``publish`` say so (paused, by which annotation, which pid), and another dispatcher
    of the queue is refused as while it consumes. A lock file beside the consumer lock,
    ``<pid> <annotation>`` in it, flock'ed while held: it goes with its process."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def hold(cls, db_path: Path, queue: str, *, annotation: str) -> PausedMark | None:
        """The mark, held now; None when another process holds it."""
        private_dir(db_path.parent)
        fd = open_private(_paused_path(db_path, queue), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {annotation}".encode())
        return cls(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _paused_holder(db_path: Path, queue: str) -> tuple[int | None, str] | None:
    """(pid, annotation) of the live holder of the queue's paused mark; None for none."""
    try:
        fd = os.open(_paused_path(db_path, queue), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, annotation = os.read(fd, 256).decode(errors="replace").strip().partition(" ")
            return (int(pid) if pid.isdigit() else None, annotation)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass
class SQLiteHandle:
    delivery: Delivery
    row_id: int
    settled: bool = field(default=False)


class SQLiteSource:
    """The ``type: sqlite`` trigger: consumes one queue of the embedded queue file."""

    name = "sqlite"

    def __init__(
        self,
        *,
        path: Path,
        queue: str,
        prefetch: int,
        dead_letter_queue: str | None = None,
        scaledjob: str = "",
        poll_interval: float = 0.05,
    ) -> None:
        self.path = path
        self._queue_name = queue
        self._prefetch = prefetch
        self.dead_letter_queue = dead_letter_queue_name(queue, dead_letter_queue)
        self._scaledjob = scaledjob
        self._poll = poll_interval
        self._queue: SQLiteQueue | None = None
        self._lock_fd: int | None = None
        self._in_hand = 0
        self._room = asyncio.Event()
        self._consuming = True

    async def start(self) -> None:
        private_dir(self.path.parent)
        paused = _paused_holder(self.path, self._queue_name)
        if paused is not None and paused[0] != os.getpid():  # our own: being released
            raise QueueBusy(
                f"queue {self._queue_name!r} in {self.path} is served by another dispatcher "
                f"(pid {paused[0] or '?'}), paused by the annotation {paused[1]}: it consumes "
                "again once the annotation is removed; stop it first, or give this one "
                "another queueName"
            )
        lock = _lock_path(self.path, self._queue_name)
        fd = open_private(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            if holder == str(os.getpid()):
                raise QueueBusy(
                    f"queue {self._queue_name!r} in {self.path} is consumed by another "
                    "ScaledJob of this same dispatcher; an embedded queue has one consumer: "
                    "give each ScaledJob its own queueName"
                ) from None
            raise QueueBusy(
                f"queue {self._queue_name!r} in {self.path} is consumed by another dispatcher "
                f"(pid {holder}); stop it first, or give this one another queueName"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        self._queue = await SQLiteQueue.open(self.path)
        returned = await self._queue.reclaim(self._queue_name)
        if returned:
            logger.info(
                "%d message(s) held by a previous dispatcher are back on queue %s",
                returned,
                self._queue_name,
            )
        self._room.set()

    async def deliveries(self) -> AsyncIterator[SQLiteHandle]:
        assert self._queue is not None
        while True:
            if not self._consuming:
                await asyncio.Event().wait()  # stopped: nothing more, until cancelled
            free = self._prefetch - self._in_hand
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            rows = await self._queue.claim(self._queue_name, free)
            if not rows:
                await asyncio.sleep(self._poll)
                continue
            for row in rows:
                self._in_hand += 1
                yield SQLiteHandle(delivery=self._delivery(row), row_id=row.id)

    def _delivery(self, row: StoredMessage) -> Delivery:
        return Delivery(
            source=self.name,
            identity=message_identity(row.message_id, row.body, row.headers),
            body=row.body,
            message_id=row.message_id,
            headers=row.headers,
            content_type=row.content_type,
            redelivered=row.deliveries > 1,
            delivery_count=max(1, row.deliveries),
            metadata={"queue": self._queue_name, "database": str(self.path)},
            received_at=time.monotonic(),
            published_at=row.published_at,
        )

    @property
    def connected(self) -> bool:
        return self._queue is not None

    async def depth(self) -> int | None:
        if self._queue is None:
            return None
        counts = await self._queue.counts(self._queue_name, self.dead_letter_queue)
        return counts.ready

    async def stop_consuming(self) -> None:
        self._consuming = False

    async def settle(self, handle: MessageHandle, decision: Decision) -> bool:
        if not isinstance(handle, SQLiteHandle):
            raise TypeError(f"not an embedded-queue message: {handle!r}")
        assert self._queue is not None
        if handle.settled:
            return True
        row = handle.row_id
        if decision.action is Action.ACK:
            done = await self._queue.ack(row)
        elif decision.action is Action.REQUEUE:
            done = await self._queue.requeue(row)
        else:
            delivery = handle.delivery
            await self._queue.dead_letter(
                dead_letter_queue=self.dead_letter_queue,
                body=delivery.body,
                message_id=delivery.message_id,
                headers={
                    **delivery.headers,
                    **decision.reason_headers(
                        source_queue=self._queue_name, scaledjob=self._scaledjob
                    ),
                },
                content_type=delivery.content_type,
                remove=row,
            )
            done = True
        handle.settled = True
        self._in_hand -= 1
        self._room.set()
        if not done:
            logger.warning("message %s was no longer on the queue", handle.delivery.identity)
        return True

    def is_durable(self, handle: MessageHandle) -> bool:
        return True  # every settlement is a committed transaction

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        assert self._queue is not None
        await self._queue.dead_letter(
            dead_letter_queue=self.dead_letter_queue,
            body=original["body"],
            message_id=original.get("message_id"),
            headers={
                **(original.get("headers") or {}),
                **decision.reason_headers(source_queue=self._queue_name, scaledjob=self._scaledjob),
            },
            content_type=original.get("content_type"),
        )

    async def close(self) -> None:
        """Messages still in hand go back to the queue at once, as a broker requeues
        the unacked messages of a closed channel."""
        if self._queue is not None:
            if self._lock_fd is not None:
                await self._queue.reclaim(self._queue_name)
            await self._queue.close()
            self._queue = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def open_source(
    trigger: SQLiteTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> SQLiteSource:
    """The source for a resolved ``sqlite`` trigger (see jobrunner.manifest.triggers.sqlite)."""
    return SQLiteSource(
        path=trigger.path,
        queue=trigger.queue,
        prefetch=scaledjob.spec.maxReplicaCount,
        dead_letter_queue=scaledjob.spec.deadLetter.queue,
        scaledjob=scaledjob.name,
    )


@dataclass(frozen=True)
class ConsumerLock:
    """Who consumes a queue, as its lock file says."""

    path: Path
    pid: int | None
    """The last consumer's pid, as it wrote it."""
    live: bool
    """True while a process holds the lock (a dispatcher consumes the queue now, or
    serves it paused)."""
    paused_by: str | None = None
    """The annotation that pauses the live dispatcher that serves the queue (it consumes
    nothing meanwhile: see PausedMark); None when it consumes, or none lives."""


def consumer_lock(db_path: Path, queue: str) -> ConsumerLock | None:
    """The consumer lock of ``queue`` in ``db_path``; None when no dispatcher ever
    consumed it. Read without taking it: a shared non-blocking lock fails exactly while
    a dispatcher holds its exclusive one. When none consumes it, a dispatcher that
    serves the queue paused (PausedMark) is its live consumer, ``paused_by`` saying so."""
    found = _consumer_lock(db_path, queue)
    if found is not None and found.live:
        return found
    paused = _paused_holder(db_path, queue)
    if paused is not None:
        return ConsumerLock(
            path=_paused_path(db_path, queue), pid=paused[0], live=True, paused_by=paused[1]
        )
    return found


def _consumer_lock(db_path: Path, queue: str) -> ConsumerLock | None:
    path = _lock_path(db_path, queue)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        text = os.read(fd, 64).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            live = True
        else:
            live = False
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return ConsumerLock(path=path, pid=int(text) if text.isdigit() else None, live=live)


class SQLiteDeadLetters:
    """The dead-letter queue of an embedded queue, for ``jobrunner dead-letters``. A
    replay moves the row back to its source queue in one transaction."""

    def __init__(self, *, path: Path, queue: str, dead_letter_queue: str) -> None:
        self.path = path
        self.queue = queue
        self.dead_letter_queue = dead_letter_queue
        self._db: SQLiteQueue | None = None

    @property
    def where(self) -> str:
        return f"queue {self.dead_letter_queue} in {self.path}"

    @property
    def destination(self) -> str:
        return f"queue {self.queue}"

    async def _open(self) -> SQLiteQueue:
        if self._db is None:
            self._db = await SQLiteQueue.open(self.path)
        return self._db

    async def read(self, *, limit: int) -> list[DeadLetter]:
        if not self.path.exists():
            return []
        rows = await (await self._open()).messages(self.dead_letter_queue, limit=limit)
        return [
            DeadLetter(
                id=str(row.id),
                body=row.body,
                headers=row.headers,
                message_id=row.message_id,
                content_type=row.content_type,
                when=row.published_at,
            )
            for row in rows
        ]

    async def replay(self, letters: Sequence[DeadLetter], *, value: str) -> int:
        moves = [
            (int(d.id), d.source_header("queue") or self.queue, replay_headers(d.headers, value))
            for d in letters
        ]
        return await (await self._open()).move(moves)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None


def open_dead_letters(
    trigger: SQLiteTrigger, *, scaledjob: ScaledJob, settings: Settings
) -> SQLiteDeadLetters:
    """The dead letters of a resolved ``sqlite`` trigger."""
    return SQLiteDeadLetters(
        path=trigger.path,
        queue=trigger.queue,
        dead_letter_queue=dead_letter_queue_name(trigger.queue, scaledjob.spec.deadLetter.queue),
    )


class SQLiteSink:
    """Publishes output-binding messages to a queue of the embedded queue file, each only
    once per output id while the queue holds it (see SQLiteQueue.publish_once)."""

    def __init__(self, trigger: SQLiteTrigger) -> None:
        self._trigger = trigger
        self._queue: SQLiteQueue | None = None

    async def publish(self, body: bytes, *, message_id: str) -> None:
        if self._queue is None:
            self._queue = await SQLiteQueue.open(self._trigger.path)
        await self._queue.publish_once(self._trigger.queue, body, message_id=message_id)

    async def close(self) -> None:
        if self._queue is not None:
            await self._queue.close()
            self._queue = None


def open_sink(trigger: SQLiteTrigger, *, settings: Settings) -> SQLiteSink:
    return SQLiteSink(trigger)
