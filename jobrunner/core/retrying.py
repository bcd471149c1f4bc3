"""Retrying a Kubernetes API call while the server is unavailable: one loop for every
collaborator of the dispatcher (its scope, function outputs, replies)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from jobrunner.core.protocols import TransientError

T = TypeVar("T")


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    ceiling: float,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> T:
    """``call`` until it does not raise ``TransientError``: exponential backoff from
    0.1 s with jitter (half to all of the delay), at most ``ceiling`` seconds between
    tries. Anything else it raises goes to the caller."""
    delay = 0.1
    while True:
        try:
            return await call()
        except TransientError as exc:
            pause = delay * (0.5 + random.random() / 2)
            log.warning("Kubernetes API unavailable (%s); retrying in %.1fs", exc, pause)
            await asyncio.sleep(pause)
            delay = min(ceiling, delay * 2)
