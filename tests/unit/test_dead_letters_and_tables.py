"""The replay rule (a replayed dead letter is a new identity, so a new Job), the headers a
replay carries, and tables that fit an 80-column terminal."""

from __future__ import annotations

import datetime
import io
import time

from rich.console import Console

from jobrunner.core.deadletters import DeadLetter, replay_headers, replay_value, select
from jobrunner.core.naming import REPLAY_HEADER, job_name, message_identity
from jobrunner.views.console import (
    Cell,
    Column,
    FitTable,
    JobRow,
    history_table,
    message_label,
    middle,
)


def test_a_replay_header_makes_a_new_identity_and_so_a_new_job() -> None:
    original = message_identity("order-7", b"{}", {})
    replayed = message_identity("order-7", b"{}", {REPLAY_HEADER: "2026-11-29T10:00:00Z"})
    assert original == "order-7"
    assert replayed == "order-7#replay-2026-11-29T10:00:00Z"
    assert job_name("work", original) != job_name("work", replayed)
    # Without a message id the digest ignores the replay header; the suffix tells them apart.
    digest = message_identity(None, b"body", {"tenant": "a"})
    again = message_identity(None, b"body", {"tenant": "a", REPLAY_HEADER: "r1"})
    assert again == f"{digest}#replay-r1"
    # A redelivery of the replay (same header) is the same identity: it adopts its Job.
    assert message_identity(None, b"body", {"tenant": "a", REPLAY_HEADER: "r1"}) == again


def test_replay_strips_what_dead_lettering_added_and_keeps_the_producers_headers() -> None:
    dead = {
        "tenant": "acme",
        "traceparent": "00-abc-def-01",
        "x-jobrunner-reason": "BackoffLimitExceeded",
        "x-jobrunner-detail": "worker exited 1",
        "x-jobrunner-job": "work-0123456789abcdef",
        "x-jobrunner-scaledjob": "work",
        "x-jobrunner-source-queue": "work",
        "x-jobrunner-source-partition": "0",
        "x-jobrunner-replay": "an-earlier-replay",
        "x-death": "[...]",
    }
    assert replay_headers(dead, "now") == {
        "tenant": "acme",
        "traceparent": "00-abc-def-01",
        REPLAY_HEADER: "now",
    }


def test_replay_values_are_utc_times_to_the_microsecond() -> None:
    moment = datetime.datetime(2026, 11, 29, 16, 2, 3, 456789, tzinfo=datetime.UTC)
    assert replay_value(moment) == "2026-11-29T16:02:03.456789Z"


def test_select_by_id_and_reason_leaves_replayed_records_out() -> None:
    letters = [
        DeadLetter("1", b"a", {"x-jobrunner-reason": "BackoffLimitExceeded"}),
        DeadLetter("2", b"b", {"x-jobrunner-reason": "InvalidMessage"}),
        DeadLetter("3", b"c", {"x-jobrunner-reason": "BackoffLimitExceeded"}, replayed="r"),
    ]
    assert [d.id for d in select(letters)] == ["1", "2"]
    assert [d.id for d in select(letters, reasons=["BackoffLimitExceeded"])] == ["1"]
    assert [d.id for d in select(letters, ids=["2", "3"])] == ["2"]
    assert [d.id for d in select(letters, ids=["3"], include_replayed=True)] == ["3"]


def test_middle_truncation_keeps_both_ends() -> None:
    assert middle("thumbnails-4d23ba658750ecd6", 14) == "thumbn…750ecd6"
    assert middle("short", 14) == "short"
    assert len(middle("x" * 100, 20)) == 20


def _rendered(table: FitTable, width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(table)
    return out.getvalue().splitlines()


def _row(name: str, message: str, state: str, reason: str) -> JobRow:
    now = time.time()
    return JobRow(
        name=name,
        message=message,
        state=state,
        reason=reason,
        created=now - 30,
        started=now - 29,
        finished=now - 1,
        attempts=2,
        dead_lettered=state == "failed",
    )


def test_the_jobs_table_fits_80_columns_keeping_outcome_and_reason() -> None:
    rows = [
        _row(
            "thumbnails-4d23ba658750ecd6",
            "corrupt-upload-2026-11-29",
            "failed",
            "BackoffLimitExceeded",
        ),
        _row("thumbnails-9c7a860173d6b5d6", "photo-1", "succeeded", "CompletionsReached"),
    ]
    lines = _rendered(history_table(rows, title="default/thumbnails"), 80)
    assert all(len(line) <= 80 for line in lines), lines
    (failed,) = [line for line in lines if " failed " in line]
    assert "BackoffLimitExceeded" in failed
    assert "…" in failed  # the long name lost its middle, its ends stayed
    assert failed.startswith("thumbn")
    assert "50ecd6" in failed
    wide = "\n".join(_rendered(history_table(rows, title="t"), 200))
    assert "thumbnails-4d23ba658750ecd6" in wide
    assert "corrupt-upload-2026-11-29" in wide


def test_a_table_leaves_out_optional_columns_before_cutting_required_ones() -> None:
    table = FitTable(
        columns=[
            Column("NAME", shrink="middle", min_width=6),
            Column("REASON"),
            Column("EXTRA", drop=1),
        ],
    )
    table.add_row("a-very-long-name-indeed", Cell("DeadlineExceeded"), "xxxxxxxxxxxx")
    (header, row) = _rendered(table, 30)
    assert "EXTRA" not in header
    assert "DeadlineExceeded" in row
    assert len(row) <= 30


def test_message_column_shows_the_id_or_a_preview_never_a_digest() -> None:
    assert message_label("order-7", '{"a": 1}') == "order-7"
    assert message_label("sha256:" + "ab" * 32, '{"image":\n "cat.png"}') == '{"image": "cat.png"}'
    assert message_label("order-7#replay-2026", None) == "order-7 (replay)"
    assert message_label("work/0/17", None) == "work/0/17"


def test_what_publishers_write_reaches_the_terminal_inert() -> None:
    """A message id, a body and a dead letter's detail are the publisher's and the tenant's
    text: printed on the terminal of whoever runs ``dead-letters``/``jobs``/``status``, an
    escape sequence in them could hide text (``ESC[8m``), clear the screen, set the title
    or the clipboard (OSC 52, ended by ``ESC \\``) or reverse a line (U+202E). Each is shown
    as its escape; the table stays one line per row."""
    hostile = "id\x1b]52;c;cHduZWQ=\x1b\\ \x1b[8mHIDDEN\x1b[0m\x9b2J\u202eevil\x07\nnext"
    table = FitTable(columns=[Column("MESSAGE"), Column("REASON")], title=f"t{hostile}")
    table.add_row(hostile, Cell("Failed", "red"), notes=[f"body: {hostile}"])
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True, color_system="truecolor").print(table)
    printed = out.getvalue()
    for raw in ("\x1b]", "\x1b\\", "\x1b[8m", "\x9b", "\u202e", "\x07"):
        assert raw not in printed, f"{raw!r} reached the terminal"
    assert "\\x1b]52;c;cHduZWQ=\\x1b\\" in printed
    assert "\\u202eevil" in printed
    assert len(printed.rstrip("\n").splitlines()) == 4  # title, header, row, its note
