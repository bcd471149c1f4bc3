"""Input that cannot work is refused up front, in one ``error:`` line that names it, with
exit 2: a state directory that cannot be written, a message ``publish`` can already tell
will fail, duplicate keys, a file of the wrong kinds. Run as real processes, as a user
runs them (issue 21, section 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        pytest.skip(f"no {Path(state).parent} here")
    for command in STATE_COMMANDS:
        result = jobrunner(*command, "--state-dir", state, cwd=tmp_path)
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
