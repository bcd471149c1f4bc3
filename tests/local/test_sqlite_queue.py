"""The embedded queue's settlement semantics, on a real SQLite file."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobrunner.core.models import Action, Decision
from jobrunner.sources.sqlite import QueueBusy, SQLiteHandle, SQLiteQueue, SQLiteSource


async def publish(path: Path, queue: str, *bodies: bytes, ids: list[str] | None = None) -> None:
    q = await SQLiteQueue.open(path)
    try:
        await q.publish(queue, list(bodies), message_ids=ids)
    finally:
        await q.close()


async def counts(path: Path, queue: str) -> tuple[int, int, int]:
    q = await SQLiteQueue.open(path)
    try:
        c = await q.counts(queue, f"{queue}.dead-letter")
    finally:
        await q.close()
    return c.ready, c.in_hand, c.dead_letter


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[SQLiteSource]:
    s = SQLiteSource(path=tmp_path / "q.db", queue="work", prefetch=2, scaledjob="sj")
    await s.start()
    yield s
    await s.close()


async def take(source: SQLiteSource, n: int, *, within: float = 5.0) -> list[SQLiteHandle]:
    it = source.deliveries()
    out = []
    async with asyncio.timeout(within):
        while len(out) < n:
            out.append(await anext(it))
    return out


async def test_published_messages_arrive_in_order_and_an_ack_removes_them(
    source: SQLiteSource,
) -> None:
    await publish(source.path, "work", b"a", b"b", ids=["m-1", "m-2"])
    first, second = await take(source, 2)
    assert [first.delivery.identity, second.delivery.identity] == ["m-1", "m-2"]
    assert first.delivery.body == b"a"
    assert not first.delivery.redelivered
    assert await counts(source.path, "work") == (0, 2, 0)
    assert await source.settle(first, Decision.ack("job-1"))
    assert await source.settle(second, Decision.ack("job-2"))
    assert await counts(source.path, "work") == (0, 0, 0)


async def test_prefetch_bounds_the_messages_in_hand(source: SQLiteSource) -> None:
    await publish(source.path, "work", b"1", b"2", b"3", b"4")
    held = await take(source, 2)
    it = source.deliveries()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await anext(it)
    assert await counts(source.path, "work") == (2, 2, 0)
    await source.settle(held[0], Decision.ack())
    async with asyncio.timeout(5):
        # The timeout above ended that iterator; the source itself goes on.
        third = await anext(source.deliveries())
    assert third.delivery.body == b"3"


async def test_dead_letter_moves_the_message_with_its_reason(source: SQLiteSource) -> None:
    await publish(source.path, "work", b'{"x": 1}', ids=["m-9"])
    (handle,) = await take(source, 1)
    await source.settle(handle, Decision.dead_letter("BackoffLimitExceeded", "exit 3", "job-9"))
    assert await counts(source.path, "work") == (0, 0, 1)
    q = await SQLiteQueue.open(source.path)
    try:
        (dead,) = await q.messages("work.dead-letter")
    finally:
        await q.close()
    assert dead.body == b'{"x": 1}'
    assert dead.message_id == "m-9"
    assert dead.headers["x-jobrunner-reason"] == "BackoffLimitExceeded"
    assert dead.headers["x-jobrunner-detail"] == "exit 3"
    assert dead.headers["x-jobrunner-job"] == "job-9"
    assert dead.headers["x-jobrunner-source-queue"] == "work"


async def test_requeued_message_comes_back_marked_redelivered(source: SQLiteSource) -> None:
    await publish(source.path, "work", b"again", ids=["m-r"])
    (handle,) = await take(source, 1)
    await source.settle(handle, Decision(Action.REQUEUE))
    (again,) = await take(source, 1)
    assert again.delivery.identity == "m-r"
    assert again.delivery.redelivered


async def test_dead_letter_copy_publishes_from_the_kept_original(source: SQLiteSource) -> None:
    original = {"body": b"kept", "message_id": "m-k", "headers": {"tenant": "acme"}}
    await source.dead_letter_copy(original, Decision.dead_letter("DeadlineExceeded", "", "j"))
    q = await SQLiteQueue.open(source.path)
    try:
        (dead,) = await q.messages("work.dead-letter")
    finally:
        await q.close()
    assert (dead.body, dead.message_id) == (b"kept", "m-k")
    assert dead.headers["tenant"] == "acme"
    assert dead.headers["x-jobrunner-reason"] == "DeadlineExceeded"


async def test_a_second_consumer_of_the_same_queue_is_refused(
    source: SQLiteSource, tmp_path: Path
) -> None:
    # In this same process: another process is refused naming its pid (see
    # test_a_second_dispatcher_on_one_embedded_queue_is_one_line_naming_the_first).
    other = SQLiteSource(path=source.path, queue="work", prefetch=1)
    with pytest.raises(QueueBusy, match=r"consumed by another ScaledJob of this same dispatcher"):
        await other.start()


async def test_messages_held_by_a_killed_consumer_come_back_redelivered(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    await publish(db, "work", b"1", b"2", b"3", ids=["a", "b", "c"])
    consumer = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from jobrunner.sources.sqlite import SQLiteSource
        async def main():
            s = SQLiteSource(path=Path({str(db)!r}), queue="work", prefetch=2)
            await s.start()
            it = s.deliveries()
            for _ in range(2):
                h = await anext(it)
                print(h.delivery.identity, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", consumer, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        held = [(await proc.stdout.readline()).decode().strip() for _ in range(2)]
        assert held == ["a", "b"]
        assert await counts(db, "work") == (1, 2, 0)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    after = SQLiteSource(path=db, queue="work", prefetch=5)
    await after.start()
    try:
        got = await take(after, 3)
    finally:
        await after.close()
    assert [(h.delivery.identity, h.delivery.redelivered) for h in got] == [
        ("a", True),
        ("b", True),
        ("c", False),
    ]
    assert [h.delivery.body for h in got] == [b"1", b"2", b"3"]


async def test_processes_opening_a_new_queue_file_at_once_all_succeed(tmp_path: Path) -> None:
    # A dispatcher and `jobrunner publish` may create the file together; switching it to
    # WAL then answers "database is locked" at once to one of them (about one trial in
    # three on this machine before the retry), and the failed opener used to hang at exit.
    opener = textwrap.dedent(
        """
        import asyncio, sys, time
        from pathlib import Path
        from jobrunner.sources.sqlite import SQLiteQueue
        async def main():
            while time.time() < float(sys.argv[2]):
                pass
            q = await SQLiteQueue.open(Path(sys.argv[1]))
            await q.publish("work", [b"x"])
            await q.close()
        asyncio.run(main())
        """
    )
    for trial in range(10):
        db = tmp_path / f"fresh-{trial}.db"
        start = str(time.time() + 0.6)
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", opener, str(db), start, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        async with asyncio.timeout(30):
            errors = [(await p.communicate())[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(errors)
        assert await counts(db, "work") == (2, 0, 0)


async def test_many_settlements_at_once_are_each_carried_out_whole(tmp_path: Path) -> None:
    # A dispatcher at maxReplicaCount 20 settling as fast as Jobs end, half of them dead
    # letters, while the consumer keeps claiming: every settlement completes and the
    # counts add up (statements of concurrent settlements once interleaved on the one
    # connection: "cannot commit transaction - SQL statements in progress").
    path = tmp_path / "q.db"
    total = 400
    await publish(path, "work", *(f"m{i}".encode() for i in range(total)))
    source = SQLiteSource(path=path, queue="work", prefetch=20, scaledjob="sj", poll_interval=0)
    await source.start()
    settled: list[bool] = []

    async def settle(handle: SQLiteHandle, i: int) -> None:
        await asyncio.sleep(0)
        if i % 2:
            decision = Decision.dead_letter("Boom", "x" * 500, f"j{i}")
        else:
            decision = Decision.ack(f"j{i}")
        settled.append(await source.settle(handle, decision))

    try:
        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            count = 0
            async for handle in source.deliveries():
                group.create_task(settle(handle, count))
                count += 1
                if count == total:
                    break
    finally:
        await source.close()
    assert settled == [True] * total
    assert await counts(path, "work") == (0, 0, total // 2)


def _count_in_another_process(path: Path, queue: str) -> int:
    """Open the file, count, close: as ``jobrunner status`` (or a test's poll) does from
    its own process. The last connection to close checkpoints and removes the WAL."""
    script = (
        "import sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1])\n"
        "n = db.execute('SELECT count(*) FROM messages WHERE queue = ?', (sys.argv[2],))\n"
        "print(n.fetchone()[0])\n"
        "db.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), queue], check=True, capture_output=True
    )
    return int(out.stdout)


async def test_a_second_queue_opened_in_one_process_keeps_the_firsts_writes_visible(
    tmp_path: Path,
) -> None:
    """A dispatcher holds the queue file open (its source) and opens it again (a
    function's outputs to the same file). Opening must not close a descriptor of the
    file outside SQLite: POSIX drops every lock the process holds on a file when any of
    its descriptors is closed (fcntl(2); sqlite.org/howtocorrupt.html section 2.2), and
    then another process, closing as if it were the last, removes the WAL under the
    first connection, whose next commits go to a file nobody reads (found as an acked
    message that stayed on the queue, under load)."""
    path = tmp_path / "q.db"
    await publish(path, "work", b"one", b"two")
    first = await SQLiteQueue.open(path)
    try:
        [one, _two] = await first.claim("work", 2)
        second = await SQLiteQueue.open(path)  # the outputs' queue, same process
        try:
            assert _count_in_another_process(path, "work") == 2
            assert await first.ack(one.id)
            assert _count_in_another_process(path, "work") == 1
            await second.publish("receipts", [b"r"])
            assert _count_in_another_process(path, "receipts") == 1
        finally:
            await second.close()
    finally:
        await first.close()
    assert _count_in_another_process(path, "work") == 1
