"""The local executor against the Job controller: what a Job's fields mean on a cluster
they mean here, or the Job is refused before it runs, naming the field (never a Job that
quietly runs something else). And every path a Job is handed is absolute, whatever the
state directory and the container's ``workingDir``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from jobrunner.local.client import LocalJobClient
from jobrunner.tracker import outcome_of
from tests.local.conftest import ManifestFactory
from tests.local.test_local_executor import finished, logs, render

SHOW_PATHS = (
    "import json, os; keys = ['JOBRUNNER_MESSAGE_FILE', 'JOBRUNNER_LOCAL_JOB_DIR', 'DATA'];"
    "print(json.dumps({k: os.environ[k] for k in keys} | {'cwd': os.getcwd(),"
    " 'message': open(os.environ['JOBRUNNER_MESSAGE_FILE']).read()}))"
)


async def test_every_path_a_job_is_handed_is_absolute_with_a_relative_state_dir(
    tmp_path: Path, manifest: ManifestFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default state directory is relative (.jobrunner) and a container may set its
    # own workingDir: a relative path handed to it would point into that directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    path = manifest(
        SHOW_PATHS,
        delivery={"mode": "file"},
        container={
            "workingDir": str(elsewhere),
            "volumeMounts": [{"name": "scratch", "mountPath": "/data"}],
            "env": [{"name": "DATA", "value": "/data/out"}],
        },
    )
    job, secret = render(path, b'{"n": 1}')
    job["spec"]["template"]["spec"].setdefault("volumes", []).append(
        {"name": "scratch", "emptyDir": {}}
    )
    client = LocalJobClient(Path(".jobrunner"), retry_seconds=0.1)
    try:
        await client.create_job(job, secret)
        done = await finished(client, job)
        shown = logs(tmp_path / ".jobrunner", job)
        assert outcome_of(done).succeeded, shown  # type: ignore[union-attr]
        seen: dict[str, Any] = json.loads(shown["1-main.log"])
        assert seen.pop("message") == '{"n": 1}'
        assert seen.pop("cwd") == str(elsewhere)
        for key, value in seen.items():
            assert os.path.isabs(value), (key, value)
            assert value.startswith(str(tmp_path / ".jobrunner" / "jobs")), (key, value)
    finally:
        await client.delete_job("default", job["metadata"]["name"])
        await client.release_job("default", job["metadata"]["name"], {})
