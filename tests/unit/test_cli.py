from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobrunner import __version__
from jobrunner.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy/examples/scaledjob-rabbitmq.yaml"


def test_version_flag_prints_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_render_prints_the_job_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"task": "thumbnail", "seconds": 3}))
    code = main(
        [
            "render",
            "-f",
            str(EXAMPLE),
            "--message",
            f"@{body}",
            "--message-id",
            "m-42",
            "--header",
            "tenant=acme",
        ]
    )
    assert code == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "Job"
    assert job["metadata"]["annotations"]["jobrunner.dev/message-id"] == "m-42"
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TASK"] == "thumbnail"
    assert json.loads(env["JOBRUNNER_MESSAGE_HEADERS"]) == {"tenant": "acme"}
    pod_annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["kwok.jobrunner.dev/run-duration"] == "3s"


def test_render_explains_a_message_the_template_cannot_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["render", "-f", str(EXAMPLE), "--message", "plain text"]) == 1
    assert "InvalidMessage" in capsys.readouterr().err


def test_validate_reports_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("maxReplicaCount: 10", "maxReplicaCount: -1"))
    assert main(["validate", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "spec.maxReplicaCount" in err


def test_validate_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(EXAMPLE)]) == 0
    assert "valid" in capsys.readouterr().out


def test_missing_template_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(EXAMPLE.read_text().replace("echo-job.yaml", "nope.yaml"))
    assert main(["validate", "-f", str(path)]) == 2
    assert "spec.jobTemplate: file not found" in capsys.readouterr().err


def test_run_with_an_invalid_manifest_fails_at_start_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        EXAMPLE.read_text().replace("ackPolicy: onJobCompletion", "ackPolicy: sometimes")
    )
    assert main(["run", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert "spec.ackPolicy" in err
