"""Local mode's state holds message bodies, Secrets and queues: every file jobrunner
keeps there is 0600 and every directory 0700, whatever the umask, and a state directory
an older version left readable is made private when a dispatcher starts."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
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


def cli_under_umask_022(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``jobrunner ARGS`` run in ``cwd`` as a user whose umask is the usual 022."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    return subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.umask(0o022),
    )


def test_publish_makes_the_state_directory_private_from_the_start(
    tmp_path: Path, manifest: ManifestFactory
) -> None:
    path = manifest(JOB)
    # The default .jobrunner of a fresh directory, and one a --state-dir names deeper down.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    done = cli_under_umask_022("publish", "-f", str(path), '{"a": 1}', cwd=fresh)
    assert done.returncode == 0, done.stderr
    assert loose(modes(fresh / ".jobrunner"), fresh / ".jobrunner") == {}
    deeper = tmp_path / "deeper" / "x" / "state"
    done = cli_under_umask_022(
        "publish", "--state-dir", str(deeper), "-f", str(path), '{"a": 2}', cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert loose(modes(deeper), deeper) == {}
    # The first dispatcher then finds nothing to make private (no warning about it).
    assert oct(stat.S_IMODE((tmp_path / "deeper" / "x").stat().st_mode)) == "0o700"
    assert LocalJobClient(fresh / ".jobrunner").secure() == 0


def test_run_makes_the_state_directory_private_from_the_start(
    tmp_path: Path, manifest: ManifestFactory
) -> None:
    path = manifest(JOB)
    state = tmp_path / "new-state"
    old = os.umask(0o022)
    try:
        dispatchers = Dispatchers(state, tmp_path)
        proc = dispatchers.start(path)
    finally:
        os.umask(old)
    try:
        wait_until(
            lambda: "dispatching work from" in dispatchers.logs() or proc.poll() is not None,
            timeout=60,
        )
        assert proc.poll() is None, dispatchers.logs()
        # Made private by `run` itself, so its executor found nothing to tighten.
        assert "private (0600 files" not in dispatchers.logs()
        assert loose(modes(state), state) == {}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
