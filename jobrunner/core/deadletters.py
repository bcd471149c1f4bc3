"""Dead letters as an operator sees them (``jobrunner dead-letters``): what each one is,
and how it goes back to its source as new work.

Every source dead-letters a copy of the message with ``x-jobrunner-*`` headers saying
why (``models.Decision.reason_headers``). A store (one per broker, in
``jobrunner.sources``) lists those copies and replays chosen ones: it publishes each
back to the queue or topic it came from with the reason headers removed and
``x-jobrunner-replay`` set (see ``naming``: the replay is a new identity, so it gets a
Job of its own), then removes the dead letter (or, on Kafka, whose log cannot lose a
record, marks it replayed).

Core: no broker library here.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from jobrunner.core.naming import REPLAY_HEADER

REASON = "x-jobrunner-reason"
DETAIL = "x-jobrunner-detail"
JOB = "x-jobrunner-job"
_DEAD_LETTER_HEADERS = (REASON, DETAIL, JOB, "x-jobrunner-scaledjob", REPLAY_HEADER)
_DEAD_LETTER_PREFIXES = ("x-jobrunner-source-", "x-death", "x-first-death-", "x-last-death-")


@dataclass(frozen=True)
class DeadLetter:
    id: str
    """How its store names it, for ``--replay ID``: a row id (embedded queue),
    ``partition:offset`` (Kafka), the message id or a digest (RabbitMQ)."""
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str | None = None
    key: bytes | None = None
    """Kafka: the record's key, kept on replay (per-key ordering, partitioning)."""
    when: float | None = None
    """When it was dead-lettered (epoch seconds), when the store knows."""
    replayed: str | None = None
    """Kafka: the replay value when it was replayed already (the log keeps it)."""

    @property
    def reason(self) -> str:
        return self.headers.get(REASON, "")

    @property
    def detail(self) -> str:
        return self.headers.get(DETAIL, "")

    @property
    def job(self) -> str:
        return self.headers.get(JOB, "")

    def source_header(self, what: str) -> str | None:
        """Where it came from: ``queue``, ``topic``, ``partition``, ``offset``."""
        return self.headers.get(f"x-jobrunner-source-{what}")


def replay_headers(headers: Mapping[str, str], value: str) -> dict[str, str]:
    """The producer's headers of a dead letter, with what dead-lettering added removed
    (``x-jobrunner-reason/-detail/-job/-scaledjob/-source-*``, RabbitMQ's ``x-death``
    family) and ``x-jobrunner-replay: value`` set."""
    kept = {
        k: v
        for k, v in headers.items()
        if k.lower() not in _DEAD_LETTER_HEADERS and not k.lower().startswith(_DEAD_LETTER_PREFIXES)
    }
    kept[REPLAY_HEADER] = value
    return kept


def replay_value(now: datetime.datetime | None = None) -> str:
    """A value unique to one replay: its UTC time to the microsecond."""
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


REASONS: Mapping[str, str] = {
    # The Job controller's (kubernetes pkg/controller/job; batch/v1 JobConditionType
    # Failed reasons), as the Job's Failed condition and `kubectl describe job` say:
    "BackoffLimitExceeded": "the Job failed: every attempt its backoffLimit allows failed",
    "DeadlineExceeded": "the Job failed: it ran past its activeDeadlineSeconds",
    "PodFailurePolicy": "the Job failed: a podFailurePolicy rule failed it",
    "FailedIndexes": "the Job failed: an index used up its backoffLimitPerIndex",
    "MaxFailedIndexesExceeded": "the Job failed: more indexes failed than maxFailedIndexes",
    # jobrunner's own (dispatcher, rendering, jobrunner.dispatch.outputs):
    "JobDeleted": "the Job was deleted before it finished",
    "FunctionFailed": "the function reported an error (the Job's own reason is in `jobs`)",
    "OutputBindingFailed": "the function succeeded but an output could not be published",
    "InvalidMessage": "the message cannot become a Job (not what the template reads)",
    "TemplateError": "the Job template failed on this message",
    "MessageTooLarge": "the message is larger than the ScaledJob allows",
    "ApiRejected": "the API server (or the local executor) refused the rendered Job",
    "MessageIdReused": "a Job of that message id exists for another body",
    "DuplicateMessage": "the same message was already settled",
    "MaxDeliverExceeded": "the broker delivered it more often than it allows",
    "MaxDeliverReached": "the broker delivered it more often than it allows",
    "InternalError": "an error nobody foresaw, after the tries allowed (a bug: report it)",
    # Kueue's admission (jobrunner.core.admission), after inadmissibleTimeoutSeconds:
    "Inadmissible": "Kueue cannot admit the Job: its LocalQueue or ClusterQueue does not exist",
    "NeverFits": "Kueue cannot admit the Job: no flavor of its ClusterQueue can ever hold it",
    "Deactivated": "Kueue deactivated the Job's Workload (spec.active false, requeuing limit)",
    "NoWorkload": "Kueue made no Workload for the Job (a WorkloadPriorityClass it names is "
    "missing?)",
    "MultiKueueSecret": "MultiKueue would run the Job on a worker cluster without its "
    "message Secret: deliver the message in env",
}
"""What each dead-letter reason means, for the listings' notes. A Job's own reason (its
Failed condition, shown by ``jobs``) and the reason its message was dead-lettered (the
``x-jobrunner-reason`` header, shown by ``dead-letters``) are the same word except where
jobrunner knows more than the Job: a function's error is ``FunctionFailed`` though its
Job ended ``BackoffLimitExceeded``."""


def same_reason(a: str, b: str) -> bool:
    """Reasons compared as a person types them: case does not matter."""
    return a.casefold() == b.casefold()


def select(
    letters: Sequence[DeadLetter],
    *,
    ids: Collection[str] = (),
    reasons: Collection[str] = (),
    include_replayed: bool = False,
) -> list[DeadLetter]:
    """Those with one of ``ids`` (all when empty) and one of ``reasons`` (all when
    empty; in any case); already-replayed Kafka records only with ``include_replayed``."""
    return [
        d
        for d in letters
        if (not ids or d.id in ids)
        and (not reasons or any(same_reason(d.reason, r) for r in reasons))
        and (include_replayed or d.replayed is None)
    ]


def unknown_reasons(wanted: Collection[str], letters: Sequence[DeadLetter]) -> str | None:
    """For ``--reason`` values that match no dead letter: a sentence naming the reasons
    there are (with counts), with a did-you-mean for each close one; None when every
    value matches one."""
    import difflib

    counts: dict[str, int] = {}
    for letter in letters:
        counts[letter.reason or "-"] = counts.get(letter.reason or "-", 0) + 1
    missing = [w for w in wanted if not any(same_reason(w, r) for r in counts)]
    if not missing:
        return None
    known = list(counts) + [r for r in REASONS if r not in counts]
    folded = {r.casefold(): r for r in known}
    hints = []
    for value in missing:
        close = difflib.get_close_matches(value.casefold(), list(folded), n=1, cutoff=0.5)
        if close:
            hints.append(f"did you mean {folded[close[0]]!r} for {value!r}?")
    there = ", ".join(f"{r} ({n})" for r, n in sorted(counts.items())) or "none"
    return (
        f"no dead letter has reason {' or '.join(map(repr, missing))}; the reasons there: "
        f"{there}" + (f"; {' '.join(hints)}" if hints else "")
    )


class DeadLetterStore(Protocol):
    """One ScaledJob's dead letters, on its broker."""

    @property
    def where(self) -> str:
        """Where they are, in the broker's words (``queue work.dead-letter in …``)."""
        ...

    @property
    def destination(self) -> str:
        """Where a replay goes (``queue work``, ``topic work``)."""
        ...

    async def read(self, *, limit: int) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters, oldest first, without consuming them."""
        ...

    async def replay(self, letters: Sequence[DeadLetter], *, value: str) -> int:
        """Publish each back to its source as new work (``replay_headers``), then remove
        it from the dead letters (Kafka: mark it replayed); how many were replayed."""
        ...

    async def close(self) -> None: ...
