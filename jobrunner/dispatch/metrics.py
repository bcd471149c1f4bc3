"""The dispatch metrics of one ScaledJob: its series in the process's registry, the
by-reason labels bounded (``Metrics.reason``), and their removal when the ScaledJob is no
longer served here.

Series are keyed by namespace and name: same-named ScaledJobs of two namespaces are two
series, and closing one never removes the other's. Imports no other dispatch module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from jobrunner.core.models import Delivery, JobOutcome
from jobrunner.core.timestamps import seconds_between
from jobrunner.observability.telemetry import Metrics
from jobrunner.tracking.tracker import JobState


class DispatchMetrics:
    def __init__(
        self,
        *,
        metrics: Metrics,
        namespace: str,
        scaledjob: str,
        source: str,
        active: Callable[[], int],
        pending_admission: Callable[[], int] = lambda: 0,
    ) -> None:
        self.metrics = metrics
        self._sj = (namespace, scaledjob)
        self._source = source
        self._received = metrics.messages_received.labels(*self._sj, source)
        self._created = metrics.jobs_created.labels(*self._sj)
        self._adopted = metrics.jobs_adopted.labels(*self._sj)
        self._succeeded = metrics.jobs_succeeded.labels(*self._sj)
        self._receive_to_create = metrics.receive_to_create.labels(*self._sj)
        self._publish_to_create = metrics.publish_to_create.labels(*self._sj)
        metrics.jobs_active.labels(*self._sj).set_function(active)
        metrics.jobs_pending_admission.labels(*self._sj).set_function(pending_admission)
        self._evictions = metrics.evictions.labels(*self._sj)
        self._admission_wait = metrics.admission_wait.labels(*self._sj)

    def _series(self, metric: str, reason: str) -> tuple[str, str, str]:
        """(namespace, scaledjob, reason) labels of a by-reason metric, the reason bounded."""
        ns, name = self._sj
        return ns, name, self.metrics.reason(ns, name, metric, reason)

    def received(self) -> None:
        self._received.inc()

    def created(self, delivery: Delivery) -> None:
        """A Job was created for ``delivery``: counted, and the latencies observed."""
        self._created.inc()
        self._receive_to_create.observe(time.monotonic() - delivery.received_at)
        if delivery.published_at is not None:
            self._publish_to_create.observe(max(0.0, time.time() - delivery.published_at))

    def adopted(self) -> None:
        self._adopted.inc()

    def finished(self, state: JobState, outcome: JobOutcome) -> None:
        """A Job of this ScaledJob finished: its outcome and duration."""
        if outcome.succeeded:
            self._succeeded.inc()
        else:
            self.metrics.jobs_failed.labels(*self._series("jobs_failed", outcome.reason)).inc()
        duration = seconds_between(state.created, state.finished_at)
        if duration is not None:
            self.metrics.job_duration.labels(*self._sj, outcome.outcome.value).observe(duration)

    def admitted(self, waited: float | None) -> None:
        """Kueue admitted a Job after ``waited`` seconds (None: unknown)."""
        if waited is not None:
            self._admission_wait.observe(max(0.0, waited))

    def evicted(self) -> None:
        self._evictions.inc()

    def dead_lettered(self, reason: str) -> None:
        self.metrics.dead_lettered.labels(*self._series("dead_lettered", reason)).inc()

    def unforeseen(self, error: str) -> None:
        self.metrics.unforeseen_errors.labels(*self._series("unforeseen_errors", error)).inc()

    def close(self) -> None:
        """Remove this ScaledJob's series (a replaced unit must leave no stale series)."""
        m = self.metrics
        for metric in (
            m.jobs_active,
            m.jobs_pending_admission,
            m.evictions,
            m.admission_wait,
            m.jobs_created,
            m.jobs_adopted,
            m.jobs_succeeded,
            m.receive_to_create,
            m.publish_to_create,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(*self._sj)
        with contextlib.suppress(KeyError):
            m.messages_received.remove(*self._sj, self._source)
        m.forget(*self._sj)
