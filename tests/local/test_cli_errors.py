"""No raw traceback from the command line, ever: each bad input a newcomer can give (a
setting, a path, a flag, a file) is one ``error:`` line naming it, and exit code 2. Run
as real processes, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.local.conftest import ROOT

EXAMPLE = str(ROOT / "deploy/examples/scaledjob-local.yaml")


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    says: list[str]
    """What the error line must contain (the input named, and what to do)."""
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def cases(tmp: Path) -> list[Case]:
    not_utf8 = tmp / "latin1.yaml"
    not_utf8.write_bytes("# caf\xe9\n".encode("latin-1") + Path(EXAMPLE).read_bytes())
    a_file = tmp / "a-file"
    a_file.write_text("not a directory")
    jinja = tmp / "jinja"
    jinja.mkdir()
    (jinja / "job.yaml").write_text(
        "template:\n  spec:\n    containers:\n    - name: w\n      image: busybox\n"
        '      command: ["echo", "{{ message.json.image "]\n'
    )
    (jinja / "m.yaml").write_text(
        "apiVersion: keda.sh/v1alpha1\nkind: ScaledJob\nmetadata: {name: t}\nspec:\n"
        "  jobTemplate: job.yaml\n  triggers:\n  - type: sqlite\n    metadata: {queueName: t}\n"
    )
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("apiVersion: v1\nkind: ScaledJob\nmetadata: {name: x\nspec: 1\n")
    local = ["--local", "--state-dir", str(tmp / "state")]
    return [
        Case(
            "manifest not YAML",
            ["validate", "-f", str(bad_yaml)],
            [f"{bad_yaml}: line 4, column 5: not valid YAML", "flow mapping at line 3"],
        ),
        Case(
            "manifest not UTF-8",
            ["validate", "-f", str(not_utf8)],
            [str(not_utf8), "line 1", "not UTF-8", "save the file as UTF-8"],
        ),
        Case("manifest missing", ["validate", "-f", str(tmp / "nope.yaml")], ["nope.yaml"]),
        Case(
            "namespace not a DNS-1123 label",
            ["-n", "Bad NS", "validate", "-f", EXAMPLE],
            ["argument -n/--namespace", "a DNS-1123 label", "'Bad NS'"],
        ),
        Case(
            "finalizers: -f and -A together",
            ["finalizers", "list", "-f", EXAMPLE, "-A", *local],
            ["-f and -A exclude each other"],
        ),
        Case(
            "operator namespace with capitals",
            ["operator", "--watch-namespace", "Media"],
            ["a namespace must be lowercase", "'Media'", "--watch-namespace"],
        ),
        Case(
            "functions import --embedded without --local",  # i21, N7: accepted silently
            [
                "functions",
                "import",
                str(ROOT / "examples/functions/python-app"),
                "--embedded",
                "-o",
                str(tmp / "out"),
            ],
            ["--embedded needs --local", "add --local"],
        ),
        Case("manifest a directory", ["validate", "-f", str(tmp)], ["is a directory"]),
        Case(
            "Jinja syntax error in a template file",
            ["validate", "-f", str(jinja / "m.yaml")],
            [str(jinja / "job.yaml"), "line 6", "template syntax error"],
        ),
        Case(
            "--state-dir is a file",
            ["jobs", "--local", "--state-dir", str(a_file), "-f", EXAMPLE],
            ["--state-dir", str(a_file), "is a file, not a directory"],
        ),
        Case(
            "--state-dir under a file",
            ["status", "--local", "--state-dir", str(a_file / "sub"), "-f", EXAMPLE],
            ["--state-dir", "is a file, not a directory"],
        ),
        Case(
            "state dir setting is a file",
            ["jobs", "--local", "-f", EXAMPLE],
            ["JOBRUNNER_LOCAL__STATE_DIR=", "is a file"],
            env={"JOBRUNNER_LOCAL__STATE_DIR": str(a_file)},
        ),
        Case(
            "executor misspelt",
            ["jobs", "-f", EXAMPLE],
            ["JOBRUNNER_EXECUTOR='lokal'", "'kubernetes' or 'local'", "fix it or unset it"],
            env={"JOBRUNNER_EXECUTOR": "lokal"},
        ),
        Case(
            "retry seconds not a number",
            ["jobs", *local, "-f", EXAMPLE],
            ["JOBRUNNER_LOCAL__RETRY_SECONDS='abc'", "valid number"],
            env={"JOBRUNNER_LOCAL__RETRY_SECONDS": "abc"},
        ),
        Case(
            "negative poll interval",
            ["run", *local, "-f", EXAMPLE],
            ["JOBRUNNER_LOCAL__POLL_INTERVAL_SECONDS='-1'", "greater than 0"],
            env={"JOBRUNNER_LOCAL__POLL_INTERVAL_SECONDS": "-1"},
        ),
        Case(
            "negative queue depth interval",
            ["status", *local, "-f", EXAMPLE],
            ["JOBRUNNER_TELEMETRY__QUEUE_DEPTH_INTERVAL_SECONDS='-5'", "greater than 0"],
            env={"JOBRUNNER_TELEMETRY__QUEUE_DEPTH_INTERVAL_SECONDS": "-5"},
        ),
        Case(
            "port out of range",
            ["run", *local, "-f", EXAMPLE],
            ["JOBRUNNER_TELEMETRY__HTTP_PORT='70000'"],
            env={"JOBRUNNER_TELEMETRY__HTTP_PORT": "70000"},
        ),
        Case(
            "log level unknown",
            ["run", *local, "-f", EXAMPLE],
            ["JOBRUNNER_LOG_LEVEL='loud'", "DEBUG, INFO"],
            env={"JOBRUNNER_LOG_LEVEL": "loud"},
        ),
        Case(
            "a list setting not JSON",
            ["jobs", *local, "-f", EXAMPLE],
            ["JOBRUNNER_DISPATCHER__FAILPOINTS='crash'", "JSON"],
            env={"JOBRUNNER_DISPATCHER__FAILPOINTS": "crash"},
        ),
        Case(
            "--kubeconfig missing, before the command",
            ["--kubeconfig", "/nonexistent", "status", "-f", EXAMPLE],
            ["--kubeconfig /nonexistent", "does not exist"],
        ),
        Case(
            "--kubeconfig missing, after the command",
            ["jobs", "-f", EXAMPLE, "--kubeconfig", "/nonexistent"],
            ["--kubeconfig /nonexistent", "does not exist"],
        ),
        Case(
            "KUBECONFIG missing",
            ["status", "-f", EXAMPLE],
            ["KUBECONFIG=/nonexistent"],
            env={"KUBECONFIG": "/nonexistent"},
        ),
        Case(
            "--limit zero",
            ["jobs", *local, "-f", EXAMPLE, "--limit", "0"],
            ["--limit", "1 or more"],
        ),
        Case(
            "--limit not a number",
            ["dead-letters", *local, "-f", EXAMPLE, "--limit", "x"],
            ["--limit", "whole number"],
        ),
        Case(
            "--interval zero",
            ["status", *local, "-f", EXAMPLE, "-w", "--interval", "0"],
            ["--interval", "at least 0.1"],
        ),
        Case(
            "--interval nan", ["status", *local, "-f", EXAMPLE, "--interval", "nan"], ["--interval"]
        ),
        Case(
            "--interval negative",
            ["status", *local, "-f", EXAMPLE, "--interval=-2"],
            ["--interval"],
        ),
        Case("unknown command", ["stauts"], ["unknown command 'stauts'", "did you mean 'status'"]),
        Case(
            "message file missing",
            ["publish", "-f", EXAMPLE, "--state-dir", str(tmp / "state"), "@missing.json"],
            ["@missing.json", "does not exist"],
        ),
        Case(
            "--jsonl missing",
            [
                "publish",
                "-f",
                EXAMPLE,
                "--state-dir",
                str(tmp / "state"),
                "--jsonl",
                "missing.jsonl",
            ],
            ["--jsonl missing.jsonl"],
        ),
        Case(
            "header without =",
            ["render", "-f", EXAMPLE, "--message", "{}", "--header", "x"],
            ["--header 'x'", "KEY=VALUE"],
        ),
        Case(
            "no such ScaledJob",
            ["jobs", *local, "-f", EXAMPLE, "--scaledjob", "nope"],
            ["no ScaledJob named 'nope'", "thumbnails"],
        ),
        Case(
            "-n against the manifest's namespace",
            [
                "render",
                "-f",
                str(ROOT / "deploy/examples/scaledjob-rabbitmq.yaml"),
                "-n",
                "other",
                "--message",
                "{}",
            ],
            ["namespace 'default'", "drop -n"],
        ),
        Case(
            "replay of an id that is not there",
            ["dead-letters", *local, "-f", EXAMPLE, "--replay", "99"],
            ["no dead letter with id 99", "nothing was replayed"],
        ),
    ]


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[[Case], subprocess.CompletedProcess[str]]:
    def run(case: Case) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
        env.pop("KUBECONFIG", None)
        env.update({"HOME": str(tmp_path), **case.env})
        return subprocess.run(
            [sys.executable, "-m", "jobrunner.cli", *case.args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )

    return run


def test_bad_inputs_are_one_clear_line_and_exit_2_never_a_traceback(
    tmp_path: Path, run_cli: Callable[[Case], subprocess.CompletedProcess[str]]
) -> None:
    problems = []
    for case in cases(tmp_path):
        result = run_cli(case)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        if (
            result.returncode != case.code
            or "Traceback" in result.stderr
            or len(errors) != 1
            or not all(text in errors[0] for text in case.says)
        ):
            problems.append(f"{case.name}: exit {result.returncode}\n{result.stderr}")
    assert not problems, "\n\n".join(problems)


def test_an_unforeseen_error_says_it_is_a_bug_and_debug_shows_the_traceback(
    tmp_path: Path,
) -> None:
    # A bug planted where `jobrunner jobs` calls it.
    program = (
        "import sys, jobrunner.views.queries as views\n"
        "def broken(settings): raise ZeroDivisionError('planted')\n"
        "views.where = broken\n"
        "import jobrunner.cli.observe as observe\n"
        "observe.where = broken\n"
        "from jobrunner.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["jobs", "--local", "--state-dir", str(tmp_path), "-f", EXAMPLE]
    result = subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: unexpected ZeroDivisionError: planted" in result.stderr
    assert "--debug" in result.stderr
    debug = subprocess.run(
        [sys.executable, "-c", program, *args, "--debug"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Traceback" in debug.stderr
    assert "ZeroDivisionError: planted" in debug.stderr


def test_bare_jobrunner_prints_help_and_exits_0(
    run_cli: Callable[[Case], subprocess.CompletedProcess[str]],
) -> None:
    result = run_cli(Case("bare", [], []))
    assert result.returncode == 0
    assert "Usage:" in result.stdout
    for command in (
        "run",
        "publish",
        "render",
        "validate",
        "status",
        "jobs",
        "logs",
        "dead-letters",
    ):
        assert f"\n  {command} " in result.stdout


CLOSED_PORT_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_an_unreachable_cluster_is_one_short_line_per_try(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(CLOSED_PORT_KUBECONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    base = [sys.executable, "-m", "jobrunner.cli", "--kubeconfig", str(kubeconfig)]
    status = subprocess.run(
        [*base, "status", "-f", EXAMPLE, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert status.returncode == 1
    assert status.stderr.splitlines() == [
        "error: API server 127.0.0.1:1 unreachable (connection refused); is the cluster up? "
        "(`make stack-up` starts the local one)"
    ]
    run = subprocess.Popen(
        [*base, "run", "-f", EXAMPLE, "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        lines: list[str] = []
        assert run.stdout is not None
        while sum("unreachable" in line for line in lines) < 3 and time.monotonic() < deadline:
            lines.append(run.stdout.readline())
    finally:
        run.terminate()
        rest, _ = run.communicate(timeout=30)
    lines += rest.splitlines()
    tries = [line for line in lines if "unreachable" in line]
    assert len(tries) >= 3, lines
    assert all(len(line) < 250 for line in tries), tries
    assert "API server 127.0.0.1:1 unreachable (connection refused)" in tries[0]
    assert not any("urllib3" in line or "Retrying" in line for line in lines), lines
    assert "Traceback" not in "".join(lines)
