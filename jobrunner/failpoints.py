"""Named crash points for crash-safety tests: when a point is armed (settings
``dispatcher.failpoints``, e.g. ``JOBRUNNER_DISPATCHER__FAILPOINTS='["after-create"]'``),
reaching it kills the process with SIGKILL, exactly as a node failure would. Unarmed
points cost one set lookup."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

logger = logging.getLogger(__name__)

POINTS = frozenset({"before-create", "after-create", "before-settle"})


class Failpoints:
    def __init__(self, armed: Iterable[str] = ()) -> None:
        self.armed = frozenset(armed)
        unknown = self.armed - POINTS
        if unknown:
            raise ValueError(f"unknown failpoints {sorted(unknown)}; known: {sorted(POINTS)}")

    def hit(self, name: str) -> None:
        if name in self.armed:
            logger.critical("failpoint %s reached: killing the process", name)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
