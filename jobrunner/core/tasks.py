"""The one way to start long-lived work: a named task whose end is logged at once (a
failure with its traceback, an unexpected normal return as well), not discovered when
someone finally awaits it.

Tasks are *essential* (the process cannot do its job without them: a dispatch loop, a
Job watch) or *auxiliary* (a depth sampler, a progress line): the runner stops on the
failure of an essential task only, so a failing sampler never stops every dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from jobrunner.core.protocols import Refusal
from jobrunner.core.redaction import describe_error

logger = logging.getLogger(__name__)

_ESSENTIAL = "jobrunner_essential"


def _report(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, Refusal):
        logger.error("task %s failed: %s", task.get_name(), exc)
    elif exc is not None:
        # In jobrunner's words (the message may quote a server's answer); the traceback,
        # for the bug it is, says where (jobrunner.core.redaction.describe_traceback).
        logger.error("task %s failed: %s", task.get_name(), describe_error(exc), exc_info=exc)
    elif getattr(task, "jobrunner_long_lived", False):
        logger.warning("task %s ended without being asked to", task.get_name())


def start_guarded(
    coro: Coroutine[Any, Any, Any], *, name: str, essential: bool = True, long_lived: bool = True
) -> asyncio.Task[Any]:
    """Start ``coro`` as a task named ``name``. ``long_lived``: it should run until
    cancelled, so a normal return is logged as unexpected; ``essential``: see the
    module docstring."""
    task = asyncio.create_task(coro, name=name)
    setattr(task, _ESSENTIAL, essential)
    task.jobrunner_long_lived = long_lived  # type: ignore[attr-defined]
    task.add_done_callback(_report)
    return task


def is_essential(task: asyncio.Task[Any]) -> bool:
    return bool(getattr(task, _ESSENTIAL, True))


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, grace: float) -> None:
    """Wait up to ``grace`` seconds for tasks to end by themselves, then cancel the rest
    and wait for them to unwind, saying every 10 s which are still stuck."""
    pending = {t for t in tasks if not t.done()}
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=grace)
    for task in still:
        task.cancel()
    while still:
        _, still = await asyncio.wait(still, timeout=10.0)
        if still:
            logger.warning(
                "still waiting for %s to stop", ", ".join(sorted(t.get_name() for t in still))
            )
