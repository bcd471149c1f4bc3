"""Ctrl-C and shutdown, with real processes and real signals: the demos stop in one line
and take their Jobs with them; `jobrunner run` says what it left running and what it
released; the local executor's lines about supervisors say what really happened."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from tests.helpers import eventually
from tests.local.conftest import Dispatchers, ManifestFactory
from tests.local.test_local_executor import render
from tests.services import program

ROOT = Path(__file__).resolve().parents[2]
WITHIN = 60.0
"""A generous bound for what takes a second or two on an idle machine."""


def processes_naming(text: str) -> list[str]:
    """Command lines of this machine's processes that mention ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


def read_until(stream: IO[bytes], pattern: str, seen: list[str], within: float) -> re.Match[str]:
    """Lines of ``stream`` (kept in ``seen``) until one matches ``pattern``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        line = stream.readline().decode(errors="replace")
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r}; got:\n{''.join(seen)}")


def wait_until(check: Any, within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def demo_process() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("script", "where"),
    [
        ("demo.py", r"the queue is (/\S+)/queue\.db"),
        ("demo_functions.py", r"-> (/\S+)/functions\.yaml"),
    ],
)
def test_ctrl_c_during_a_demo_is_one_line_and_stops_its_jobs(
    script: str, where: str, demo_process: list[subprocess.Popen[bytes]]
) -> None:
    if script == "demo_functions.py":  # its custom-handler example is a Node program
        program("node", how="install Debian's nodejs package")
    # As a terminal's Ctrl-C: SIGINT to the whole foreground process group.
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy/local" / script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    demo_process.append(proc)
    assert proc.stdout is not None
    seen: list[str] = []
    root = Path(read_until(proc.stdout, where, seen, WITHIN).group(1))
    state = root / "state" if script == "demo_functions.py" else root
    read_until(proc.stdout, r"published \d+ messages", seen, WITHIN)

    def a_job_runs() -> bool:
        jobs = [JobDir(p) for p in state.glob("jobs/*/*")]
        return any(j.supervised() for j in jobs)

    wait_until(a_job_runs)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=WITHIN)
    output = "".join(seen) + rest.decode(errors="replace")
    assert proc.returncode == -signal.SIGINT  # ended as Ctrl-C ends a program: make stops
    assert "Traceback" not in output
    said = [line for line in output.splitlines() if "interrupted" in line]
    assert len(said) == 1, output
    assert "stopped the dispatcher" in said[0]
    # The demo's own directory goes, not only its state: nothing it made is left (i21, F9).
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))
    assert f"removed its directory {root}" in said[0]
    # Supervisors run in sessions of their own (Ctrl-C never reaches them): none is left.
    wait_until(lambda: not processes_naming(str(state)), within=10)


def publish(state: Path, manifest: Path, body: str, *, message_id: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobrunner.cli",
            "publish",
            "--state-dir",
            str(state),
            "-f",
            str(manifest),
            "--message-id",
            message_id,
            body,
        ],
        check=True,
        capture_output=True,
    )


async def test_ctrl_c_stops_run_gracefully_which_says_what_it_left_and_exits_130(
    state_dir: Path, manifest: ManifestFactory, dispatchers: Dispatchers
) -> None:
    path = manifest("import time; time.sleep(60)", max_replicas=1)
    # The depth gauge is sampled once an hour here: the progress line must not count
    # waiting messages from that sample.
    proc = dispatchers.start_with(
        path, {"JOBRUNNER_TELEMETRY__QUEUE_DEPTH_INTERVAL_SECONDS": "3600"}
    )

    async def logged(pattern: str) -> bool:
        return bool(re.search(pattern, dispatchers.logs()))

    await eventually(lambda: logged("dispatching work from"), within=WITHIN)
    publish(state_dir, path, "{}", message_id="first")
    await eventually(lambda: logged(r"1 Job\(s\) running"), within=WITHIN)
    publish(state_dir, path, "{}", message_id="second")
    # Only now does a message wait (for the one slot): the progress line (every 0.5 s
    # here) counts it.
    await eventually(lambda: logged(r"1 message\(s\) waiting \(\d in hand"), within=WITHIN)
    # As a terminal's Ctrl-C: the graceful stop SIGTERM gives, and the exit code every
    # other command gives on Ctrl-C (the README's table), so a script sees it was cut short.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WITHIN) == 130
    logs = dispatchers.logs()
    assert "Traceback" not in logs
    last = logs.strip().splitlines()[-1]
    assert "stopped: 1 Job(s) left running (processes of their own, they run on" in last
    assert "1 message(s) released unsettled to the source" in last


def test_the_progress_line_counts_messages_in_hand_waiting_for_a_slot() -> None:
    from jobrunner.runner import waiting_text

    assert waiting_text(1, 0).startswith("1 message(s) waiting (1 in hand")
    assert waiting_text(2, 3).startswith("5 message(s) waiting")
    assert waiting_text(0, None).startswith("? message(s) waiting")


async def test_a_job_being_created_is_not_taken_for_one_that_lost_its_supervisor(
    state_dir: Path, manifest: ManifestFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class ScanMidCreate(LocalJobClient):
        """A watch's scan that lands between the Job's record and its supervisor, as
        it may on the worker threads of a busy dispatcher."""

        def _write_new(self, jobdir: JobDir, job: Any, secret: Any) -> None:
            super()._write_new(jobdir, job, secret)
            self._scan("default", {}, {})

    client = ScanMidCreate(state_dir, retry_seconds=0.1)
    job, secret = render(manifest("print('hi')"), b"{}")
    with caplog.at_level(logging.INFO, logger="jobrunner.local.client"):
        await client.create_job(job, secret)
    assert not [r for r in caplog.records if "supervisor" in r.getMessage()]


async def test_a_lost_supervisor_is_said_to_be_lost_when_another_starts(
    state_dir: Path, manifest: ManifestFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(manifest("import time; time.sleep(2)"), b"{}")
    await client.create_job(job, secret)
    jobdir = JobDir(state_dir / "jobs" / "default" / job["metadata"]["name"])

    async def supervised() -> bool:
        return jobdir.supervised()

    await eventually(supervised, within=WITHIN)
    pid = jobdir.supervisor_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def orphaned() -> bool:
        return not jobdir.supervised()

    await eventually(orphaned, within=WITHIN)
    fresh = LocalJobClient(state_dir, retry_seconds=0.1)
    with caplog.at_level(logging.INFO, logger="jobrunner.local.client"):
        await fresh.list_jobs("default", "")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Job ")]
    assert lines == [
        f"Job {jobdir.name} lost its supervisor (the process ended before the Job did: "
        "killed, or this machine restarted); starting another, as the Job controller "
        "replaces a lost pod"
    ]


async def test_run_serves_only_the_scaledjob_given(
    state_dir: Path, tmp_path: Path, dispatchers: Dispatchers
) -> None:
    docs = [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": name},
            "spec": {
                "triggers": [{"type": "sqlite", "metadata": {"queueName": name}}],
                "jobTargetRef": {
                    "template": {
                        "spec": {"containers": [{"name": "m", "image": "x", "command": ["true"]}]}
                    }
                },
            },
        }
        for name in ("one", "two")
    ]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = dispatchers.start_extra(path, ["--scaledjob", "two"])

    async def serving() -> bool:
        return "dispatching two from" in dispatchers.logs()

    await eventually(serving, within=WITHIN)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WITHIN) == 0  # SIGTERM asks for the stop: done, not cut short
    assert "dispatching one" not in dispatchers.logs()


def jobrunner(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=WITHIN,
    )


async def test_listings_show_a_file_body_and_find_reasons_in_any_case(
    state_dir: Path, manifest: ManifestFactory, dispatchers: Dispatchers
) -> None:
    path = manifest("import sys; sys.exit(3)", delivery={"mode": "file"})
    published = jobrunner(
        "publish", "--state-dir", str(state_dir), "-f", str(path), '{"image": "cat.png"}'
    )
    assert published.returncode == 0, published.stderr
    proc = dispatchers.start(path)

    async def dead_lettered() -> bool:
        return "dead-lettered the message" in dispatchers.logs()

    await eventually(dead_lettered, within=WITHIN)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=WITHIN)
    where = ["--local", "--state-dir", str(state_dir), "-f", str(path)]
    jobs = jobrunner("jobs", *where)
    assert jobs.returncode == 0, jobs.stderr
    row = next(line for line in jobs.stdout.splitlines() if "BackoffLimitExceeded" in line)
    assert '{"image": "cat.png"}' in row  # the body's start, not sha256:…
    assert "sha256:" not in row
    assert "REASON is the Job's own" in jobs.stdout

    found = jobrunner("dead-letters", *where, "--reason", "backofflimitexceeded")
    assert found.returncode == 0, found.stderr
    assert "1 dead letter(s) with reason backofflimitexceeded" in found.stdout
    assert "BackoffLimitExceeded: the Job failed: every attempt" in found.stdout

    typo = jobrunner("dead-letters", *where, "--reason", "BackofLimitExceded")
    assert "no dead letters with reason" in typo.stdout
    assert (
        "no dead letter has reason 'BackofLimitExceded'; the reasons there: "
        "BackoffLimitExceeded (1); did you mean 'BackoffLimitExceeded' for "
        "'BackofLimitExceded'?"
    ) in typo.stderr


def test_make_clean_removes_only_this_clones_demo_state(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "deploy/local"))
    try:
        from demo_common import clone_id
    finally:
        sys.path.remove(str(ROOT / "deploy/local"))
    clone, other, temp = tmp_path / "clone", tmp_path / "other", tmp_path / "tmp"
    for directory in (clone, other, temp):
        directory.mkdir()
    shutil.copy(ROOT / "Makefile", clone / "Makefile")
    ours = temp / f"jobrunner-demo-{clone_id(clone.resolve())}-abc"
    theirs = temp / f"jobrunner-demo-{clone_id(other.resolve())}-xyz"
    for directory in (ours, theirs):
        (directory / "jobs").mkdir(parents=True)
    (clone / ".jobrunner").mkdir()
    done = subprocess.run(
        ["make", "clean"],
        cwd=clone,
        env={**os.environ, "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=WITHIN,
    )
    assert done.returncode == 0, done.stderr
    assert not ours.exists()
    assert not (clone / ".jobrunner").exists()
    assert theirs.exists()  # another clone's demo state is its own


@pytest.mark.parametrize("command", ["status", "logs"])
def test_ctrl_c_stops_a_watching_command_without_a_traceback(
    command: str, state_dir: Path, manifest: ManifestFactory
) -> None:
    path = manifest("import time; print('working', flush=True); time.sleep(60)")
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(path, b"{}")
    asyncio.run(client.create_job(job, secret))
    where = ["--local", "--state-dir", str(state_dir)]
    argv = {
        "status": ["status", *where, "-f", str(path), "--watch", "--interval", "0.2"],
        "logs": ["logs", *where, "--follow", job["metadata"]["name"]],
    }[command]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobrunner.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        read_until(proc.stdout, r"working|running", [], WITHIN)  # it is watching now
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=WITHIN)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err.decode()
    assert len(err.decode().strip().splitlines()) <= 1
