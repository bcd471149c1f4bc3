"""``run`` (a dispatcher, until SIGTERM or Ctrl-C) and ``publish`` (to the embedded
queue)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from jobrunner.cli.context import Context
from jobrunner.cli.errors import CliError
from jobrunner.cli.inputs import parse_headers, read_lines, read_message
from jobrunner.config import ManifestSet


def cmd_run(ctx: Context) -> int:
    from jobrunner import runner
    from jobrunner.config import Executor
    from jobrunner.rendering import Renderer, template_dirs
    from jobrunner.telemetry import Telemetry, configure_logging, tracer_provider
    from jobrunner.triggers import Reach

    settings = ctx.settings
    manifests = ctx.manifests
    configure_logging(settings.log_level, json_lines=settings.log_json)
    ctx.notes()
    for scaledjob in manifests.scaledjobs:  # fail at start, not at the first message
        Renderer(scaledjob, base_dirs=template_dirs(manifests.path))
    if settings.executor is Executor.KUBERNETES:
        ctx.check_kubeconfig()  # a kubeconfig that is not there said now, in words
    endpoint = settings.telemetry.otlp_endpoint or settings.otel_traces_endpoint
    telemetry = Telemetry.create(tracer_provider(otlp_endpoint=endpoint))

    async def serve() -> None:
        # Signals belong to the program, not the runner: SIGTERM and SIGINT ask it to stop.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # The dispatcher is the manifest author's own process: its environment and cloud
        # identity are theirs, so *FromEnv and TriggerAuthentication env read all of it.
        await runner.run(
            await _cluster_authentications(ctx, manifests),
            settings,
            stop=stop,
            telemetry=telemetry,
            reach=Reach.own(os.environ),
        )

    try:
        asyncio.run(serve())
    finally:
        provider = telemetry.provider
        if provider is not None:
            provider.shutdown()
    return 0


async def _cluster_authentications(ctx: Context, manifests: ManifestSet) -> ManifestSet:
    """With a cluster, the TriggerAuthentications the file names and does not declare,
    from the ScaledJobs' namespaces (see jobrunner.cli.clusterauth)."""
    from jobrunner.config import Executor

    wanted = {
        t.authenticationRef.name
        for s in manifests.scaledjobs
        for t in s.spec.triggers
        if t.authenticationRef is not None
    }
    if ctx.settings.executor is Executor.LOCAL or wanted <= set(manifests.authentications):
        return manifests
    from jobrunner.cli.clusterauth import with_cluster_authentications
    from jobrunner.kube.client import KubeJobClient, load_api_client

    kube = ctx.settings.kube
    jobs = KubeJobClient(load_api_client(kube.kubeconfig, kube.context))
    try:
        return await with_cluster_authentications(manifests, jobs)
    finally:
        await jobs.close()


def cmd_publish(ctx: Context) -> int:
    from jobrunner.sources.sqlite import consumer_lock
    from jobrunner.views import embedded_queue, publish

    args = ctx.args
    scaledjob = ctx.scaledjobs()[0]
    bodies = [read_message(m) for m in args.messages]
    if args.jsonl:
        bodies.extend(read_lines(args.jsonl))
    if not bodies:
        raise CliError(
            "nothing to publish; give messages, @FILE, - (standard input) or --jsonl FILE"
        )
    if args.message_id and len(bodies) > 1:
        raise CliError("--message-id names one message; publish the others separately")
    queue, path = asyncio.run(
        publish(
            scaledjob,
            ctx.settings,
            bodies,
            message_id=args.message_id,
            headers=parse_headers(args.header),
            content_type=args.content_type,
        )
    )
    print(f"published {len(bodies)} message(s) to queue {queue} ({path})")
    embedded = embedded_queue(scaledjob, ctx.settings)
    lock = consumer_lock(path, queue) if embedded is not None else None
    if lock is None or not lock.live:
        print(
            "no dispatcher consumes it yet; start one with: "
            + ctx.again("run", *ctx.file_args(), local=True),
            file=sys.stderr,
        )
    return 0
