"""``run`` (a dispatcher, until SIGTERM or Ctrl-C; SIGHUP or an edit of the file reloads
it: see jobrunner.filemode) and ``publish`` (to the embedded
queue)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING

from jobrunner.cli.context import Context
from jobrunner.cli.errors import CliError
from jobrunner.cli.inputs import (
    FORCE_HINT,
    Body,
    delivery_for,
    parse_headers,
    read_bodies,
    read_lines,
)
from jobrunner.cli.stopping import StopSignals

if TYPE_CHECKING:
    from jobrunner.manifest.loader import ManifestSet
    from jobrunner.manifest.scaledjob import ScaledJob


def cmd_run(ctx: Context) -> int:
    from jobrunner import filemode
    from jobrunner.core.settings import Executor
    from jobrunner.manifest.scaledjob import ManifestError
    from jobrunner.manifest.triggers import Reach
    from jobrunner.observability.telemetry import Telemetry, configure_logging, tracer_provider
    from jobrunner.rendering.renderer import Renderer, template_dirs

    settings = ctx.settings
    # --scaledjob serves one ScaledJob of the file; without it, every one.
    manifests = ctx.manifests.model_copy(update={"scaledjobs": ctx.scaledjobs()})
    configure_logging(settings.log_level, json_lines=settings.log_json)
    ctx.notes()
    for scaledjob in manifests.scaledjobs:  # fail at start, not at the first message
        renderer = Renderer(scaledjob, base_dirs=template_dirs(manifests.path))
        if settings.executor is Executor.LOCAL:
            from jobrunner.local.compat import check_template

            check_template(renderer.template)
    if settings.executor is Executor.KUBERNETES:
        ctx.check_kubeconfig()  # a kubeconfig that is not there said now, in words
    endpoint = settings.telemetry.otlp_endpoint or settings.otel_traces_endpoint
    telemetry = Telemetry.create(tracer_provider(otlp_endpoint=endpoint))

    def load() -> ManifestSet:
        # The file read again as at start (-n applied); a mistake in it is the file's.
        try:
            return ctx.read_manifests()
        except CliError as exc:
            raise ManifestError(str(exc)) from exc

    signals = StopSignals()

    async def serve() -> None:
        # Signals belong to the program, not the runner: SIGTERM and SIGINT ask it to
        # stop (the exit code says which), SIGHUP to read the manifest file again.
        reload = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals.install(loop)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        # The dispatcher is the manifest author's own process: its environment and cloud
        # identity are theirs, so *FromEnv and TriggerAuthentication env read all of it.
        await filemode.run(
            await _cluster_authentications(ctx, manifests),
            settings,
            stop=signals.stop,
            reload=reload,
            load=load,
            telemetry=telemetry,
            reach=Reach.own(os.environ),
        )

    try:
        asyncio.run(serve())
    finally:
        provider = telemetry.provider
        if provider is not None:
            provider.shutdown()
    return signals.exit_code


async def _cluster_authentications(ctx: Context, manifests: ManifestSet) -> ManifestSet:
    """With a cluster, the TriggerAuthentications the file names and does not declare,
    from the ScaledJobs' namespaces (see jobrunner.cli.clusterauth)."""
    from jobrunner.core.settings import Executor

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
    """Publish to the embedded queue what the dispatcher can run: every message is first
    rendered through the ScaledJob's template as ``run`` would render it, so a message
    that would be dead-lettered (not JSON where the template reads ``message.json``, over
    ``maxMessageBytes``, missing a field the template needs) is refused here, with what
    would happen and ``--force`` to publish it anyway."""
    from jobrunner.sources.sqlite import consumer_lock
    from jobrunner.views.queries import embedded_queue, paused_text, publish

    args = ctx.args
    scaledjob = ctx.scaledjobs()[0]
    if args.messages and args.jsonl:
        raise CliError("give MESSAGE... or --jsonl FILE, not both; publish them in two commands")
    bodies = read_bodies(args.messages, force=args.force)
    if args.jsonl:
        bodies.extend(read_lines(args.jsonl, force=args.force))
    if not bodies:
        raise CliError(
            "nothing to publish; give messages, @FILE, - (standard input) or --jsonl FILE"
        )
    if args.message_id and len(bodies) > 1:
        raise CliError("--message-id names one message; publish the others separately")
    headers = parse_headers(args.header)
    if not args.force:
        _check_renders(ctx, scaledjob, bodies, headers=headers)
    queue, path = asyncio.run(
        publish(
            scaledjob,
            ctx.settings,
            [b.data for b in bodies],
            message_id=args.message_id,
            headers=headers,
            content_type=args.content_type,
        )
    )
    print(f"published {len(bodies)} message(s) to queue {queue} ({path})")
    embedded = embedded_queue(scaledjob, ctx.settings)
    lock = consumer_lock(path, queue) if embedded is not None else None
    if lock is not None and lock.live and lock.paused_by is not None:
        print(
            "the dispatcher that serves it is " + paused_text(lock.pid, lock.paused_by),
            file=sys.stderr,
        )
    elif lock is None or not lock.live:
        print(
            "no dispatcher consumes it yet; start one with: "
            + ctx.again("run", *ctx.file_args(), local=True),
            file=sys.stderr,
        )
    return 0


def _check_renders(
    ctx: Context, scaledjob: ScaledJob, bodies: list[Body], *, headers: dict[str, str]
) -> None:
    """Refuse (exit 2) the first message the ScaledJob's template would refuse, before
    any is published: a publish is all or nothing."""
    from jobrunner.rendering.renderer import Renderer, RenderError, template_dirs

    if embedded_trigger(scaledjob) is None:
        return  # publish says, in its own words, that this trigger is not the embedded queue
    renderer = Renderer(
        scaledjob,
        base_dirs=template_dirs(ctx.manifests.path),
        copy_in_job_only=not ctx.settings.dispatcher.read_message_secrets,
    )
    for body in bodies:
        delivery = delivery_for(
            scaledjob,
            body.data,
            message_id=ctx.args.message_id,
            headers=headers,
            content_type=ctx.args.content_type,
        )
        try:
            renderer.render(delivery)
        except RenderError as exc:
            raise CliError(
                f"{body.where}: the template of ScaledJob {scaledjob.name} would refuse it, and "
                f"`run` would dead-letter it with reason {exc.reason} ({exc.detail}); fix the "
                f"message, or {FORCE_HINT}"
            ) from None


def embedded_trigger(scaledjob: ScaledJob) -> str | None:
    trigger = scaledjob.spec.triggers[0]
    return trigger.type if trigger.type == "sqlite" else None
