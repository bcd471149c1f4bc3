"""Kubernetes' RFC 3339 timestamps, read and written in one place (Jobs, Events, the
local executor's records, the operator's views all share them)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def epoch(stamp: str | None) -> float | None:
    """Seconds since the epoch, or None for a missing or unreadable stamp."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def age_seconds(stamp: str) -> float:
    """How long ago ``stamp`` was (0 when it cannot be read)."""
    moment = epoch(stamp)
    return 0.0 if moment is None else time.time() - moment


def seconds_between(start: str, end: str) -> float | None:
    a, b = epoch(start), epoch(end)
    if a is None or b is None:
        return None
    return max(0.0, b - a)


def now_rfc3339(*, millis: bool = False) -> str:
    """Now, as the API server writes it (whole seconds), or with milliseconds where a
    truer duration matters (the local executor's Jobs of a second or two)."""
    now = datetime.now(UTC)
    if millis:
        return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")
