"""Message bodies and headers as given on the command line, and the checks ``publish``
makes before a message reaches the queue."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobrunner.cli.errors import CliError

if TYPE_CHECKING:
    from jobrunner.core.models import Delivery
    from jobrunner.manifest.scaledjob import ScaledJob

FORCE_HINT = "pass --force to publish it anyway"


@dataclass(frozen=True)
class Body:
    """A message body with where it came from, for an error that points at it."""

    data: bytes
    where: str
    """``MESSAGE 2 ('...')``, ``MESSAGE @order.json``, ``--jsonl m.jsonl line 3``."""


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


def refuse_a_file_name(value: str, *, flag: str, verb: str, force: bool) -> None:
    """Refuse (exit 2) a body given on the command line that is the name of a file here,
    without ``@``, unless ``force``: the user almost surely meant the file's content
    (``@order.json``), and would otherwise get its name as the body, published to a
    queue or rendered into a Job. Every option that takes a body (``publish`` MESSAGE,
    ``render --message``, ``validate --sample-message``) asks this, ``verb`` saying
    what it does with one ("publish", "render")."""
    if force or value.startswith("@") or value == "-" or not _is_file(value):
        return
    force_hint = FORCE_HINT if verb == "publish" else f"pass --force to {verb} it as that text"
    raise CliError(
        f"{flag} {_shown(value)}: is the name of a file here, and would be {verb}ed as "
        f"that text; write @{value} to {verb} the file's content, or {force_hint}"
    )


def read_body(value: str, *, flag: str, verb: str, force: bool) -> bytes:
    """A body from the command line (``-``, ``@FILE`` or the text, see ``read_message``),
    a bare file name refused unless ``force`` (see ``refuse_a_file_name``)."""
    refuse_a_file_name(value, flag=flag, verb=verb, force=force)
    return read_message(value, flag=flag)


def read_bodies(values: list[str], *, force: bool) -> list[Body]:
    """``publish``'s MESSAGE arguments (a bare file name refused unless ``force``)."""
    bodies = []
    for number, value in enumerate(values, start=1):
        shown = _shown(value)
        where = f"MESSAGE {shown}" if len(values) == 1 else f"MESSAGE {number} ({shown})"
        bodies.append(Body(read_body(value, flag="MESSAGE", verb="publish", force=force), where))
    return bodies


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


def _is_file(value: str) -> bool:
    if "\n" in value or len(value) > 4096:  # a body, not a path
        return False
    try:
        return Path(value).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL
        return False


def read_lines(value: str, *, force: bool = False) -> list[Body]:
    """``--jsonl FILE`` (``-``: standard input): one body per non-blank line, each a JSON
    value as JSON Lines (https://jsonlines.org) has it. A line that is not JSON is
    refused with its number unless ``force``; a file that is one JSON document over
    several lines (a pretty-printed array or object) says so, as publishing its lines
    would publish ``[`` and ``]``, or the halves of an object."""
    path = Path(value).expanduser()
    try:
        raw = sys.stdin.buffer.read() if value == "-" else path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"--jsonl {value}: the file does not exist") from None
    except IsADirectoryError:
        raise CliError(f"--jsonl {value}: is a directory; give a file") from None
    except OSError as exc:
        raise CliError(f"--jsonl {value}: cannot read: {exc.strerror}") from None
    bodies = [
        Body(line, f"--jsonl {value} line {number}")
        for number, line in enumerate(raw.splitlines(), start=1)
        if line.strip()
    ]
    if force:
        return bodies
    for body in bodies:
        try:
            json.loads(body.data)
        except ValueError as exc:
            document = _one_document(raw)
            if document is not _NOT_ONE:
                raise CliError(_one_document_problem(value, document, bodies)) from None
            raise CliError(
                f"{body.where}: not JSON ({exc}); --jsonl takes one JSON value per line; "
                "fix the line, or pass --force to publish each line as it is"
            ) from None
    return bodies


_NOT_ONE = object()
"""What ``_one_document`` returns for a file that is not one JSON document."""


def _one_document(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return _NOT_ONE


def _one_document_problem(value: str, document: object, lines: list[Body]) -> str:
    """What to say of a ``--jsonl`` file that is one JSON document over several lines,
    built from what the file is: its own first and last lines (those that would be
    messages), and the way to one message per line that fits its top-level type (an
    array's items are the messages; an object is one message)."""
    quoted = ", ".join(
        _shown(b.data.decode(errors="replace").strip()) for b in (lines[0], lines[-1])
    )
    if isinstance(document, list):
        what = f"one JSON array ({len(document)} item(s))"
        fix = (
            f"write one item per line (e.g. jq -c '.[]' {value}), or publish the array as "
            f"one message with @{value}"
        )
    else:
        what = "one JSON object" if isinstance(document, dict) else "one JSON value"
        fix = (
            f"publish it as one message with @{value}, or write it on one line "
            f"(e.g. jq -c . {value})"
        )
    return (
        f"--jsonl {value}: the file is {what} over {len(lines)} lines, not one message per "
        f"line, and its lines ({quoted} …) would be the messages; {fix}"
    )


def delivery_for(
    scaledjob: ScaledJob,
    body: bytes,
    *,
    message_id: str | None,
    headers: dict[str, str],
    content_type: str | None = None,
) -> Delivery:
    """The Delivery the dispatcher would receive for ``body`` from the ScaledJob's first
    trigger, for rendering with nothing running (``render``, and ``publish``'s check)."""
    import time

    from jobrunner.core.models import Delivery
    from jobrunner.core.naming import message_identity

    meta = scaledjob.spec.triggers[0].metadata
    metadata = (
        {"topic": meta["topic"], "partition": "0", "offset": "0"}
        if "topic" in meta
        else {"queue": meta.get("queueName", "")}
    )
    return Delivery(
        source=scaledjob.spec.triggers[0].type,
        identity=message_identity(message_id, body, headers),
        body=body,
        message_id=message_id,
        headers=headers,
        content_type=content_type,
        metadata=metadata,
        received_at=time.monotonic(),
    )


def parse_headers(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--header {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out
