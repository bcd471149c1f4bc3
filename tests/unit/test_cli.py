from __future__ import annotations

import argparse
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


# ------------------------------------------------------- options before or after the command
def _sample(action: argparse.Action) -> list[str]:
    """A value the option takes, as words."""
    from jobrunner.cli import parser as grammar

    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    if action.type in (grammar.positive_int, grammar.interval_seconds):
        return ["2"]
    return ["value-1"]


REQUIRED = {
    "run": ["-f", "m.yaml"],
    "publish": ["-f", "m.yaml"],
    "render": ["-f", "m.yaml", "--message", "{}"],
    "validate": ["-f", "m.yaml"],
    "status": ["-f", "m.yaml"],
    "jobs": ["-f", "m.yaml"],
    "logs": ["job-1"],
    "dead-letters": ["-f", "m.yaml"],
    "functions": ["import", "app"],
    "finalizers": ["list"],
    "operator": [],
    "completion": ["bash"],
}


def test_every_option_of_every_command_means_the_same_before_the_command() -> None:
    from jobrunner.cli.parser import COMMANDS, build_parser

    parser = build_parser()
    commands = {c.name: c for c in COMMANDS}
    assert set(REQUIRED) == set(commands), "a new command needs its required arguments here"
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            required = REQUIRED[name]
            for flag in action.option_strings:
                if flag in required:  # a required option: it moves, with its value
                    at = required.index(flag)
                    required = required[:at] + required[at + 2 :]
            for option in action.option_strings:
                words = [option, *_sample(action)]
                after = parser.parse_args([name, *required, *words])
                before = parser.parse_args([*words, name, *required])
                assert vars(before) == vars(after), f"{name} {option}"
                checked += 1
    assert checked > 80


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--local", "render", "-f", "m.yaml", "--message", "{}"], "render takes no --local"),
        (["render", "-f", "m.yaml", "--message", "{}", "--local"], "render takes no --local"),
        (["--watch-namespace", "a", "status", "-f", "m.yaml"], "status takes no --watch-namespace"),
    ],
)
def test_an_option_the_command_does_not_take_names_the_commands_that_do(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobrunner.cli.parser import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert says in err
    assert "it is an option of" in err


def test_an_unknown_option_of_a_command_points_at_that_commands_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """i21, N6: it pointed at the top-level help, where the command's options are not."""
    from jobrunner.cli.parser import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["jobs", "-f", "m.yaml", "--bogus"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: unrecognized arguments: --bogus",
        "See 'jobrunner jobs --help' for usage and examples.",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "m.yaml", "--local"],
        ["--local", "status", "m.yaml"],
        ["publish", "m.yaml", "{}"],
    ],
)
def test_a_manifest_given_without_f_is_said_to_be_given_as_f(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """i21, N21: it said only that -f/--file is required."""
    from jobrunner.cli.parser import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    command = next(w for w in argv if not w.startswith("-"))
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: {command} takes the manifest as -f FILE; give it as -f m.yaml"
    )


def test_an_options_value_that_is_a_command_name_is_the_value() -> None:
    from jobrunner.cli.parser import build_parser

    args = build_parser().parse_args(["--state-dir", "run", "publish", "-f", "m.yaml", "{}"])
    assert (args.command, args.state_dir, args.messages) == ("publish", "run", ["{}"])
    args = build_parser().parse_args(["--replay", "dead-letters", "-f", "m.yaml"])
    assert (args.command, args.replay) == ("dead-letters", [])


# ------------------------------------------------------- logs -f is --follow
def test_logs_f_follows_and_a_file_after_it_names_the_manifest_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from jobrunner.cli.parser import build_parser

    args = build_parser().parse_args(["logs", "--local", "-f", "job-1"])
    assert (args.follow, args.job, args.file) == (True, "job-1", None)
    args = build_parser().parse_args(["logs", "--file", "m.yaml", "job-1"])
    assert (args.follow, args.file) == (False, "m.yaml")
    for argv in (["logs", "--local", "-f", "m.yaml", "job-1"], ["-f", "m.yaml", "logs", "j"]):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "logs -f means --follow" in err, err
        assert "--file m.yaml" in err


def test_logs_file_looks_in_the_manifests_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local_example = ROOT / "deploy/examples/scaledjob-local.yaml"
    text = local_example.read_text().replace(
        "  name: thumbnails\n", "  name: thumbnails\n  namespace: media\n"
    )
    assert "namespace: media" in text
    manifest = tmp_path / "m.yaml"
    manifest.write_text(text)
    state = ["--local", "--state-dir", str(tmp_path / "state")]
    assert main(["logs", *state, "--file", str(manifest), "job-1"]) == 2
    assert "no local Job media/job-1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "says", "never"),
    [
        (
            '[\n  {"image": "a.png"},\n  {"image": "b.png"}\n]\n',
            ["one JSON array (2 item(s)) over 4 lines", "('[', ']' …)", "jq -c '.[]' f.json"],
            ["jq -c . "],
        ),
        (
            '{"image": "a.png",\n "seconds": 1}\n',
            [
                "one JSON object over 2 lines",
                """('{"image": "a.png",', '"seconds": 1}' …)""",
                "one message with @f.json",
                "jq -c . f.json",
            ],
            ["'['", "jq -c '.[]'"],
        ),
    ],
    ids=["array", "object"],
)
def test_jsonl_of_one_pretty_printed_document_is_explained_from_what_the_file_is(
    text: str, says: list[str], never: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobrunner.cli.errors import CliError
    from jobrunner.cli.inputs import read_lines

    monkeypatch.chdir(tmp_path)
    Path("f.json").write_text(text)
    with pytest.raises(CliError) as refused:
        read_lines("f.json")
    message = str(refused.value)
    assert [s for s in says if s not in message] == [], message
    assert [n for n in never if n in message] == [], message
