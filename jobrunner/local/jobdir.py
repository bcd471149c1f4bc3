"""The on-disk record of one local Job, shared by the client (in the dispatcher) and the
supervisor (the process that runs the Job).

A Job is a directory ``<state>/jobs/<namespace>/<name>/``: ``job.json`` (the Job object,
written by the client), ``status.json`` (its status, written only by the supervisor),
``secret.json`` (its message Secret, if any), ``job-annotations.json`` (annotations the
Job's own processes add, written by them: the local stand-in for a pod patching its Job
through the API server, as jobrunner's function invoker does), ``logs/`` (one file per
container and attempt) and ``volumes/`` (the mounted Secrets and emptyDirs). Each file
has one writer and is replaced atomically, so readers never see half a file and no lock
is needed to read. The supervisor holds ``supervisor.lock`` while it lives: whether a Job still has
someone running it is one non-blocking ``flock`` away, with no pid guessing.

Everything here that jobrunner writes is private to the user who runs it (0600 files in
0700 directories, see ``jobrunner.core.privatefs``): it holds message bodies and Secrets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobrunner.core.privatefs import open_private, replace_private

JOB_FILE = "job.json"
STATUS_FILE = "status.json"
SECRET_FILE = "secret.json"
LOCK_FILE = "supervisor.lock"
RECORD_LOCK_FILE = "job.lock"
JOB_ANNOTATIONS_FILE = "job-annotations.json"


def write_json(path: Path, value: Any) -> None:
    """Replace ``path`` atomically with ``value`` as JSON, in a private file."""
    replace_private(path, json.dumps(value, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class JobDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def volumes(self) -> Path:
        return self.path / "volumes"

    def job(self) -> dict[str, Any] | None:
        value: dict[str, Any] | None = read_json(self.path / JOB_FILE)
        return value

    def status(self) -> dict[str, Any]:
        value: dict[str, Any] | None = read_json(self.path / STATUS_FILE)
        return value or {}

    def job_annotations(self) -> dict[str, str]:
        """Annotations the Job's processes added (see the module docstring)."""
        try:
            value = read_json(self.path / JOB_ANNOTATIONS_FILE)
        except ValueError:
            return {}  # being replaced right now; the next read sees it whole
        return {str(k): str(v) for k, v in (value or {}).items()}

    def secret(self) -> dict[str, Any] | None:
        value: dict[str, Any] | None = read_json(self.path / SECRET_FILE)
        return value

    def write_job(self, job: dict[str, Any]) -> None:
        write_json(self.path / JOB_FILE, job)

    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.path / STATUS_FILE, status)

    def write_secret(self, secret: dict[str, Any]) -> None:
        write_json(self.path / SECRET_FILE, secret)

    def remove_secret(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / SECRET_FILE).unlink()

    def stamp(self) -> tuple[tuple[int, int, int], bytes]:
        """Changes whenever the Job or its status changes. The status (small, rewritten
        by the supervisor, possibly twice within one tick of the file-time clock and onto
        a reused inode) is compared by content; job.json, which only the client rewrites
        and which only grows (annotations), by inode, time and size."""
        try:
            stat = (self.path / JOB_FILE).stat()
            job = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            job = (0, 0, 0)
        try:
            status = (self.path / STATUS_FILE).read_bytes()
        except FileNotFoundError:
            status = b""
        with contextlib.suppress(FileNotFoundError):
            status += (self.path / JOB_ANNOTATIONS_FILE).read_bytes()
        return job, status

    @contextlib.contextmanager
    def record_lock(self) -> Iterator[None]:
        """Held across a read-modify-write of ``job.json`` (writers in other processes
        wait), as an API server serialises writes to one object."""
        fd = open_private(self.path / RECORD_LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def supervised(self) -> bool:
        """True while a supervisor process holds this Job's lock."""
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def supervisor_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int((self.path / LOCK_FILE).read_text().strip())
        return None
