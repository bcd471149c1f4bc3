"""Fixtures for the embedded mode: a state directory whose Jobs (processes) are stopped
and removed after each test, manifests built from a few lines of Python per Job, and
dispatcher processes that are always killed at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.local.client import LocalJobClient

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "local" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.local)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    state.mkdir()
    yield state
    # Jobs outlive dispatchers by design; a test must not leave its processes behind.
    client = LocalJobClient(state, controller=False)
    jobs = state / "jobs"

    async def delete_all() -> None:
        for namespace in jobs.iterdir() if jobs.is_dir() else []:
            for job in namespace.iterdir():
                # Deletion waits on jobrunner's finalizer; release it so processes end.
                await client.delete_job(namespace.name, job.name)
                await client.release_job(namespace.name, job.name, {})

    asyncio.run(delete_all())


ManifestFactory = Callable[..., Path]


@pytest.fixture
def manifest(tmp_path: Path) -> ManifestFactory:
    """A ScaledJob whose one container runs ``script`` with python3; the message is in
    JOBRUNNER_MESSAGE (or the file JOBRUNNER_MESSAGE_FILE), and RUNS_FILE names a file
    the script may append to."""

    def build(
        script: str,
        *,
        name: str = "work",
        max_replicas: int = 3,
        backoff_limit: int = 0,
        deadline: int | None = None,
        delivery: dict[str, Any] | None = None,
        job_spec: dict[str, Any] | None = None,
        container: dict[str, Any] | None = None,
        spec: dict[str, Any] | None = None,
    ) -> Path:
        job: dict[str, Any] = {
            "backoffLimit": backoff_limit,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.12-slim",
                            "command": ["python3", "-c", script],
                            **(container or {}),
                            "env": [
                                {"name": "RUNS_FILE", "value": str(tmp_path / "runs.txt")},
                                *(container or {}).get("env", []),
                            ],
                        }
                    ]
                }
            },
            **(job_spec or {}),
        }
        if deadline is not None:
            job["activeDeadlineSeconds"] = deadline
        doc = {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": name},
            "spec": {
                "maxReplicaCount": max_replicas,
                "triggers": [{"type": "sqlite", "metadata": {"queueName": name}}],
                "jobTargetRef": job,
                **({"messageDelivery": delivery} if delivery else {}),
                **(spec or {}),
            },
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return build


class Dispatchers:
    """`jobrunner run --local` processes, started as a user would start them."""

    def __init__(self, state: Path, log_dir: Path) -> None:
        self.state = state
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, manifest: Path) -> subprocess.Popen[bytes]:
        return self.start_with(manifest, {})

    def start_extra(self, manifest: Path, arguments: list[str]) -> subprocess.Popen[bytes]:
        """A dispatcher with more command-line arguments."""
        return self.start_with(manifest, {}, arguments)

    def start_with(
        self, manifest: Path, extra_env: dict[str, str], arguments: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "JOBRUNNER_LOCAL__RETRY_SECONDS": "0.2",
            "JOBRUNNER_LOG_LEVEL": "DEBUG",
            "JOBRUNNER_DISPATCHER__PROGRESS_LOG_SECONDS": "0.5",
            **extra_env,
        }
        log = (self.log_dir / f"dispatcher-{len(self.started)}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobrunner.cli",
                "run",
                "--local",
                "--state-dir",
                str(self.state),
                "-f",
                str(manifest),
                *(arguments or []),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.started.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob("dispatcher-*.log")))


@pytest.fixture
def dispatchers(state_dir: Path, tmp_path: Path) -> Iterator[Dispatchers]:
    d = Dispatchers(state_dir, tmp_path)
    yield d
    for proc in d.started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    # Shown by pytest only when the test failed ("Captured stdout teardown"): the
    # dispatchers' own words are what explains a failure seen once, under load.
    for log in sorted(tmp_path.glob("dispatcher-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        print(f"==> {log.name} (last 80 of {len(lines)} lines) <==", *lines[-80:], sep="\n")


@pytest.fixture
def filled(state_dir: Path, manifest: ManifestFactory) -> tuple[Path, str]:
    """A state directory with one finished Job and one dead letter (reason
    BackoffLimitExceeded) of the ScaledJob ``work``: (manifest, Job name)."""
    from jobrunner.core.deadletters import DETAIL, REASON
    from jobrunner.sources.sqlite import SQLiteQueue
    from tests.local.test_local_executor import finished, render

    path = manifest("print('done')")
    job, secret = render(path, b"{}")
    client = LocalJobClient(state_dir, retry_seconds=0.1)

    async def fill() -> None:
        await client.create_job(job, secret)
        await finished(client, job, within=60)
        queue = await SQLiteQueue.open(state_dir / "queue.db")
        try:
            await queue.publish(
                "work.dead-letter",
                [b'{"image": "corrupt.png"}'],
                headers={REASON: "BackoffLimitExceeded", DETAIL: "exit 1"},
            )
        finally:
            await queue.close()

    asyncio.run(fill())
    return path, str(job["metadata"]["name"])
