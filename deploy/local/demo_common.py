"""What the demos (`make demo`, `make demo-cluster`, `make demo-functions`) share: their
temporary directories, which `make clean` of this clone (and only of this clone) removes,
and Ctrl-C, which is one line and a clean stop.

Temporary directories are ``$TMPDIR/jobrunner-demo-<clone>-*``, ``<clone>`` being the
first 8 hex digits of the SHA-256 of this clone's absolute path: the Makefile's clean
target computes the same (tests/local/test_interrupt_and_shutdown.py runs it), so two
clones on one machine never remove each other's demo state.

Ctrl-C:

Ctrl-C (SIGINT to the terminal's process group) or SIGTERM only sets a flag here: the
demo's waits end early, its dispatcher is stopped the ordinary way (the runner's own
bounded shutdown), and then its Jobs are stopped too. That last step is needed because
a local Job's supervisor runs in a session of its own, so that Jobs outlive a
dispatcher as they do on a cluster (jobrunner.local.supervisor): Ctrl-C never reaches
it, and without this a Job would run on until its activeDeadlineSeconds. A demo's Jobs
and state directory are its own, made for the run, so both go. A second Ctrl-C while
stopping exits at once (exit 130), leaving whatever was not stopped yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from jobrunner.local.jobdir import JobDir
from jobrunner.tracking.tracker import outcome_of

ROOT = Path(__file__).resolve().parents[2]


def clone_id(root: Path = ROOT) -> str:
    """This clone's part of its demos' directory names (the Makefile's clean says the
    same in shell)."""
    return hashlib.sha256(str(root).encode()).hexdigest()[:8]


def demo_dir(kind: str = "") -> Path:
    """A fresh private temporary directory of this clone's demos."""
    return Path(tempfile.mkdtemp(prefix=f"jobrunner-demo-{clone_id()}-{kind}"))


EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command ended by Ctrl-C."""
_STOP_SECONDS = 5.0
"""How long a Job's supervisor gets to stop its processes before they are killed."""
_APPEAR_SECONDS = 60.0
"""How long a Job's supervisor, started just before the Ctrl-C, may take to take its
Job's lock (a Python process starting on a busy machine): one left alone would go on
making its Job's directories after they were removed."""


def exit_interrupted() -> None:
    """End this process as Ctrl-C ends one (killed by SIGINT), so a shell script or make
    that ran it stops too instead of going on to the next command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


class Interrupt:
    """Set by the first SIGINT or SIGTERM; the second one ends the process."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.event.is_set():
            os._exit(EXIT_INTERRUPTED)  # asked twice: stop waiting for the clean stop
        self.event.set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when interrupted meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout=seconds)


def _unfinished(state_dir: Path) -> list[JobDir]:
    return [
        jobdir
        for jobdir in (JobDir(p) for p in sorted(state_dir.glob("jobs/*/*")) if p.is_dir())
        if jobdir.job() is not None and outcome_of({"status": jobdir.status()}) is None
    ]


async def stop_local_jobs(state_dir: Path, *, remove: Path) -> int:
    """Stop every unfinished Job of a local state directory, then remove ``remove``: the
    demo's own directory, which holds the state directory and whatever else the demo
    made for the run (its manifests), so that nothing of it is left behind; call it
    once the dispatcher has stopped. Work the dispatcher had handed to threads (a
    create under way) is waited for first, so no Job appears after the scan. Each Job's
    supervisor gets SIGTERM (it stops its Job's processes and exits); one started a
    moment ago, which has not taken its Job's lock yet, gets it once it has (waited for
    up to ``_APPEAR_SECONDS``: left alone, it would make its Job's directories again
    after they were removed). ``_STOP_SECONDS`` after the last one was signalled, what
    is left of the Jobs' process groups is killed. Returns how many Jobs were stopped."""
    await asyncio.get_running_loop().shutdown_default_executor()
    signalled: set[Path] = set()
    start = time.monotonic()
    deadline = start + _STOP_SECONDS
    while True:
        unfinished = _unfinished(state_dir)
        for jobdir in unfinished:
            pid = jobdir.supervisor_pid()
            if jobdir.path not in signalled and pid is not None and jobdir.supervised():
                signalled.add(jobdir.path)
                deadline = time.monotonic() + _STOP_SECONDS
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
        waiting = [j for j in unfinished if j.path not in signalled]
        done = not waiting and all(not j.supervised() for j in unfinished)
        now = time.monotonic()
        if done or (now >= deadline and not waiting) or now >= start + _APPEAR_SECONDS:
            break
        await asyncio.sleep(0.05)
    for jobdir in _unfinished(state_dir):
        for pgid in jobdir.status().get("pgids") or []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        pid = jobdir.supervisor_pid()
        if pid is not None and jobdir.supervised():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    # A process started in the last moment (a Job's init container, before its supervisor
    # recorded its process group) would write into the directory after it is removed
    # (a Ctrl-C test found an invoker.py copied there): kill what still runs in or names
    # the directory, and remove it once none is left.
    deadline = time.monotonic() + _STOP_SECONDS
    while (left := _processes_under(remove)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
    shutil.rmtree(remove, ignore_errors=True)
    return len(signalled)


def _processes_under(root: Path) -> list[int]:
    """Pids of this machine's live processes (Linux ``/proc``; none elsewhere) whose
    command line names ``root`` or whose working directory is under it."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    text = str(root)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        if text in argv or cwd == text or cwd.startswith(text + os.sep):
            found.append(int(entry.name))
    return found
