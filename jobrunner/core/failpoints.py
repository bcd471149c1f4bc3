"""Named fault points for crash-safety tests. When a point is armed (settings
``dispatcher.failpoints``, e.g. ``JOBRUNNER_DISPATCHER__FAILPOINTS='["after-create"]'``),
reaching it kills the process with SIGKILL, exactly as a node failure would; armed as
``raise:<point>`` it raises ``InjectedFault`` instead, an error nobody foresaw (as a
library that changed under us would raise). Unarmed points cost one set lookup."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

logger = logging.getLogger(__name__)

POINTS = frozenset(
    {
        "before-create",
        "after-create",
        # jobrunner.kube.client / jobrunner.local.client: a Job created now, its message
        # Secret not yet.
        "between-job-and-secret",
        "before-settle",
        # jobrunner.dispatch.outputs: after one output message is confirmed, before it is recorded;
        # after every output is published and recorded, before the message is settled.
        "after-output-sent",
        "after-outputs-published",
        # jobrunner.dispatch.replies: a reply confirmed by the broker, not yet recorded on
        # its Job.
        "after-reply-sent",
        # jobrunner.sources.kafka: a dead letter produced in its transaction, which is not
        # committed yet (nor are the offsets that settle its record).
        "after-dead-letter-sent",
    }
)
_RAISE = "raise:"


class InjectedFault(RuntimeError):
    """Raised at a ``raise:<point>`` failpoint."""


class Failpoints:
    def __init__(self, armed: Iterable[str] = ()) -> None:
        armed = frozenset(armed)
        self.kill = frozenset(a for a in armed if not a.startswith(_RAISE))
        self.raise_ = frozenset(a[len(_RAISE) :] for a in armed if a.startswith(_RAISE))
        unknown = (self.kill | self.raise_) - POINTS
        if unknown:
            raise ValueError(
                f"unknown failpoints {sorted(unknown)}; known: {sorted(POINTS)} "
                f"(prefix {_RAISE!r} to raise instead of killing)"
            )

    def hit(self, name: str) -> None:
        if name in self.raise_:
            raise InjectedFault(f"failpoint {name} armed to raise")
        if name in self.kill:
            logger.critical("failpoint %s reached: killing the process", name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
