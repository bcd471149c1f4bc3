"""What the commands print reaches the reader whole, or ends cleanly when the reader went
away. Every output path ends with exit 141, silently, when its reader is gone
(``jobrunner jobs | head -1``), as the README's exit-code table says: the rich tables
(``jobs``, ``status``, ``dead-letters``, ``finalizers``, ``-o wide``) as much as the plain
ones (JSON, YAML, ``logs``, ``render``, ``completion``); rich's Console answered a broken
pipe with its own ``SystemExit(1)`` (i21, F3). And ``-o wide`` is never cut, whatever the
terminal's width or ``COLUMNS`` (i21, F11). Run as real processes: stdout a pipe whose
reader is already closed (the first write meets it, whatever the timing), a pipe, a pty."""

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


def output_at(width: int | None, *args: str, terminal: bool = False) -> list[str]:
    """The lines ``jobrunner ARGS`` prints: piped (``COLUMNS=width`` exported unless
    None), or on a terminal (a pty) ``width`` columns wide, its styles taken off."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if width is not None:
        env["COLUMNS"] = str(width)
    argv = [sys.executable, "-m", "jobrunner.cli", *args]
    if not terminal:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 50, width or 80, 0, 0))
    proc = subprocess.Popen(argv, stdout=side, stderr=subprocess.DEVNULL, env=env)
    os.close(side)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the pty's other end closed: the process ended
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    return text.replace("\r\n", "\n").splitlines()


@pytest.mark.parametrize(
    "command",
    [["jobs", "-o", "wide"], ["status", "-o", "wide"], ["dead-letters", "-o", "wide"]],
    ids=" ".join,
)
def test_wide_output_is_never_cut_whatever_the_width(
    command: list[str], filled: tuple[Path, str], state_dir: Path
) -> None:
    """``-o wide`` is the whole table, on a narrow terminal and piped with ``COLUMNS``
    exported alike (i21, F11: it was cut to the width, columns gone mid-word)."""
    import re

    def timeless(lines: list[str]) -> list[str]:  # ages and durations move meanwhile
        return [re.sub(r"\b\d+(\.\d+)?(ms|[smhd])\b", "T", line) for line in lines]

    path, _ = filled
    args = [*command, "--local", "--state-dir", str(state_dir), "-f", str(path)]
    whole = timeless(output_at(None, *args))
    assert any(len(line) > 40 for line in whole), whole
    assert timeless(output_at(30, *args)) == whole
    assert timeless(output_at(30, *args, terminal=True)) == whole
