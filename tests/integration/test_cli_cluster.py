"""``jobrunner validate --server-dry-run`` asks the real API server."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner.cli import main
from tests.integration.harness import write_manifest

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
    assert code == 1
    err = capsys.readouterr().err
    assert "422" in err
    assert "Bad_Name" in err
