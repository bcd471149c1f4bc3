"""The CLI against the real stack: ``validate --server-dry-run``, the operator's
``status`` and ``jobs`` views, and ``make demo-cluster``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobrunner.cli import main
from tests.helpers import eventually
from tests.integration.harness import ROOT, publish, write_manifest

pytestmark = [pytest.mark.kube]


def test_server_dry_run_accepts_a_valid_job(
    kubeconfig: Path, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_manifest(
        tmp_path / "m.yaml", name="work", namespace=namespace, queue="q", url="amqp://127.0.0.1/"
    )
    code = main(
        [
            "--kubeconfig",
            str(kubeconfig),
            "validate",
            "-f",
            str(path),
            "--server-dry-run",
            "--sample-message",
            '{"task": "x"}',
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "the API server accepts the Job" in capsys.readouterr().out


def test_server_dry_run_reports_the_servers_rejection(
    kubeconfig: Path, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_spec = {"template": {"spec": {"containers": [{"name": "Bad_Name", "image": "busybox"}]}}}
    path = write_manifest(
        tmp_path / "m.yaml",
        name="work",
        namespace=namespace,
        queue="q",
        url="amqp://127.0.0.1/",
        job_spec=job_spec,
    )
    code = main(["--kubeconfig", str(kubeconfig), "validate", "-f", str(path), "--server-dry-run"])
    assert code == 2  # the manifest's mistake, found by the API server
    out, err = capsys.readouterr()
    assert "422" in err
    assert "Bad_Name" in err
    assert "valid" not in out  # a script reading stdout must not read "valid"


def test_server_dry_run_without_a_sample_that_renders_is_refused_and_not_called_valid(
    kubeconfig: Path, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reads_task = [{"name": "work", "image": "busybox", "args": ["{{ message.json.task }}"]}]
    path = write_manifest(
        tmp_path / "m.yaml",
        name="work",
        namespace=namespace,
        queue="q",
        url="amqp://127.0.0.1/",
        job_spec={"template": {"spec": {"containers": reads_task}}},
    )
    code = main(["--kubeconfig", str(kubeconfig), "validate", "-f", str(path), "--server-dry-run"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "pass --sample-message" in err
    assert "valid" not in out


@pytest.mark.rabbitmq
async def test_status_jobs_and_logs_show_the_cluster_as_the_dispatcher_works(
    kubeconfig: Path,
    namespace: str,
    rabbitmq_url: str,
    queue: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(manifest(maxReplicaCount=2))
    for i, body in enumerate(
        [{"seconds": 5}, {"seconds": 5}, {"seconds": 1, "fail": "failed"}], start=1
    ):
        await publish(rabbitmq_url, queue, json.dumps(body).encode(), message_id=f"op-{i}")
    dispatchers(Path(path))
    base = ["--kubeconfig", str(kubeconfig)]

    async def view(command: str, *more: str) -> str:
        # In a thread: the CLI runs its own event loop.
        code = await asyncio.to_thread(main, [*base, command, "-f", path, *more])
        assert code == 0
        return capsys.readouterr().out

    async def two_running() -> str | None:
        (status,) = json.loads(await view("status", "-o", "json"))
        running = [j for j in status["inFlight"] if j["state"] == "running"]
        return "yes" if len(running) == 2 else None

    await eventually(two_running, within=30)
    out = await view("status")
    assert "in flight 2/2" in out
    assert "on the cluster" in out
    assert "op-1" in out
    assert "op-2" in out

    async def all_finished() -> list[dict[str, Any]] | None:
        jobs: list[dict[str, Any]] = json.loads(await view("jobs", "-o", "json"))
        return jobs if len(jobs) == 3 and any(j["deadLettered"] for j in jobs) else None

    jobs = await eventually(all_finished, within=60)
    assert sorted(j["state"] for j in jobs) == ["failed", "succeeded", "succeeded"]
    out = await view("jobs")
    assert re.search(r"op-3 +failed +BackoffLimitExceeded +yes", out), out

    # The failed Job's pod, its exit code and reason as the (KWOK) node reported them.
    (failed,) = [j for j in jobs if j["state"] == "failed"]
    code = await asyncio.to_thread(main, [*base, "logs", failed["job"], "-n", namespace])
    assert code == 0
    out = capsys.readouterr().out
    assert re.search(r"==> attempt 1 \(pod .+\), container work: exit 1 \(Error\) <==", out), out
    assert "==> Job failed: BackoffLimitExceeded" in out


def test_logs_of_a_job_the_cluster_does_not_have_exits_2_and_says_how_to_list_them(
    kubeconfig: Path, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--kubeconfig", str(kubeconfig), "logs", "no-such-job", "-n", namespace])
    err = capsys.readouterr().err
    assert code == 2, err  # a name that is not there: a mistake in what was given
    assert f"error: no Job {namespace}/no-such-job on the cluster" in err
    assert "lists them" in err


def test_make_demo_cluster_runs_on_the_stack(kubeconfig: Path, rabbitmq_url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/local/demo.py"), "--cluster"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6/6" in result.stdout
    assert "demo: every message ended as expected" in result.stdout
