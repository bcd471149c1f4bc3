"""``type: sqlite``: the embedded queue (a SQLite file) that ``jobrunner publish`` fills,
for running without a broker. ``queueName`` (required) and ``path`` (default
``queue.db``, relative to the local state directory)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jobrunner.manifest.triggers import Problem, ResolveContext, TriggerType, required


@dataclass(frozen=True)
class SQLiteTrigger:
    path: Path
    queue: str


def sqlite_location(metadata: Mapping[str, str], state_dir: Path) -> SQLiteTrigger:
    """Where the queue file is: an absolute ``path``, or one inside ``state_dir``."""
    path = Path(metadata.get("path", "queue.db")).expanduser()
    return SQLiteTrigger(
        path=path if path.is_absolute() else state_dir / path, queue=metadata["queueName"]
    )


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    return required(metadata, "queueName", what=" (the queue `jobrunner publish` writes to)")


async def _resolve(context: ResolveContext) -> SQLiteTrigger:
    return sqlite_location(context.trigger.metadata, context.state_dir)


TRIGGER = TriggerType(
    name="sqlite",
    destination="queue",
    metadata=frozenset({"queueName", "path"}),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.sqlite:open_source",
    sink="jobrunner.sources.sqlite:open_sink",
    summary="the embedded queue: a SQLite file, no broker needed",
    # A tenant's ScaledJob must not make the operator create and write files at paths
    # it names (the path may be absolute), nor share a file queue with other tenants.
    operator_refusal=(
        "the embedded queue is for jobrunner run --local, and the operator does not serve "
        "it; use a broker"
    ),
)
