"""Starts and stops the long-lived tasks of a dispatcher process, and handles signals.

Order at start: list Jobs (tracker synced) before consuming, so redeliveries meet the Jobs
they already have. Order at stop (SIGTERM/SIGINT): stop consuming, give in-flight
settlements a bounded grace, then cancel what is left; running Jobs are left running for
the next dispatcher to adopt; close the broker connection last.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobrunner.config import Executor, ManifestError, ManifestSet, ScaledJob, Settings
from jobrunner.dispatcher import Dispatcher
from jobrunner.httpserver import Heartbeat, HttpEndpoints
from jobrunner.kube.client import KubeJobClient, load_api_client
from jobrunner.local.client import LocalJobClient
from jobrunner.models import LABEL_MANAGED_BY, LABEL_SCALEDJOB, MANAGED_BY
from jobrunner.rendering import Renderer
from jobrunner.sources.kafka import KafkaSource
from jobrunner.sources.rabbitmq import RabbitMQSource
from jobrunner.sources.sqlite import SQLiteSource
from jobrunner.tasks import start_guarded, stop_tasks
from jobrunner.telemetry import Telemetry
from jobrunner.timestamps import age_seconds
from jobrunner.tracker import JobTracker
from jobrunner.triggers import SecretReader, resolve_kafka, resolve_rabbitmq, resolve_sqlite

logger = logging.getLogger(__name__)


def template_dirs(manifest_path: Path) -> list[Path]:
    return [
        manifest_path.parent,
        manifest_path.parent / "job_templates",
        Path.cwd() / "job_templates",
    ]


def selector_for(scaledjob: ScaledJob) -> str:
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_SCALEDJOB}={scaledjob.name}"


@dataclass
class Running:
    dispatcher: Dispatcher
    source: Source
    tracker: JobTracker
    queue: str
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    depth: int | None = None
    """Messages waiting, as last sampled."""


Source = RabbitMQSource | KafkaSource | SQLiteSource
Jobs = KubeJobClient | LocalJobClient
SOURCE_TYPES = ("rabbitmq", "kafka", "sqlite")


def job_client(settings: Settings) -> Jobs:
    """Where Jobs run: the cluster (the default) or this machine (``--local``)."""
    if settings.executor is Executor.LOCAL:
        return LocalJobClient(
            settings.local.state_dir,
            poll_interval=settings.local.poll_interval_seconds,
            retry_seconds=settings.local.retry_seconds,
        )
    return KubeJobClient(load_api_client(settings.kube.kubeconfig, settings.kube.context))


async def _build_source(
    scaledjob: ScaledJob,
    manifests: ManifestSet,
    read_secret: SecretReader,
    settings: Settings,
) -> tuple[Source, str]:
    """The source for the ScaledJob's (first) trigger, and the queue or topic it reads."""
    trigger = scaledjob.spec.triggers[0]
    spec = scaledjob.spec
    if trigger.type == "sqlite":
        embedded = resolve_sqlite(scaledjob, trigger, settings.local.state_dir)
        return SQLiteSource(
            path=embedded.path,
            queue=embedded.queue,
            prefetch=spec.maxReplicaCount,
            dead_letter_queue=spec.deadLetter.queue,
            scaledjob=scaledjob.name,
        ), embedded.queue
    if trigger.type == "rabbitmq":
        rabbit = await resolve_rabbitmq(scaledjob, trigger, manifests.authentications, read_secret)
        return RabbitMQSource(
            url=rabbit.url,
            queue=rabbit.queue,
            prefetch=spec.maxReplicaCount,
            dead_letter_exchange=spec.deadLetter.exchange,
            dead_letter_routing_key=spec.deadLetter.routingKey,
            dead_letter_queue=spec.deadLetter.queue,
            scaledjob=scaledjob.name,
        ), rabbit.queue
    if trigger.type == "kafka":
        kafka = await resolve_kafka(scaledjob, trigger, manifests.authentications, read_secret)
        return KafkaSource(
            bootstrap_servers=kafka.bootstrap_servers,
            topic=kafka.topic,
            group_id=kafka.group_id,
            offset_reset=kafka.offset_reset,
            max_in_hand=spec.maxReplicaCount,
            dead_letter_topic=spec.deadLetter.topic or f"{kafka.topic}.dead-letter",
            per_key_ordering=spec.ordering == "perKey",
            client_options=kafka.client_options,
            consumer_options=settings.kafka.model_dump(),
            scaledjob=scaledjob.name,
        ), kafka.topic
    raise ManifestError(
        f"{manifests.path}: ScaledJob {scaledjob.name}: field spec.triggers[0].type: "
        f"{trigger.type!r} is not supported; use one of {', '.join(SOURCE_TYPES)} "
        "(sqlite is the embedded queue, for running without a broker)"
    )


async def _start_source(source: Source, *, stop: asyncio.Event) -> None:
    """Connect, retrying with backoff while the broker is down (an outage at start is
    no reason to exit); aio-pika's robust connection handles later outages."""
    delay = 0.5
    while not stop.is_set():
        try:
            await source.start()
            return
        except (ConnectionError, OSError) as exc:
            logger.warning("%s not reachable (%s); retrying in %.1fs", source.name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _sample_depth(item: Running, telemetry: Telemetry, interval: float) -> None:
    name = item.dispatcher.scaledjob.name
    gauge = telemetry.metrics.queue_depth.labels(name, item.queue)
    while True:
        item.depth = await item.source.depth()
        if item.depth is not None:
            gauge.set(item.depth)
        if isinstance(item.source, KafkaSource):
            for partition, lag in (await item.source.partition_lag()).items():
                telemetry.metrics.consumer_lag.labels(name, item.queue, partition).set(lag)
        await asyncio.sleep(interval)


async def _report_progress(item: Running, interval: float) -> None:
    """A line every ``interval`` seconds while Jobs run (nothing while idle)."""
    name = item.dispatcher.scaledjob.name
    while True:
        await asyncio.sleep(interval)
        running = [s for s in item.tracker.jobs.values() if s.outcome is None]
        if not running:
            continue
        oldest = max(running, key=lambda s: age_seconds(s.created))
        logger.info(
            "%s: %d Job(s) running (the longest, %s, for %.0fs); %s message(s) waiting",
            name,
            len(running),
            oldest.name,
            age_seconds(oldest.created),
            "?" if item.depth is None else item.depth,
        )


async def _beat(heartbeat: Heartbeat) -> None:
    while True:
        heartbeat.beat()
        await asyncio.sleep(1.0)


def _readiness(running: list[Running]) -> tuple[bool, str]:
    problems = []
    for item in running:
        name = item.dispatcher.scaledjob.name
        if not item.source.connected:
            problems.append(f"{name}: broker not connected")
        if not item.tracker.synced.is_set():
            problems.append(f"{name}: Job watch not in sync")
    if not running:
        problems.append("starting")
    return (not problems, "; ".join(problems) or "ready")


async def run(
    manifests: ManifestSet,
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    jobs = job_client(settings)
    running: list[Running] = []
    telemetry = telemetry or Telemetry.create()
    heartbeat = Heartbeat()
    http: HttpEndpoints | None = None
    background = [start_guarded(_beat(heartbeat), name="heartbeat")]
    if settings.telemetry.http_port is not None:
        http = HttpEndpoints(
            registry=telemetry.metrics.registry,
            heartbeat=heartbeat,
            ready=lambda: _readiness(running),
        )
        http.start(settings.telemetry.http_host, settings.telemetry.http_port)
    try:
        for scaledjob in manifests.scaledjobs:
            renderer = Renderer(scaledjob, base_dirs=template_dirs(manifests.path))
            source, queue = await _build_source(
                scaledjob,
                manifests,
                lambda ns, name: jobs.read_secret(ns, name),
                settings,
            )
            tracker = JobTracker(
                client=jobs,
                namespace=scaledjob.namespace,
                selector=selector_for(scaledjob),
                backoff_ceiling=settings.kube.api_retry_max_seconds,
            )
            dispatcher = Dispatcher(
                scaledjob=scaledjob,
                renderer=renderer,
                source=source,
                jobs=jobs,
                tracker=tracker,
                settings=settings.dispatcher,
                telemetry=telemetry,
                retry_ceiling=settings.kube.api_retry_max_seconds,
            )
            item = Running(dispatcher=dispatcher, source=source, tracker=tracker, queue=queue)
            running.append(item)
            item.tasks.append(start_guarded(tracker.run(), name=f"tracker-{scaledjob.name}"))
            item.tasks.append(
                start_guarded(dispatcher.cleaner.run(), name=f"cleanup-{scaledjob.name}")
            )
        for item in running:
            await _start_source(item.source, stop=stop)
            item.tasks.append(
                start_guarded(
                    item.dispatcher.run(), name=f"dispatch-{item.dispatcher.scaledjob.name}"
                )
            )
            logger.info("dispatching %s from queue %s", item.dispatcher.scaledjob.name, item.queue)
            item.tasks.append(
                start_guarded(
                    _sample_depth(item, telemetry, settings.telemetry.queue_depth_interval_seconds),
                    name=f"queue-depth-{item.dispatcher.scaledjob.name}",
                )
            )
            item.tasks.append(
                start_guarded(
                    _report_progress(item, settings.dispatcher.progress_log_seconds),
                    name=f"progress-{item.dispatcher.scaledjob.name}",
                )
            )
        root_tasks = [t for item in running for t in item.tasks]
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *root_tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        logger.info("stopping: no new messages; settling what can be settled")
    finally:
        grace = settings.dispatcher.shutdown_grace_seconds
        await asyncio.gather(
            *(item.dispatcher.drain(grace=grace) for item in running), return_exceptions=True
        )
        await stop_tasks([t for item in running for t in item.tasks], grace=0)
        for item in running:
            try:
                await item.source.close()
            except Exception as exc:
                logger.warning("closing the %s connection failed: %s", item.source.name, exc)
        await stop_tasks(background, grace=0)
        if http is not None:
            http.stop()
        await jobs.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logger.info("stopped")
