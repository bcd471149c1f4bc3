"""A finished Job's result (JobResult): read the same way from a cluster's pod and from
the local executor's record, with the kubelet's 4 KiB termination message."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from jobrunner.core.models import TERMINATION_MESSAGE_LIMIT, JobResult, Outcome
from jobrunner.core.protocols import ReadsResults
from jobrunner.local.client import LocalJobClient
from jobrunner.tracking.results import ended_in_pod, result_of


def _job(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "work-1", "namespace": "default"},
        "spec": {"template": {"spec": {"containers": [{"name": "main"}, {"name": "side"}]}}},
        "status": status,
    }


def test_an_unfinished_job_has_no_result() -> None:
    assert result_of(_job(active=1)) is None


def test_a_failed_job_speaks_for_its_failed_container_with_its_termination_message() -> None:
    job = _job(
        startTime="2026-12-07T10:00:00Z",
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "lastTransitionTime": "2026-12-07T10:00:07Z",
            }
        ],
    )
    pod = {
        "spec": job["spec"]["template"]["spec"],
        "status": {
            "containerStatuses": [
                {"name": "side", "state": {"terminated": {"exitCode": 0, "message": "ok"}}},
                {"name": "main", "state": {"terminated": {"exitCode": 3, "message": "x" * 5000}}},
            ]
        },
    }
    result = result_of(job, ended_in_pod(pod))
    assert result is not None
    assert (result.outcome, result.reason, result.exit_code) == (
        Outcome.FAILED,
        "BackoffLimitExceeded",
        3,
    )
    assert result.container == "main"
    assert result.duration_seconds == 7.0
    assert len(result.payload.encode()) == TERMINATION_MESSAGE_LIMIT


def test_both_clients_read_results() -> None:
    assert issubclass(LocalJobClient, ReadsResults)
    from jobrunner.kube.client import KubeJobClient

    assert issubclass(KubeJobClient, ReadsResults)


def _local_job(name: str, command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "busybox", "command": command, **container}
                    ],
                }
            },
        },
    }


async def _finished(jobs: LocalJobClient, name: str) -> JobResult:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        result = await jobs.job_result("default", name)
        if result is not None:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} did not finish within 30 s")


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        (
            {"env": [{"name": "RESULT", "value": "/dev/termination-log"}]},
            '{"answer": 42}',
        ),
        (
            {
                "terminationMessagePath": "/tmp/out/result",
                "env": [{"name": "RESULT", "value": "/tmp/out/result"}],
            },
            '{"answer": 42}',
        ),
    ],
)
async def test_the_local_executor_keeps_the_termination_message_as_the_kubelet_does(
    tmp_path: Path, container: dict[str, Any], expected: str
) -> None:
    jobs = LocalJobClient(tmp_path / "state", retry_seconds=0.1)
    try:
        job = _local_job("tm", ["sh", "-c", 'printf \'{"answer": 42}\' > "$RESULT"'], **container)
        await jobs.create_job(job, None)
        result = await _finished(jobs, "tm")
        assert result.succeeded, result
        assert (result.exit_code, result.payload, result.container) == (0, expected, "main")
        assert result.duration_seconds is not None
    finally:
        await jobs.delete_job("default", "tm")
        await jobs.close()


async def test_a_local_termination_message_is_cut_at_4096_bytes_and_falls_back_to_logs(
    tmp_path: Path,
) -> None:
    jobs = LocalJobClient(tmp_path / "state", retry_seconds=0.1)
    try:
        big = _local_job(
            "big",
            ["sh", "-c", 'head -c 6000 /dev/zero | tr "\\0" a > "$RESULT"'],
            env=[{"name": "RESULT", "value": "/dev/termination-log"}],
        )
        logs = _local_job(
            "logs",
            ["sh", "-c", "echo first; echo last words; exit 4"],
            terminationMessagePolicy="FallbackToLogsOnError",
        )
        await jobs.create_job(big, None)
        await jobs.create_job(logs, None)
        result = await _finished(jobs, "big")
        assert result.payload == "a" * TERMINATION_MESSAGE_LIMIT
        failed = await _finished(jobs, "logs")
        assert (failed.outcome, failed.exit_code) == (Outcome.FAILED, 4)
        assert failed.payload == "first\nlast words\n"
    finally:
        for name in ("big", "logs"):
            await jobs.delete_job("default", name)
        await jobs.close()
