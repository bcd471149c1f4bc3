"""The commands a newcomer and an operator type, and what they print, with no cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner.cli import main
from jobrunner.local.jobdir import JobDir
from tests.helpers import wait_until
from tests.local.conftest import ROOT, Dispatchers, ManifestFactory

JOB = (
    "import json, os, sys, time; m = json.loads(os.environ['JOBRUNNER_MESSAGE']);"
    "print('working on', m['id']); time.sleep(m.get('seconds', 0)); sys.exit(m.get('exit', 0))"
)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_jobs_and_logs_show_a_batch_from_start_to_end(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(manifest(JOB, max_replicas=2))
    local = ["--local", "--state-dir", str(state_dir)]
    messages = ['{"id": "slow-1", "seconds": 4}', '{"id": "slow-2", "seconds": 4}']
    code, out, _ = cli(capsys, "publish", "-f", path, "--state-dir", str(state_dir), *messages)
    assert code == 0
    assert "published 2 message(s) to queue work" in out
    code, out, _ = cli(
        capsys, "publish", "-f", path, "--state-dir", str(state_dir), '{"id": "bad", "exit": 2}'
    )
    assert code == 0

    code, out, _ = cli(capsys, "status", "-f", path, *local)
    assert code == 0
    assert "queue work: 3 waiting, 0 in hand, 0 dead-lettered" in out
    assert "no Job in flight" in out

    dispatchers.start(Path(path))

    def two_running() -> str | None:
        _, text, _ = cli(capsys, "status", "-f", path, *local)
        return text if text.count("running") == 2 else None

    out = wait_until(two_running, timeout=20)
    assert "in flight 2/2" in out
    assert "1 waiting, 2 in hand" in out

    def all_finished() -> str | None:
        _, text, _ = cli(capsys, "jobs", "-f", path, *local)
        return text if text.count("work-") == 3 and "dead-lettered" in text else None

    out = wait_until(all_finished, timeout=30)
    assert out.count("succeeded") == 2
    assert "failed (dead-lettered)" in out
    assert "BackoffLimitExceeded" in out

    job = next(p.name for p in (state_dir / "jobs" / "default").iterdir())
    code, out, _ = cli(capsys, "logs", job, *local)
    assert code == 0
    assert "==> attempt 1, container main <==" in out
    assert "working on" in out


def test_a_typo_in_a_manifest_names_file_line_field_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "deploy/examples/scaledjob-local.yaml")
        .read_text()
        .replace("maxReplicaCount:", "maxReplicaCont:")
    )
    code, _, err = cli(capsys, "validate", "-f", str(bad))
    assert code == 2
    assert str(bad) in err
    line = next(
        i for i, text in enumerate(bad.read_text().splitlines(), 1) if "maxReplicaCont" in text
    )
    assert (
        f"line {line}, field spec.maxReplicaCont: unknown field; did you mean 'maxReplicaCount'?"
        in err
    )


def test_an_unknown_trigger_type_lists_the_supported_ones(
    manifest: ManifestFactory, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest(JOB, spec={"triggers": [{"type": "redis", "metadata": {"listName": "x"}}]})
    code, _, err = cli(capsys, "run", "--local", "--state-dir", str(state_dir), "-f", str(path))
    assert code == 2
    assert "field spec.triggers[0].type: 'redis' is not supported" in err
    assert (
        "use one of apache-kafka, aws-sqs-queue, kafka, mqtt, nats-jetstream, rabbitmq, "
        "redis-streams, sqlite" in err
    )


def test_publish_to_a_broker_trigger_says_to_use_the_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    example = str(ROOT / "deploy/examples/scaledjob-rabbitmq.yaml")
    code, _, err = cli(capsys, "publish", "-f", example, "--state-dir", str(tmp_path), "{}")
    assert code == 2
    assert "reads from a rabbitmq trigger" in err
    assert "broker's own tools" in err


def test_run_without_a_cluster_suggests_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    example = str(ROOT / "deploy/examples/scaledjob-local.yaml")
    code, _, err = cli(capsys, "status", "-f", example)
    assert code == 1
    assert "no Kubernetes configuration" in err
    assert "add --local" in err


def test_logs_of_an_unknown_job_says_how_to_list_them(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "logs", "nope", "--local", "--state-dir", str(state_dir))
    assert code == 1
    assert "jobrunner jobs --local" in err


def test_make_demo_runs_the_batch_and_prints_the_summary(tmp_path: Path) -> None:
    """`make demo` is the README's first command: no cluster, no broker, exit 0."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "160"}
    # The demo dumps its threads and exits by itself if it hangs (after 120 s).
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/local/demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "11/11" in out, out
    assert "what became of each message" in out, out
    assert out.count("succeeded") == 8, out
    assert "dead-lettered (BackoffLimitExceeded)" in out, out
    assert "dead-lettered (DeadlineExceeded)" in out, out
    assert "dead-lettered (InvalidMessage)" in out, out
    assert "demo: every message ended as expected" in out, out
    # The demo leaves its state for a look around, and no Job process behind.
    (state,) = tmp_path.glob("jobrunner-demo-*")
    jobs = [JobDir(p) for p in (state / "jobs" / "default").iterdir()]
    assert len(jobs) == 10
    assert not any(job.supervised() for job in jobs)


def test_status_watch_keeps_printing_fresh_views_when_piped(
    manifest: ManifestFactory, state_dir: Path
) -> None:
    path = str(manifest(JOB))
    assert main(["publish", "-f", path, "--state-dir", str(state_dir), '{"id": "w"}']) == 0
    command = [sys.executable, "-m", "jobrunner.cli", "status", "--watch", "--interval", "0.3"]
    watcher = subprocess.Popen(
        [*command, "--local", "--state-dir", str(state_dir), "-f", path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        lines = []
        while sum("queue work:" in line for line in lines) < 3:
            line = watcher.stdout.readline()
            assert line, "the watch ended"
            lines.append(line)
    finally:
        watcher.kill()
        watcher.wait()
    assert sum(line.startswith("-- ") for line in lines) >= 3
    assert "queue work: 1 waiting, 0 in hand, 0 dead-lettered" in "".join(lines)
