"""Message bodies and headers as given on the command line."""

from __future__ import annotations

import sys
from pathlib import Path

from jobrunner.cli.errors import CliError


def read_message(value: str, *, flag: str = "MESSAGE") -> bytes:
    """A body: ``-`` reads standard input, ``@FILE`` a file, anything else is the text."""
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CliError(f"{flag} {value}: {path} does not exist") from None
        except IsADirectoryError:
            raise CliError(f"{flag} {value}: {path} is a directory; give a file") from None
        except OSError as exc:
            raise CliError(f"{flag} {value}: cannot read {path}: {exc.strerror}") from None
    return value.encode()


def read_lines(value: str) -> list[bytes]:
    """``--jsonl FILE``: one body per non-blank line."""
    path = Path(value).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"--jsonl {value}: the file does not exist") from None
    except IsADirectoryError:
        raise CliError(f"--jsonl {value}: is a directory; give a file") from None
    except OSError as exc:
        raise CliError(f"--jsonl {value}: cannot read: {exc.strerror}") from None
    return [line for line in raw.splitlines() if line.strip()]


def parse_headers(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--header {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out
