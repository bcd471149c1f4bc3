"""Every output path ends with exit 141, silently, when its reader went away
(``jobrunner jobs | head -1``), as the README's exit-code table says: the rich tables
(``jobs``, ``status``, ``dead-letters``, ``finalizers``, ``-o wide``) as much as the plain
ones (JSON, YAML, ``logs``, ``render``, ``completion``). Rich's Console answered a broken
pipe with its own ``SystemExit(1)`` (i21, F3). Run as real processes whose stdout is a
pipe whose reader is already closed, so the first write meets it, whatever the timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def to_a_gone_reader(*args: str) -> subprocess.CompletedProcess[bytes]:
    read, write = os.pipe()
    os.close(read)  # the reader went away before the first line
    try:
        return subprocess.run(
            [sys.executable, "-m", "jobrunner.cli", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "command",
    [
        ["jobs"],
        ["jobs", "-o", "wide"],
        ["jobs", "-o", "json"],
        ["status"],
        ["status", "-o", "wide"],
        ["status", "-o", "yaml"],
        ["dead-letters"],
        ["dead-letters", "-o", "wide"],
        ["finalizers", "list"],
        ["logs"],
        ["render"],
        ["validate"],
        ["completion", "bash"],
        ["publish"],
    ],
    ids=" ".join,
)
def test_every_output_exits_141_silently_when_its_reader_went_away(
    command: list[str], filled: tuple[Path, str], state_dir: Path
) -> None:
    path, job = filled
    local = ["--local", "--state-dir", str(state_dir)]
    args = {
        "logs": [*command, *local, job],
        "render": [*command, "-f", str(path), "--message", "{}"],
        "validate": [*command, "-f", str(path)],
        "completion": command,
        "publish": [*command, "--state-dir", str(state_dir), "-f", str(path), "{}"],
    }.get(command[0], [*command, *local, "-f", str(path)])
    done = to_a_gone_reader(*args)
    assert (done.returncode, done.stderr.decode()) == (141, "")
