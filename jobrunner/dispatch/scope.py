"""What every dispatch phase of one ScaledJob needs: the ScaledJob, the two protocols (a
message source, a job client), the tracker, the settings, the tracer, the loggers, the
retry of transient API errors and the set of short-lived tasks a drain waits for.

It owns no decision. Must not import another dispatch module (it is the bottom layer),
nor the adapters, the operator, the views or the command line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import trace

from jobrunner.core.failpoints import Failpoints
from jobrunner.core.marks import JobMarks
from jobrunner.core.models import Delivery
from jobrunner.core.protocols import JobClient, MessageSource
from jobrunner.core.retrying import retry_transient
from jobrunner.core.settings import DispatcherSettings
from jobrunner.core.tasks import start_guarded
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.tracking.tracker import JobTracker

T = TypeVar("T")


@dataclass
class Scope:
    """The per-ScaledJob context of the phases. ``scaledjob`` is replaced on a live
    resize (its name and namespace never change)."""

    scaledjob: ScaledJob
    source: MessageSource
    jobs: JobClient
    tracker: JobTracker
    settings: DispatcherSettings
    tracer: trace.Tracer
    log: logging.LoggerAdapter[Any]
    """The dispatcher's logger, carrying ``scaledjob`` and ``source``."""
    marks: JobMarks | None = None
    """For a ScaledJob whose pods may annotate Jobs (a function's): the settlement mark is
    signed with each Job's key, and one found on a Job is trusted only when it verifies
    (jobrunner.core.marks; the tracker screens the ones it sees)."""
    retry_ceiling: float = 30.0
    """Seconds: the longest pause between two tries of a Kubernetes call."""
    side_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    """Short-lived tasks (a message's work, a settlement, an Event): a drain waits for them."""

    def __post_init__(self) -> None:
        self.failpoints = Failpoints(self.settings.failpoints)

    @property
    def namespace(self) -> str:
        return self.scaledjob.namespace

    def spawn(self, coro: Awaitable[None], *, name: str) -> asyncio.Task[None]:
        """Start ``coro`` as a named, guarded task that a drain waits for."""
        task = start_guarded(coro, name=name, long_lived=False)  # type: ignore[arg-type]
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)
        return task

    async def retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` until it does not raise ``TransientError``: exponential backoff with
        jitter, bounded by ``retry_ceiling`` seconds between tries."""
        return await retry_transient(call, ceiling=self.retry_ceiling, log=self.log)

    def message_log(
        self, delivery: Delivery, job_name: str | None = None
    ) -> logging.LoggerAdapter[Any]:
        """A logger whose lines carry the message's fields (and its Job's, when it has one)."""
        extra = {**(self.log.extra or {}), "message_id": delivery.identity}
        if job_name:
            extra["job_name"] = job_name
        return logging.LoggerAdapter(self.log.logger, extra)

    def job_log(self, job_name: str, message_id: str | None = None) -> logging.LoggerAdapter[Any]:
        """A logger whose lines carry the Job and its message id (given, else the one the
        Job records)."""
        if message_id is None:
            state = self.tracker.jobs.get(job_name)
            message_id = state.message_id if state else ""
        return logging.LoggerAdapter(
            self.log.logger,
            {**(self.log.extra or {}), "job_name": job_name, "message_id": message_id},
        )
