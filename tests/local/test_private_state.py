"""Local mode's state holds message bodies, Secrets and queues: every file jobrunner
keeps there is 0600 and every directory 0700, whatever the umask, and a state directory
an older version left readable is made private when a dispatcher starts."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobrunner.local.client import LocalJobClient
from jobrunner.sources.sqlite import SQLiteQueue, SQLiteSource
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers, ManifestFactory
from tests.local.test_embedded_dispatch import publish, settled

# Reads its body from the Secret volume, writes a log line, and leaves a file of its own
# in its working directory (the process's, not jobrunner's: not checked).
JOB = """
import os
print(open(os.environ["JOBRUNNER_MESSAGE_FILE"]).read())
open("output.txt", "w").write("mine")
"""


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most open umask there is: modes are then exactly what the code asks for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(state: Path) -> dict[str, str]:
    """Every file and directory under ``state`` (itself included) with its mode, except
    what the Jobs' processes wrote in their working directories."""
    out = {".": oct(stat.S_IMODE(state.stat().st_mode))}
    for path in sorted(state.rglob("*")):
        relative = path.relative_to(state)
        if "work" in relative.parts[:-1] and relative.parts[0] == "jobs":
            continue
        out[str(relative)] = oct(stat.S_IMODE(path.lstat().st_mode))
    return out


def loose(found: dict[str, str], state: Path) -> dict[str, str]:
    """What is not 0600 (a file) or 0700 (a directory)."""
    return {
        name: mode
        for name, mode in found.items()
        if mode != ("0o700" if (state / name).is_dir() else "0o600")
    }


@pytest.mark.usefixtures("open_umask")
def test_every_file_of_a_run_is_private_whatever_the_umask(
    state_dir: Path, manifest: ManifestFactory, dispatchers: Dispatchers
) -> None:
    path = manifest(JOB, delivery={"mode": "file"})
    publish(path, state_dir, {"secret": "s3cr3t"}, {"secret": "another"})
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    found = modes(state_dir)
    kinds = {Path(name).name for name in found}
    # The run made what is to be checked: queue, lock, Jobs, Secrets, volumes, logs.
    assert {"queue.db", "queue.db-wal", "queue.db-shm", "job.json", "secret.json"} <= kinds
    assert {"status.json", "body", "1-main.log", "supervisor.log", "job.lock"} <= kinds
    assert any(name.endswith(".consumer.lock") for name in kinds)
    assert loose(found, state_dir) == {}


def test_a_state_directory_an_older_version_left_open_is_made_private_at_start(
    tmp_path: Path,
) -> None:
    state = tmp_path / "old-state"
    job = state / "jobs" / "default" / "work-1"
    (job / "logs").mkdir(parents=True, mode=0o755)
    (job / "work").mkdir(mode=0o755)
    (job / "work" / "theirs.sh").write_text("echo")
    (job / "work" / "theirs.sh").chmod(0o755)
    for directory in (state, state / "jobs", state / "jobs" / "default", job, job / "logs"):
        directory.chmod(0o755)
    for name in ("job.json", "secret.json", "logs/1-main.log"):
        (job / name).write_text("{}")
        (job / name).chmod(0o644)
    (state / "queue.db").write_bytes(b"")
    (state / "queue.db").chmod(0o644)
    LocalJobClient(state, controller=False)  # a read-only view changes nothing
    assert oct(stat.S_IMODE(state.stat().st_mode)) == "0o755"
    LocalJobClient(state)
    assert loose(modes(state), state) == {}
    # What a Job's process wrote keeps its owner's bits; only its directory is closed.
    assert oct(stat.S_IMODE((job / "work" / "theirs.sh").stat().st_mode)) == "0o755"
    assert oct(stat.S_IMODE((job / "work").stat().st_mode)) == "0o700"


@pytest.mark.usefixtures("open_umask")
async def test_the_embedded_queue_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "queues" / "q.db"
    queue = await SQLiteQueue.open(db)
    try:
        await queue.publish("work", [b"body"])
    finally:
        await queue.close()
    source = SQLiteSource(path=db, queue="work", prefetch=1)
    await source.start()
    try:
        found = modes(db.parent)
    finally:
        await source.close()
    assert {"q.db", "q.db-wal", "q.db-shm", "q.db.work.consumer.lock"} <= set(found)
    assert loose(found, db.parent) == {}
