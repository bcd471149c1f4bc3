"""The core loop for one ScaledJob: receive -> render -> create -> await outcome -> settle,
as a short loop that wires the phases:

* ``intake``: a delivery's identity; a redelivery joins the message in hand;
* ``lifecycle``: a slot, the Job created (or adopted), its outcome awaited or the
  message handed over to it;
* ``settlement``: the one place a message is settled, and the finalizer released;
* ``keptcopies``: Jobs whose message was acked earlier, settled from the copy they keep;
* ``admission``: Kueue's admission of queued Jobs (waiting, admitted, evicted, never).

Guarantees, and how:

* one Job per message: the Job name is derived from the message; a redelivery gets 409
  on create and adopts the Job it already has;
* nothing lost: a message is acked only once its outcome is durable (the Job succeeded,
  or a dead-lettered copy was confirmed), or once the Job itself keeps the message
  (ack policy ``onJobCreation``, or a handover before the broker's consumer timeout);
* crash-safe: unacked messages come back to whichever dispatcher runs next and adopt
  their Jobs; Jobs whose message was already acked are settled from the copy they keep
  when the tracker sees them finish, whoever started them.

It sees only the two protocols (a message source, a job client) and the tracker; it is
the top of the dispatch layers (see the import contracts in pyproject.toml).
"""

from __future__ import annotations

import logging
import time

from jobrunner.core.marks import JobMarks
from jobrunner.core.models import JobOutcome
from jobrunner.core.protocols import JobClient, MessageHandle, MessageSource, SettleHook
from jobrunner.core.settings import DispatcherSettings
from jobrunner.core.tasks import stop_tasks
from jobrunner.dispatch.admission import Admission
from jobrunner.dispatch.events import JobEvents
from jobrunner.dispatch.intake import Intake
from jobrunner.dispatch.keptcopies import KeptCopies
from jobrunner.dispatch.lifecycle import Lifecycle
from jobrunner.dispatch.limiter import ActiveJobs
from jobrunner.dispatch.metrics import DispatchMetrics
from jobrunner.dispatch.scope import Scope
from jobrunner.dispatch.settlement import Settlement
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.observability.telemetry import Telemetry
from jobrunner.rendering.renderer import Renderer
from jobrunner.tracking.cleanup import HistoryCleaner
from jobrunner.tracking.tracker import JobState, JobTracker

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        *,
        scaledjob: ScaledJob,
        renderer: Renderer,
        source: MessageSource,
        jobs: JobClient,
        tracker: JobTracker,
        settings: DispatcherSettings,
        telemetry: Telemetry,
        retry_ceiling: float = 30.0,
        settle_hook: SettleHook | None = None,
        marks: JobMarks | None = None,
    ) -> None:
        log = logging.LoggerAdapter(logger, {"scaledjob": scaledjob.name, "source": source.name})
        self.scope = Scope(
            scaledjob=scaledjob,
            source=source,
            jobs=jobs,
            tracker=tracker,
            settings=settings,
            tracer=telemetry.tracer,
            log=log,
            marks=marks,
            retry_ceiling=retry_ceiling,
        )
        self.limiter = ActiveJobs(
            scaledjob.spec.maxReplicaCount, pending_limit=scaledjob.spec.maxPendingAdmission
        )
        self._wire(renderer=renderer, telemetry=telemetry, settle_hook=settle_hook)
        intake, settlement = self.intake, self.settlement
        self.cleaner = HistoryCleaner(
            jobs=jobs,
            tracker=tracker,
            namespace=scaledjob.namespace,
            successful_limit=scaledjob.spec.successfulJobsHistoryLimit,
            failed_limit=scaledjob.spec.failedJobsHistoryLimit,
            busy=lambda name: intake.in_hand(name) or name in settlement.awaiting_durable,
            before_pass=settlement.promote_durable,
            settled=settlement.settled_here,
        )
        tracker.on_finished(self._job_finished)
        tracker.on_deletion(self.kept.job_deleting)
        tracker.on_admission(self.admission.job_changed)
        self.last_message_at: float | None = None
        """When the last message arrived (epoch seconds), for the operator's status."""

    def _wire(
        self, *, renderer: Renderer, telemetry: Telemetry, settle_hook: SettleHook | None
    ) -> None:
        """Build the phases, each given only the phases below it."""
        scope, sj = self.scope, self.scope.scaledjob
        self.metrics = DispatchMetrics(
            metrics=telemetry.metrics,
            namespace=sj.namespace,
            scaledjob=sj.name,
            source=scope.source.name,
            active=lambda: len(self.limiter),
            pending_admission=lambda: self.limiter.pending,
        )
        events = JobEvents(scope)
        self.settlement = settlement = Settlement(
            scope=scope,
            events=events,
            metrics=self.metrics,
            settle_hook=settle_hook,
            on_settled=lambda: self.cleaner.trigger(),
        )
        self.intake = intake = Intake(
            scope=scope,
            renderer=renderer,
            settlement=settlement,
            events=events,
            metrics=self.metrics,
        )
        self.admission = Admission(
            scope=scope,
            limiter=self.limiter,
            events=events,
            metrics=self.metrics,
            span_of=lambda name: r.span if (r := intake.inflight.get(name)) else None,
        )
        self.lifecycle = Lifecycle(
            scope=scope,
            intake=intake,
            settlement=settlement,
            limiter=self.limiter,
            events=events,
            metrics=self.metrics,
            admission=self.admission,
        )
        self.kept = KeptCopies(scope=scope, settlement=settlement, in_hand=intake.in_hand)

    @property
    def scaledjob(self) -> ScaledJob:
        return self.scope.scaledjob

    def resize(self, scaledjob: ScaledJob) -> None:
        """Take a new spec whose only changes are limits (``maxReplicaCount``, history):
        applied live, nothing restarted. The caller checks that nothing else changed."""
        spec = scaledjob.spec
        self.scope.scaledjob = scaledjob
        self.limiter.resize(spec.maxReplicaCount, spec.maxPendingAdmission)
        self.cleaner.set_limits(
            successful=spec.successfulJobsHistoryLimit, failed=spec.failedJobsHistoryLimit
        )

    def close(self) -> None:
        """Undo what construction registered: the tracker listener and the metric series
        of this ScaledJob (a replaced unit must leave no second settler or stale series)."""
        self.scope.tracker.remove_listener(self._job_finished)
        self.scope.tracker.remove_deletion_listener(self.kept.job_deleting)
        self.scope.tracker.remove_admission_listener(self.admission.job_changed)
        self.metrics.close()

    async def run(self) -> None:
        """Consume until cancelled; Jobs and unsettled messages are left for the next run."""
        tracker = self.scope.tracker
        await tracker.synced.wait()
        self.limiter.seed(tracker.unfinished(), pending=tracker.pending_admission())
        for state in list(tracker.jobs.values()):
            if state.pending_admission:
                # Told already if the tracker listed them after this dispatcher listened;
                # not if it listed them before (telling twice changes nothing).
                self.admission.job_changed(state, None)
        # Jobs that finished while no dispatcher was watching and whose message was
        # already acked are settled from the copy they keep; Jobs deleted meanwhile
        # wait on their finalizer for this dispatcher.
        for state in list(tracker.jobs.values()):
            if state.outcome is not None:
                self._job_finished(state, state.outcome)
        for state in tracker.deleting():
            self.kept.job_deleting(state)
        async for handle in self.scope.source.deliveries():
            await self._accept(handle)

    async def _accept(self, handle: MessageHandle) -> None:
        """One delivery: in hand (its Job's life in a task of its own), joined to the
        message in hand, or settled at once."""
        self.metrics.received()
        self.last_message_at = time.time()
        admitted = await self.intake.receive(handle)
        if admitted is None:
            return
        rendered, record = admitted
        record.task = self.scope.spawn(
            self.lifecycle.process(rendered, record), name=f"message-{rendered.name}"
        )

    def _job_finished(self, state: JobState, outcome: JobOutcome) -> None:
        """The tracker saw a Job finish: its slot and metrics, a cleanup pass, and a
        message the Job keeps."""
        self.limiter.release(state.name)
        self.admission.forget(state.name)
        self.metrics.finished(state, outcome)
        self.cleaner.trigger()
        self.kept.job_finished(state, outcome)

    async def drain(self, *, grace: float) -> int:
        """Stop taking messages, give in-flight work ``grace`` seconds to settle, then
        cancel it: unsettled messages return to the broker, Jobs keep running. Returns
        how many messages were released unsettled (for the shutdown's summary line)."""
        await self.scope.source.stop_consuming()
        inflight = self.intake.inflight.values()
        undecided = [r.task for r in inflight if r.deciding and r.task is not None]
        for task in undecided:
            # Waiting on a Job or on the API: nothing is decided, so let the message go
            # back to the broker now; the next dispatcher adopts the Job.
            task.cancel()
        await stop_tasks(list(self.scope.side_tasks), grace=grace)
        return len(undecided)
