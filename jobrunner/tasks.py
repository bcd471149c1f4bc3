"""The one way to start long-lived work: a named task whose unexpected end is logged at
once, not discovered when someone finally awaits it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

logger = logging.getLogger(__name__)


def _report(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)


def start_guarded(coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_report)
    return task


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, grace: float) -> None:
    """Wait up to ``grace`` seconds for tasks to end by themselves, then cancel the rest
    and wait for them to unwind."""
    pending = {t for t in tasks if not t.done()}
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=grace)
    for task in still:
        task.cancel()
    if still:
        await asyncio.wait(still)
