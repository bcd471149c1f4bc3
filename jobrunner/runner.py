"""Starts and stops the long-lived work of a dispatcher process: one ``DispatchUnit`` per
ScaledJob, each owning its tasks (Job watch, cleanup, connect-and-dispatch, samplers).

Order in a unit: list Jobs (tracker synced) before consuming, so redeliveries meet the
Jobs they already have. Units start independently: a broker that is down, or a queue
that does not exist yet, keeps only its own ScaledJob waiting (one clear line per retry,
and ``/readyz`` says why) while the others work. Order at stop: stop consuming, give
in-flight settlements a bounded grace, then cancel what is left; running Jobs are left
running for the next dispatcher to adopt; close the broker connection last. Signals are
the caller's business.

Who runs units: the operator's registry (jobrunner.operator.registry), for custom
resources (jobrunner.operator) and for the ScaledJobs of a manifest file alike
(jobrunner.filemode).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jobrunner.core.failpoints import Failpoints
from jobrunner.core.marks import JobMarks
from jobrunner.core.models import LABEL_MANAGED_BY, LABEL_SCALEDJOB, MANAGED_BY
from jobrunner.core.protocols import (
    AnswersSenders,
    CarriesOutputs,
    JobClient,
    MessageSink,
    MessageSource,
    SendsReplies,
    SourceError,
    TokenReviewer,
)
from jobrunner.core.redaction import describe_error, redact
from jobrunner.core.settings import Executor, Settings
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.core.timestamps import age_seconds
from jobrunner.dispatch.dispatcher import Dispatcher
from jobrunner.dispatch.hooks import chain
from jobrunner.dispatch.outputs import FunctionResults
from jobrunner.dispatch.replies import Replies
from jobrunner.manifest.loader import ManifestSet
from jobrunner.manifest.scaledjob import ScaledJob, TriggerAuthentication
from jobrunner.manifest.triggers import (
    FileSecrets,
    Reach,
    ResolveContext,
    SecretReader,
    TriggerType,
    resolve_trigger,
)
from jobrunner.observability.telemetry import Telemetry
from jobrunner.rendering.renderer import Renderer, template_dirs
from jobrunner.rendering.sandbox.pool import RenderPool
from jobrunner.tracking.status import job_status
from jobrunner.tracking.tracker import JobTracker

logger = logging.getLogger(__name__)

__all__ = [
    "DispatchUnit",
    "SourceOpener",
    "job_client",
    "load_source",
    "selector_for",
    "template_dirs",
]


STARTING = "starting"
"""A DispatchUnit's ``problem`` before its source was first tried."""


def selector_for(scaledjob: ScaledJob) -> str:
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_SCALEDJOB}={scaledjob.name}"


class ClosableJobClient(JobClient, Protocol):
    async def close(self) -> None: ...


def job_client(settings: Settings) -> ClosableJobClient:
    """Where Jobs run: the cluster (the default) or this machine (``--local``). Each
    executor is imported only when chosen."""
    if settings.executor is Executor.LOCAL:
        from jobrunner.local.client import LocalJobClient

        return LocalJobClient(
            settings.local.state_dir,
            poll_interval=settings.local.poll_interval_seconds,
            retry_seconds=settings.local.retry_seconds,
            failpoints=Failpoints(settings.dispatcher.failpoints),
        )
    from jobrunner.kube.client import KubeJobClient, load_api_client

    return KubeJobClient(
        load_api_client(settings.kube.kubeconfig, settings.kube.context),
        failpoints=Failpoints(settings.dispatcher.failpoints),
        read_message_secrets=settings.dispatcher.read_message_secrets,
    )


@runtime_checkable
class ReportsLag(Protocol):
    """A source that can tell its lag per partition (Kafka)."""

    async def partition_lag(self) -> dict[str, int]: ...


SourceOpener = Callable[[TriggerType, Any, ScaledJob, Settings], MessageSource]
"""Makes the source of a resolved trigger: (type, resolved settings, ScaledJob, settings)."""


def load_source(kind: TriggerType, resolved: Any, scaledjob: ScaledJob, settings: Settings) -> Any:
    """The source for a resolved trigger, from the factory its type names."""
    module, _, function = kind.source.partition(":")
    factory = getattr(importlib.import_module(module), function)
    return factory(resolved, scaledjob=scaledjob, settings=settings)


def load_sink(kind: TriggerType, resolved: Any, settings: Settings) -> MessageSink:
    """A publisher to a resolved destination, from the factory its type names."""
    module, _, function = kind.sink.partition(":")
    factory = getattr(importlib.import_module(module), function)
    sink: MessageSink = factory(resolved, settings=settings)
    return sink


async def function_results(
    scaledjob: ScaledJob,
    context: ResolveContext,
    jobs: JobClient,
    settings: Settings,
    marks: JobMarks | None = None,
) -> FunctionResults | None:
    """The settle hook of a ScaledJob that runs a function (``spec.function``), its
    output destinations resolved like triggers; None for any other ScaledJob."""
    function = scaledjob.spec.function
    if function is None:
        return None
    sinks: dict[str, MessageSink] = {}
    for output in function.outputs:
        kind, resolved = await resolve_trigger(replace(context, trigger=output.as_trigger()))
        sinks[output.name] = load_sink(kind, resolved, settings)
    return FunctionResults(
        jobs=jobs,
        namespace=scaledjob.namespace,
        function=function.name,
        sinks=sinks,
        marks=marks,
        failpoints=Failpoints(settings.dispatcher.failpoints),
        retry_ceiling=settings.kube.api_retry_max_seconds,
    )


@dataclass(frozen=True)
class Left:
    """What a unit's stop left behind: Jobs still running, messages released unsettled."""

    running: int = 0
    released: int = 0


@dataclass
class DispatchUnit:
    """Everything that serves one ScaledJob; ``start`` spawns its tasks, ``stop`` ends
    them in order and unregisters what it registered."""

    scaledjob: ScaledJob
    dispatcher: Dispatcher
    source: MessageSource
    tracker: JobTracker
    kind: TriggerType
    destination: str
    """The queue, topic... it consumes, for logs and the depth gauge."""
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    depth: int | None = None
    """Messages waiting, as last sampled."""
    problem: str | None = STARTING
    """Why the unit is not consuming now (None when it is), for /readyz and logs;
    ``STARTING`` until its first connection is tried (not a problem, only a state)."""
    capacity: int = 0
    """The ``maxReplicaCount`` the source was opened with (its prefetch): the most a
    live resize can grant."""
    results: FunctionResults | None = None
    """A function's outputs and errors, settled with its messages (spec.function)."""
    left: Left = field(default_factory=Left)
    """What ``stop`` left behind, for the shutdown's summary line."""

    @property
    def name(self) -> str:
        return self.scaledjob.name

    @classmethod
    async def build(
        cls,
        scaledjob: ScaledJob,
        *,
        manifests: ManifestSet,
        jobs: JobClient,
        settings: Settings,
        telemetry: Telemetry,
        reach: Reach,
        renders: RenderPool | None = None,
    ) -> DispatchUnit:
        """A unit for a ScaledJob of a manifest file: its TriggerAuthentications and
        Secrets may be in the file, templates beside it; ``reach``: what its triggers
        may use of this process (``Reach.own(os.environ)`` for ``jobrunner run``: the
        user's own). ManifestError on any mistake."""
        return await cls.create(
            scaledjob,
            jobs=jobs,
            settings=settings,
            telemetry=telemetry,
            authentications=manifests.authentications,
            read_secret=FileSecrets(jobs.read_secret, manifests.secrets),
            base_dirs=template_dirs(manifests.path),
            reach=reach,
            renders=renders,
        )

    @classmethod
    async def create(
        cls,
        scaledjob: ScaledJob,
        *,
        jobs: JobClient,
        settings: Settings,
        telemetry: Telemetry,
        authentications: Mapping[str, TriggerAuthentication],
        read_secret: SecretReader,
        base_dirs: list[Path],
        reach: Reach,
        open_source: SourceOpener | None = None,
        renders: RenderPool | None = None,
    ) -> DispatchUnit:
        """Render templates and resolve the trigger (reading Secrets through ``read_secret``,
        environment variables and the process's cloud identity only as far as ``reach``
        allows: a tenant's ScaledJob under the operator gets ``Reach.for_tenants``);
        ManifestError on any mistake in the ScaledJob. ``open_source`` makes the source for
        the resolved trigger (default: the factory its type names; tests pass
        ``jobrunner.testing``'s memory source). ``renders``: the process's render workers
        (None: in this process, without time or memory limits; for tests)."""
        renderer = await _renderer(scaledjob, settings, base_dirs=base_dirs, renders=renders)
        context = ResolveContext(
            scaledjob=scaledjob,
            trigger=scaledjob.spec.triggers[0],
            authentications=authentications,
            read_secret=read_secret,
            state_dir=settings.local.state_dir,
            reach=reach,
        )
        kind, resolved = await resolve_trigger(context)
        source = (open_source or load_source)(kind, resolved, scaledjob, settings)
        marks = _job_marks(scaledjob, jobs, settings)
        results = await function_results(scaledjob, context, jobs, settings, marks)
        if results is not None and isinstance(source, CarriesOutputs):
            results.carrier = source  # its outputs go in the settle transaction
        tracker = _tracker(scaledjob, jobs, settings, marks, answering=source)
        dispatcher = Dispatcher(
            scaledjob=scaledjob,
            renderer=renderer,
            source=source,
            jobs=jobs,
            tracker=tracker,
            settings=settings.dispatcher,
            telemetry=telemetry,
            retry_ceiling=settings.kube.api_retry_max_seconds,
            settle_hook=chain(results, _replies(scaledjob, source, jobs, settings, marks)),
            marks=marks,
        )
        destination = getattr(resolved, kind.destination, None) or getattr(resolved, "queue", "")
        return cls(
            scaledjob=scaledjob,
            dispatcher=dispatcher,
            source=source,
            tracker=tracker,
            kind=kind,
            destination=str(destination),
            capacity=scaledjob.spec.maxReplicaCount,
            results=results,
        )

    def resize(self, scaledjob: ScaledJob) -> bool:
        """Apply a new spec that differs only in its limits, live: True when done. False
        when the new ``maxReplicaCount`` is above what the source was opened with (its
        prefetch, which a broker fixes per consumer): the unit must be replaced."""
        if scaledjob.spec.maxReplicaCount > self.capacity:
            return False
        self.scaledjob = scaledjob
        self.dispatcher.resize(scaledjob)
        return True

    def start(self, *, settings: Settings, telemetry: Telemetry) -> None:
        name = self.name
        self.tasks += [
            start_guarded(self.tracker.run(), name=f"tracker-{name}"),
            start_guarded(self.dispatcher.cleaner.run(), name=f"cleanup-{name}"),
            start_guarded(
                self.dispatcher.admission.run(), name=f"admission-{name}", essential=False
            ),
            start_guarded(self._connect_and_dispatch(), name=f"dispatch-{name}"),
            start_guarded(
                self._sample_depth(telemetry, settings.telemetry.queue_depth_interval_seconds),
                name=f"queue-depth-{name}",
                essential=False,
            ),
            start_guarded(
                self._report_progress(settings.dispatcher.progress_log_seconds),
                name=f"progress-{name}",
                essential=False,
            ),
        ]

    async def _connect_and_dispatch(self) -> None:
        await self._connect()
        logger.info(
            "dispatching %s from %s %s",
            self.name,
            self.kind.destination,
            self.destination,
            extra={"scaledjob": self.name, "source": self.source.name},
        )
        await self.dispatcher.run()

    async def _connect(self) -> None:
        """Connect, retrying with backoff while the broker is down or the queue missing
        (neither is a reason to exit: both get fixed while we wait). One line per try."""
        delay = 0.5
        while True:
            try:
                await self.source.start()
                self.problem = None
                return
            except (SourceError, ConnectionError, OSError) as exc:
                # In jobrunner's words: the text goes to /readyz and the ScaledJob's
                # status, and must not carry a server's answer or a credential.
                self.problem = describe_error(exc)
                logger.warning(
                    "%s: %s%s retrying in %.0fs",
                    self.name,
                    self.problem,
                    " —" if self.problem.endswith("?") else ";",
                    delay,
                    extra={"scaledjob": self.name, "source": self.source.name},
                )
                # A half-open connection must not linger into the next try.
                await self.source.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _sample_depth(self, telemetry: Telemetry, interval: float) -> None:
        """Samples the queue's depth (and Kafka's lag per partition) into the gauges
        until cancelled; then removes this unit's series, so a ScaledJob deleted or
        moved to another replica leaves no stale figure behind. While the depth is not
        known (not connected yet, the queue missing or deleted) the series is absent,
        never 0: an empty queue and one that does not exist must not look alike."""
        metrics = telemetry.metrics
        # /metrics is unauthenticated: a queue URL's credentials never reach a label.
        series = (self.scaledjob.namespace, self.name, redact(self.destination))
        partitions: set[str] = set()
        try:
            while True:
                self.depth = await self.source.depth() if self.problem is None else None
                if self.depth is not None:
                    metrics.queue_depth.labels(*series).set(self.depth)
                else:
                    with contextlib.suppress(KeyError):
                        metrics.queue_depth.remove(*series)
                if self.problem is None and isinstance(self.source, ReportsLag):
                    for partition, lag in (await self.source.partition_lag()).items():
                        metrics.consumer_lag.labels(*series, partition).set(lag)
                        partitions.add(partition)
                # Not connected yet (or not now): look again soon, without asking the
                # broker, so the first figure follows the connection, not the interval.
                await asyncio.sleep(interval if self.problem is None else min(interval, 0.5))
        finally:
            with contextlib.suppress(KeyError):
                metrics.queue_depth.remove(*series)
            for partition in partitions:
                with contextlib.suppress(KeyError):
                    metrics.consumer_lag.remove(*series, partition)

    async def _report_progress(self, interval: float) -> None:
        """A line every ``interval`` seconds while Jobs run (nothing while idle). The
        queue's depth is read afresh for it: the gauge's sample may be up to
        ``queue_depth_interval_seconds`` old, or not taken yet."""
        while True:
            await asyncio.sleep(interval)
            running = [s for s in self.tracker.jobs.values() if s.outcome is None]
            if not running:
                continue
            if self.problem is None:
                # On a failure the last sample will do; the connection's task says why.
                with contextlib.suppress(SourceError, ConnectionError, OSError):
                    self.depth = await self.source.depth()
            oldest = max(running, key=lambda s: age_seconds(s.created))
            logger.info(
                "%s: %d Job(s) running (the longest, %s, for %.0fs); %s",
                self.name,
                len(running),
                oldest.name,
                age_seconds(oldest.created),
                waiting_text(self.dispatcher.limiter.waiting, self.depth),
                extra={"scaledjob": self.name, "source": self.source.name},
            )

    def readiness(self) -> str | None:
        """None when ready, else why not: ``<scaledjob>: <why>`` in jobrunner's words
        (sources build their problems with jobrunner.core.redaction; ``redact`` is the net)."""
        problem = self.problem or getattr(self.source, "problem", None)
        if problem is not None:
            return f"{self.name}: {redact(problem)}"
        if not self.source.connected:
            return f"{self.name}: broker not connected"
        if not self.tracker.synced.is_set():
            return f"{self.name}: Job watch not in sync"
        return None

    async def stop(self, *, grace: float) -> None:
        """Stop consuming, settle what is decided within ``grace`` seconds, then end the
        unit's tasks and close its source. Running Jobs are left running; how many, and
        how many messages went back to the source unsettled, is kept in ``left``."""
        try:
            released = await self.dispatcher.drain(grace=grace)
            self.left = Left(running=len(self.tracker.unfinished()), released=released)
        finally:
            await stop_tasks(self.tasks, grace=0)
            self.dispatcher.close()
            try:
                await self.source.close()
            except Exception as exc:
                logger.warning(
                    "closing the %s connection failed: %s", self.source.name, describe_error(exc)
                )
            if self.results is not None:
                await self.results.close()


async def _renderer(
    scaledjob: ScaledJob,
    settings: Settings,
    *,
    base_dirs: list[Path],
    renders: RenderPool | None,
) -> Renderer:
    """The unit's renderer, its templates parsed off the event loop that every ScaledJob
    shares: parsing a large template takes a while (see rendering.TEMPLATE_SOURCE_MAX)."""
    return await asyncio.to_thread(
        functools.partial(
            Renderer,
            scaledjob,
            base_dirs=base_dirs,
            pool=renders,
            copy_in_job_only=not settings.dispatcher.read_message_secrets,
        )
    )


def _job_marks(scaledjob: ScaledJob, jobs: JobClient, settings: Settings) -> JobMarks | None:
    """For a function's ScaledJob, the marks its pods may put on Jobs, authenticated
    (jobrunner.core.marks) when this dispatcher may read message Secrets; None for
    any other ScaledJob."""
    if scaledjob.spec.function is None:
        return None
    reads = settings.dispatcher.read_message_secrets
    marks = JobMarks(jobs=jobs, namespace=scaledjob.namespace, reads_secrets=reads)
    if not reads:
        logger.warning(
            "%s: this dispatcher may not read message Secrets, so the function "
            "results on its Jobs are not checked against their keys; only an "
            "admission policy (the chart's invokerPolicy, or functions import's "
            "<app>-policy.yaml) keeps other pods from writing them",
            scaledjob.name,
            extra={"scaledjob": scaledjob.name},
        )
    return marks


def _replies(
    scaledjob: ScaledJob,
    source: object,
    jobs: JobClient,
    settings: Settings,
    marks: JobMarks | None,
) -> Replies | None:
    """Results back to the producer (jobrunner.dispatch.replies), for a source that can
    answer on its own connection (RabbitMQ, Kafka); asked after a function's outputs."""
    if not isinstance(source, SendsReplies):
        return None
    return Replies(
        jobs=jobs,
        namespace=scaledjob.namespace,
        scaledjob=scaledjob.name,
        source=source,
        secret_first=marks is not None and marks.reads_secrets,
        retry_ceiling=settings.kube.api_retry_max_seconds,
        failpoints=Failpoints(settings.dispatcher.failpoints),
    )


def _bind_answers(source: Any, *, jobs: JobClient, tracker: JobTracker, namespace: str) -> None:
    """A source that answers its senders (the HTTP trigger) reads their Jobs' status
    through the tracker, and checks ServiceAccount tokens through the API server when
    the executor can (the local executor cannot: ``auth: tokenReview`` is then refused
    by the first request with 503)."""
    if isinstance(source, AnswersSenders):
        source.bind_job_status(
            functools.partial(job_status, jobs=jobs, tracker=tracker, namespace=namespace)
        )
        if isinstance(jobs, TokenReviewer):
            source.bind_token_reviewer(jobs)


def _tracker(
    scaledjob: ScaledJob,
    jobs: JobClient,
    settings: Settings,
    marks: JobMarks | None,
    *,
    answering: Any = None,
) -> JobTracker:
    """The tracker of the ScaledJob's Jobs (those its selector labels); a source that
    answers its senders (``answering``) reads their Jobs' status through it."""
    tracker = JobTracker(
        client=jobs,
        namespace=scaledjob.namespace,
        selector=selector_for(scaledjob),
        backoff_ceiling=settings.kube.api_retry_max_seconds,
        marks=marks,
    )
    _bind_answers(answering, jobs=jobs, tracker=tracker, namespace=scaledjob.namespace)
    return tracker


def waiting_text(in_hand: int, depth: int | None) -> str:
    """The progress line's count of messages waiting: those in hand for a free slot
    (``maxReplicaCount`` reached) and those still in the queue (``depth``, as last
    sampled; None when the source cannot tell). The queue's depth alone left out the
    ones in hand, which the broker counts as delivered: "0 waiting" while one waited."""
    queued = "an unknown number" if depth is None else str(depth)
    total = "?" if depth is None else str(in_hand + depth)
    return f"{total} message(s) waiting ({in_hand} in hand for a free slot, {queued} in the queue)"


def shutdown_summary(units: list[DispatchUnit], executor: Executor) -> str:
    """The last line of a dispatcher: how many Jobs were left running (by design: Jobs
    outlive their dispatcher, on a cluster and as local processes alike) and how many
    messages went back to the source unsettled, and what becomes of them."""
    running = sum(u.left.running for u in units)
    released = sum(u.left.released for u in units)
    if executor is Executor.LOCAL:
        where = "processes of their own, they run on"
    else:
        where = "they run on in the cluster"
    jobs = f"{running} Job(s) left running ({where}; the next dispatcher adopts them)"
    if not running:
        jobs = "no Job left running"
    messages = f"{released} message(s) released unsettled to the source, to be delivered again"
    if released and running:
        messages += " and join their Jobs"
    return f"{jobs}; {messages}"
