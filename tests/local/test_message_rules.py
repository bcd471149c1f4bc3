"""Faults found by trying real users' reports, each as a behaviour of the embedded mode:
a message that reuses an id or a body is never silently acked, cleanup happens while the
queue is idle, an error nobody foresaw cannot keep a message in hand, and message text
reaches the process byte-exact wherever the kubelet would expand it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from jobrunner.cli import main
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers, ManifestFactory
from tests.local.test_embedded_dispatch import (
    RECORDING_JOB,
    dead_letters,
    publish,
    queue_state,
    runs,
    settled,
)


def publish_with_id(manifest: Path, state: Path, message_id: str, body: object) -> None:
    text = json.dumps(body)
    args = ["publish", "-f", str(manifest), "--state-dir", str(state)]
    assert main([*args, "--message-id", message_id, text]) == 0


def reasons(state: Path) -> list[str]:
    return [headers["x-jobrunner-reason"] for _, headers in dead_letters(state, "work")]


def starts(tmp_path: Path) -> list[str]:
    return [ident for what, ident, _ in runs(tmp_path) if what == "start"]


def test_a_different_body_under_a_used_message_id_is_dead_lettered_not_swallowed(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(RECORDING_JOB)
    publish_with_id(path, state_dir, "ORD-1001", {"id": "v1", "seconds": 0.1})
    dispatchers.start(path)
    wait_until(lambda: starts(tmp_path) == ["v1"] and settled(state_dir, "work"), timeout=60)
    publish_with_id(path, state_dir, "ORD-1001", {"id": "v2", "seconds": 0.1})
    wait_until(lambda: reasons(state_dir), timeout=60)
    assert reasons(state_dir) == ["MessageIdReused"]
    ((body, headers),) = dead_letters(state_dir, "work")
    assert json.loads(body)["id"] == "v2"
    assert "ORD-1001" in headers["x-jobrunner-detail"]
    assert "own message_id" in headers["x-jobrunner-detail"]
    assert starts(tmp_path) == ["v1"], "v2 must not have run as v1's Job"
    assert "redelivered" not in dispatchers.logs().split("ORD-1001", 1)[-1].lower()


def test_republishing_a_dead_lettered_message_is_not_acked_silently(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(RECORDING_JOB)
    failing = {"id": "boom", "seconds": 0.1, "exit": 3}
    publish(path, state_dir, failing)  # no message id: the body is the identity
    dispatchers.start(path)
    wait_until(lambda: reasons(state_dir) == ["BackoffLimitExceeded"], timeout=60)
    publish(path, state_dir, failing)  # a user retries by publishing it again
    wait_until(lambda: len(reasons(state_dir)) == 2, timeout=60)
    assert reasons(state_dir) == ["BackoffLimitExceeded", "DuplicateMessage"]
    detail = dead_letters(state_dir, "work")[1][1]["x-jobrunner-detail"]
    assert "already ran as Job work-" in detail
    assert "failed (BackoffLimitExceeded)" in detail
    assert "new message_id" in detail
    assert queue_state(state_dir, "work")["ready"] == 0


def test_a_redelivery_still_adopts_its_finished_job(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    # The dispatcher dies after the Job finished but before the message was settled:
    # the message comes back marked redelivered and adopts the Job, which does not run
    # again and is not refused as a duplicate.
    path = manifest(RECORDING_JOB)
    publish_with_id(path, state_dir, "ORD-7", {"id": "once", "seconds": 2})
    first = dispatchers.start(path)
    wait_until(lambda: starts(tmp_path) == ["once"], timeout=60)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    wait_until(lambda: [w for w, _, _ in runs(tmp_path)] == ["start", "end"], timeout=60)
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    assert starts(tmp_path) == ["once"]
    assert reasons(state_dir) == []
    assert "message was delivered again: adopted its existing Job" in dispatchers.logs()


def test_a_finished_job_beyond_the_history_limit_goes_while_the_queue_is_idle(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers
) -> None:
    path = manifest(
        RECORDING_JOB, spec={"successfulJobsHistoryLimit": 0, "failedJobsHistoryLimit": 0}
    )
    publish(path, state_dir, {"id": "a", "seconds": 0.2}, {"id": "b", "seconds": 0.2, "exit": 1})
    dispatchers.start(path)
    jobs = state_dir / "jobs" / "default"
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    # No other Job will finish: the last ones must go all the same.
    wait_until(lambda: jobs.is_dir() and not any(jobs.iterdir()), timeout=30)
    assert reasons(state_dir) == ["BackoffLimitExceeded"]


def test_an_error_nobody_foresaw_releases_then_dead_letters_and_the_dispatcher_goes_on(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(RECORDING_JOB)
    publish(path, state_dir, {"id": "x1"}, {"id": "x2"})
    proc = dispatchers.start_with(
        path, {"JOBRUNNER_DISPATCHER__FAILPOINTS": '["raise:before-create"]'}
    )
    wait_until(lambda: len(reasons(state_dir)) == 2, timeout=90)
    assert reasons(state_dir) == ["InternalError", "InternalError"]
    detail = dead_letters(state_dir, "work")[0][1]["x-jobrunner-detail"]
    assert "InjectedFault" in detail
    assert "after 3 tries" in detail
    assert settled(state_dir, "work")
    assert starts(tmp_path) == []
    assert proc.poll() is None, "the dispatcher must go on"
    logs = dispatchers.logs()
    assert logs.count("unforeseen error processing the message (try 1 of 3)") == 2
    assert "released the message to the source to be tried again" in logs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


SHOW_ARGS = """
import os, sys
with open(os.environ["RUNS_FILE"], "a") as out:
    out.write(repr(sys.argv[1:]) + "\\n")
"""


def test_message_text_reaches_the_process_byte_exact_and_the_templates_variables_expand(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(
        SHOW_ARGS,
        container={
            "env": [{"name": "DB_PASSWORD", "value": "hunter2"}],
            "args": ["{{ message.json.cmd }}", "--password=$(DB_PASSWORD)"],
        },
    )
    text = "echo $(DB_PASSWORD) $$ $(HOME) $"
    publish(path, state_dir, {"cmd": text})
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    seen = (tmp_path / "runs.txt").read_text().strip()
    assert seen == repr([text, "--password=hunter2"])


def test_a_job_removed_by_ttl_before_its_message_was_settled_is_adopted_not_run_again(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(RECORDING_JOB, job_spec={"ttlSecondsAfterFinished": 0})
    publish_with_id(path, state_dir, "ttl-1", {"id": "ttl", "seconds": 0.2})
    first = dispatchers.start_with(path, {"JOBRUNNER_DISPATCHER__FAILPOINTS": '["before-settle"]'})
    assert first.wait(timeout=60) == -signal.SIGKILL
    jobs = state_dir / "jobs" / "default"
    [jobdir] = list(jobs.iterdir())
    # The TTL is past, but the finalizer holds the Job until its message is settled.
    job = json.loads((jobdir / "job.json").read_text())
    assert job["metadata"]["finalizers"] == ["jobrunner.dev/settlement"]
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    wait_until(lambda: not any(jobs.iterdir()), timeout=30)
    assert starts(tmp_path) == ["ttl"], "the message ran twice"
    assert reasons(state_dir) == []


def test_finalizers_can_be_listed_and_released_by_hand(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = manifest(RECORDING_JOB)
    publish(path, state_dir, {"id": "stuck", "seconds": 30})
    proc = dispatchers.start(path)
    wait_until(lambda: starts(tmp_path) == ["stuck"], timeout=60)
    proc.send_signal(signal.SIGKILL)  # jobrunner is gone: nothing will release the Job
    proc.wait(timeout=10)
    base = ["finalizers", "--local", "--state-dir", str(state_dir), "-f", str(path)]
    assert main([*base[:1], "list", *base[1:]]) == 0
    out = capsys.readouterr()
    header, row = out.out.splitlines()[-2:]  # after publish's line
    assert header.split() == ["NAMESPACE", "NAME", "SCALEDJOB", "STATE", "MESSAGE"]
    assert row.split()[:4] == ["default", row.split()[1], "work", "Running"]
    assert row.split()[1].startswith("work-")
    assert "1 Job(s) carry the finalizer jobrunner.dev/settlement" in out.err
    assert main([*base[:1], "list", *base[1:], "-o", "json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["namespace"], listed["name"]) == ("default", row.split()[1])
    assert (listed["scaledjob"], listed["state"]) == ("work", "Running")
    assert main([*base[:1], "release", *base[1:]]) == 2  # asks first
    assert "--yes" in capsys.readouterr().err
    assert main([*base[:1], "release", *base[1:], "--yes"]) == 0
    assert "released 1 Job(s)" in capsys.readouterr().err
    assert main([*base[:1], "list", *base[1:]]) == 0
    assert "0 Job(s) carry" in capsys.readouterr().err
    assert main([*base[:1], "list", *base[1:], "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == []
