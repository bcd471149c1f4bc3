"""Input that cannot work is refused up front, in one ``error:`` line that names it, with
exit 2: a state directory that cannot be written, a message ``publish`` can already tell
will fail, duplicate keys, a file of the wrong kinds. Run as real processes, as a user
runs them (issue 21, section 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import services
from tests.local.conftest import ROOT

EXAMPLE = str(ROOT / "deploy/examples/scaledjob-local.yaml")


def jobrunner(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOBRUNNER_")}
    clean.pop("KUBECONFIG", None)
    clean.update({"HOME": str(cwd), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=cwd,
        timeout=60,
        check=False,
        input=stdin,
    )


def one_error(result: subprocess.CompletedProcess[str], *says: str, code: int = 2) -> str:
    """The one ``error:`` line of a refused command, checked to say each of ``says``."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == code, result.stderr + result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1, result.stderr
    for text in says:
        assert text in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- the state directory
UNWRITABLE = [
    ("/sys/jobrunner-state", "cannot be created in /sys"),  # sysfs: root may not create
    ("/sys/kernel", "cannot write in it"),  # exists, read-only for everyone
]
STATE_COMMANDS = [
    ["run", "--local", "-f", EXAMPLE],
    ["publish", "-f", EXAMPLE, '{"image": "cat.png"}'],
    ["status", "--local", "-f", EXAMPLE],
    ["jobs", "--local", "-f", EXAMPLE],
    ["logs", "--local", "some-job"],
    ["dead-letters", "--local", "-f", EXAMPLE],
    ["finalizers", "list", "--local"],
]


@pytest.mark.parametrize(("state", "says"), UNWRITABLE)
def test_an_unwritable_state_dir_is_one_line_naming_it_for_every_command(
    tmp_path: Path, state: str, says: str
) -> None:
    if not Path(state).parent.is_dir():
        # sysfs is Linux's; CI runs on Linux, where this case must run, never skip.
        message = f"no {Path(state).parent} on this machine (sysfs: Linux only)"
        if services.in_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    with ThreadPoolExecutor(max_workers=4) as pool:  # see the exit-code walk below
        results = pool.map(
            lambda c: jobrunner(*c, "--state-dir", state, cwd=tmp_path), STATE_COMMANDS
        )
        for result in results:
            one_error(result, f"--state-dir {state}", says, "give a directory you can write")
    # The setting is named when it, not the flag, gave the directory.
    result = jobrunner(
        "run", "--local", "-f", EXAMPLE, cwd=tmp_path, env={"JOBRUNNER_LOCAL__STATE_DIR": state}
    )
    one_error(result, f"JOBRUNNER_LOCAL__STATE_DIR={state}", says)


def test_a_writable_state_dir_leaves_no_probe_behind(tmp_path: Path) -> None:
    result = jobrunner("jobs", "--local", "-f", EXAMPLE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    published = jobrunner("publish", "-f", EXAMPLE, '{"image": "cat.png"}', cwd=tmp_path)
    assert published.returncode == 0, published.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".jobrunner"]
    assert not list((tmp_path / ".jobrunner").glob(".jobrunner-probe-*"))


# ---------------------------------------------------------------- publish
def queued(state: Path) -> list[bytes]:
    """The bodies on the example's embedded queue, oldest first."""
    import sqlite3

    db = state / "queue.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [bytes(row[0]) for row in conn.execute("SELECT body FROM messages ORDER BY id")]


def test_publish_refuses_what_it_can_tell_would_fail_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / "order.json").write_text('{"image": "cat.png"}\n')
    (tmp_path / "array.json").write_text('[\n  {"image": "a.png"},\n  {"image": "b.png"}\n]\n')
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\nhello\n')
    big = '{"image": "' + "a" * 3_000_000 + '"}'
    (tmp_path / "big.json").write_text(big)
    (tmp_path / "good.jsonl").write_text('{"image": "a.png"}\n{"image": "b.png"}\n')
    refused = [
        (["order.json"], ["MESSAGE 'order.json'", "name of a file", "@order.json", "--force"]),
        (["--jsonl", "array.json"], ["--jsonl array.json", "one JSON array", "jq -c"]),
        (["--jsonl", "bad.jsonl"], ["--jsonl bad.jsonl line 2", "not JSON", "--force"]),
        (["@big.json"], ["MESSAGE '@big.json'", "MessageTooLarge", "maxMessageBytes", "--force"]),
        (["hello"], ["MESSAGE 'hello'", "InvalidMessage", "message.json", "--force"]),
        (['{"seconds": 1}'], ["TemplateError", "has no attribute 'image'", "--force"]),
        (
            ['{"image": "a.png"}', "hello"],
            ["MESSAGE 2 ('hello')", "InvalidMessage"],  # all or nothing: the first not sent
        ),
        (['{"image": "a.png"}', "--jsonl", "good.jsonl"], ["MESSAGE... or --jsonl", "not both"]),
    ]
    for args, says in refused:
        result = jobrunner("publish", "-f", EXAMPLE, *args, cwd=tmp_path)
        one_error(result, *says)
    assert queued(tmp_path / ".jobrunner") == []


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["publish", "-f", EXAMPLE], "MESSAGE"),
        (["render", "-f", EXAMPLE, "--message"], "--message"),
        (["validate", "-f", EXAMPLE, "--sample-message"], "--sample-message"),
        (["validate", "--local", "-f", EXAMPLE, "--sample-message"], "--sample-message"),
    ],
    ids=["publish", "render", "validate", "validate --local"],
)
def test_every_body_option_refuses_a_file_name_without_its_at(
    command: list[str], flag: str, tmp_path: Path
) -> None:
    """The ``@`` forgotten: ``order.json`` is a file here, so the user meant its content,
    whichever command takes the body (i21, F5: only ``publish`` said so)."""
    (tmp_path / "order.json").write_text('{"image": "cat.png"}\n')
    verb = "publish" if command[0] == "publish" else "render"
    one_error(
        jobrunner(*command, "order.json", cwd=tmp_path),
        f"{flag} 'order.json': is the name of a file here",
        f"write @order.json to {verb} the file's content",
        "--force",
    )
    done = jobrunner(*command, "@order.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "cat.png" in done.stdout or command[0] != "render"


def test_render_and_validate_force_take_a_file_name_as_the_text(tmp_path: Path) -> None:
    (tmp_path / "order.json").write_text('{"image": "cat.png"}\n')
    # A template that does not read message.json: the text itself is a body it takes.
    plain = tmp_path / "plain.yaml"
    plain.write_text(
        Path(EXAMPLE).read_text().replace("{{ message.json.image }}", "{{ message.body }}")
    )
    done = jobrunner("render", "-f", str(plain), "--message", "order.json", "--force", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "order.json" in done.stdout
    assert "cat.png" not in done.stdout
    done = jobrunner(
        "validate", "-f", str(plain), "--sample-message", "order.json", "--force", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr


def test_publish_force_publishes_what_the_checks_refuse(tmp_path: Path) -> None:
    (tmp_path / "order.json").write_text('{"image": "cat.png"}\n')
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\nhello\n')
    for args in (["order.json"], ["hello"], ["--jsonl", "bad.jsonl"]):
        result = jobrunner("publish", "-f", EXAMPLE, "--force", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert queued(tmp_path / ".jobrunner") == [
        b"order.json",
        b"hello",
        b'{"image": "a.png"}',
        b"hello",
    ]


def test_publish_takes_what_the_template_can_render(tmp_path: Path) -> None:
    (tmp_path / "order.json").write_text('{"image": "cat.png"}')
    (tmp_path / "good.jsonl").write_text('{"image": "a.png"}\n\n{"image": "b.png"}\n')
    assert jobrunner("publish", "-f", EXAMPLE, "@order.json", cwd=tmp_path).returncode == 0
    assert (
        jobrunner("publish", "-f", EXAMPLE, "--jsonl", "good.jsonl", cwd=tmp_path).returncode == 0
    )
    piped = jobrunner("publish", "-f", EXAMPLE, "-", cwd=tmp_path, stdin='{"image": "d.png"}')
    assert piped.returncode == 0, piped.stderr
    # JSON Lines from standard input too (i21, N11: `-` was taken for a missing file).
    lines = '{"image": "e.png"}\n{"image": "f.png"}\n'
    piped = jobrunner("publish", "-f", EXAMPLE, "--jsonl", "-", cwd=tmp_path, stdin=lines)
    assert piped.returncode == 0, piped.stderr
    assert len(queued(tmp_path / ".jobrunner")) == 6


# ---------------------------------------------------------------- exit codes
CLOSED_PORT_KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""
UNREACHABLE_RABBITMQ = """\
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata: {name: work}
spec:
  triggers:
  - type: rabbitmq
    metadata: {queueName: work, host: "amqp://guest:guest@127.0.0.1:1/"}
  jobTargetRef:
    template:
      spec:
        containers: [{name: w, image: busybox, command: [echo]}]
"""


SAMPLE = '{"image": "cat.png"}'


def exit_cases(tmp: Path) -> list[tuple[list[str], int, str]]:
    """(arguments, exit code, what the error says) for each command's ways to fail: 2
    for a mistake in what was given, 1 for a failure met while running. The README's
    exit-code table says the same."""
    closed = tmp / "closed.kubeconfig"
    closed.write_text(CLOSED_PORT_KUBECONFIG)
    (tmp / "deployment.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {}\n")
    (tmp / "rabbit.yaml").write_text(UNREACHABLE_RABBITMQ)
    (tmp / "app").mkdir()
    local = ["--local", "--state-dir", str(tmp / "state")]
    cluster = ["--kubeconfig", str(closed)]
    return [
        # 2: what was given cannot work.
        (["run", *local, "-f", str(tmp / "deployment.yaml")], 2, "no ScaledJob in this file"),
        (["run", "-f", EXAMPLE], 2, "no Kubernetes configuration"),
        (["publish", "-f", EXAMPLE, "hello"], 2, "InvalidMessage"),
        (["render", "-f", EXAMPLE, "--message", "hello"], 2, "InvalidMessage"),
        (["validate", "-f", EXAMPLE, "--sample-message", "hello"], 2, "InvalidMessage"),
        (["validate", "-f", EXAMPLE, "--server-dry-run"], 2, "no Kubernetes configuration"),
        (["status", "-f", EXAMPLE], 2, "no Kubernetes configuration"),
        (["jobs", "-f", EXAMPLE], 2, "no Kubernetes configuration"),
        (["logs", "some-job"], 2, "no Kubernetes configuration"),
        # The kubeconfig is there, the context is not (i21, N20: the advice named --kubeconfig).
        (
            ["jobs", "-f", EXAMPLE, *cluster, "--context", "nope"],
            2,
            f"--context nope: the kubeconfig {closed} has no context of that name (its "
            "contexts: x)",
        ),
        (["logs", *local, "some-job"], 2, "no local Job default/some-job"),
        (["dead-letters", *local, "-f", EXAMPLE, "--replay", "9"], 2, "no dead letter"),
        (["finalizers", "list"], 2, "no Kubernetes configuration"),
        (["operator"], 2, "no Kubernetes configuration"),
        (["functions", "import", str(tmp / "app")], 2, "no host.json"),
        (["completion", "tcsh"], 2, "invalid choice"),
        (["stauts"], 2, "unknown command"),
        # 1: a service met while running failed.
        ([*cluster, "status", "-f", EXAMPLE, *local[1:]], 1, "unreachable"),
        ([*cluster, "jobs", "-f", EXAMPLE], 1, "unreachable"),
        ([*cluster, "logs", "some-job"], 1, "unreachable"),
        ([*cluster, "finalizers", "list"], 1, "unreachable"),
        (
            [*cluster, "validate", "-f", EXAMPLE, "--server-dry-run", "--sample-message", SAMPLE],
            1,
            "unreachable",
        ),
        (["dead-letters", *local, "-f", str(tmp / "rabbit.yaml")], 1, "127.0.0.1:1"),
    ]


def test_every_command_exits_2_for_what_was_given_and_1_for_what_failed_running(
    tmp_path: Path,
) -> None:
    from jobrunner.cli.parser import COMMANDS

    cases = exit_cases(tmp_path)
    problems = []
    # Processes side by side: most of their time is waiting (interpreter start, refused
    # connections), so four at once keep the test short on two cores.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: jobrunner(*case[0], cwd=tmp_path), cases))
    for (args, code, says), result in zip(cases, results, strict=True):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        if (
            result.returncode != code
            or len(errors) > 1
            or says not in result.stderr
            or "Traceback" in result.stderr
        ):
            problems.append(f"{args}: exit {result.returncode}, wanted {code}\n{result.stderr}")
    assert not problems, "\n\n".join(problems)
    walked = {word for args, _, _ in cases for word in args}
    assert {c.name for c in COMMANDS} <= walked, "every command's errors are walked"


def test_the_readme_exit_code_table_is_the_one_the_code_uses() -> None:
    from jobrunner.cli import errors

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| exit code |") :].split("\n\n")[0]
    rows = {line.split("|")[1].strip(" `") for line in table.splitlines()[2:]}
    assert rows == {"0", str(errors.FAILED), str(errors.USAGE), "130", "141"}
