from __future__ import annotations

import json
import shlex
import subprocess
import sys
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
    assert main(["render", "-f", str(EXAMPLE), "--message", "plain text"]) == 2
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


def test_render_json_is_an_appliable_list_and_yaml_shows_the_secrets_owner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = tmp_path / "big.json"
    body.write_text(json.dumps({"task": "x", "pad": "a" * 40_000}))  # over maxEnvBytes: a file
    assert main(["render", "-f", str(EXAMPLE), "--message", f"@{body}", "-o", "json"]) == 0
    out = capsys.readouterr()
    listed = json.loads(out.out)
    assert listed["apiVersion"] == "v1"
    assert listed["kind"] == "List"
    secret, job = listed["items"]
    assert (secret["kind"], job["kind"]) == ("Secret", "Job")
    assert "ownerReferences" not in secret["metadata"]  # no uid yet: it would not apply
    assert f"Job {job['metadata']['name']} own Secret" in out.err

    assert main(["render", "-f", str(EXAMPLE), "--message", f"@{body}"]) == 0
    text = capsys.readouterr().out
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["Secret", "Job"]
    comment = "\n".join(line[4:] for line in text.splitlines() if line.startswith("#   "))
    (owner,) = yaml.safe_load(comment)["metadata"]["ownerReferences"]
    assert owner["kind"] == "Job"
    assert owner["name"] == job["metadata"]["name"]
    assert owner["blockOwnerDeletion"] is False


def test_global_options_work_before_and_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = ROOT / "deploy/examples/scaledjob-local.yaml"
    for args in (
        ["-n", "team-a", "render", "-f", str(local), "--message", '{"image": "a"}'],
        ["render", "-f", str(local), "--message", '{"image": "a"}', "--namespace", "team-a"],
    ):
        assert main(args) == 0
        assert yaml.safe_load(capsys.readouterr().out)["metadata"]["namespace"] == "team-a"


def test_every_option_of_every_command_is_documented_with_examples() -> None:
    import argparse

    from jobrunner.cli.parser import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in COMMANDS:
        p = sub.choices[command.name]
        assert command.summary
        assert command.description
        assert command.examples
        text = p.format_help()
        assert "examples:" in text
        for action in p._actions:
            assert action.help, (command.name, action.dest)
            assert action.help != argparse.SUPPRESS, (command.name, action.dest)
        # Every example parses (as the shell would split it, up to a pipe).
        for _, line in command.examples:
            words = shlex.split(line)
            words = words[1 : words.index("|")] if "|" in words else words[1:]
            args = parser.parse_args(words)
            assert args.command == command.name


def test_help_and_version_import_no_heavy_library() -> None:
    program = (
        "import sys\n"
        "from jobrunner.cli import main\n"
        "for args in (['--version'], ['--help'], ['jobs', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = {'pydantic', 'yaml', 'rich', 'kubernetes', 'jinja2', 'aiosqlite', 'aio_pika',\n"
        "         'aiokafka', 'opentelemetry'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
