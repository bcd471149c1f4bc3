"""``operator``: serve the ScaledJobs of the cluster (custom resources), one dispatcher
per ScaledJob, sharing them with the other replicas through Leases; until SIGTERM or
Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from jobrunner.cli.context import Context
from jobrunner.cli.errors import CliError
from jobrunner.cli.stopping import StopSignals

if TYPE_CHECKING:
    from jobrunner.core.settings import OperatorSettings, Settings
    from jobrunner.manifest.triggers import Reach
    from jobrunner.observability.telemetry import Telemetry

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _own_namespace() -> str:
    """The pod's namespace (its service account's), else ``default``."""
    try:
        return _SA_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def cmd_operator(ctx: Context) -> int:
    from jobrunner.core.settings import Executor
    from jobrunner.observability.telemetry import Telemetry, configure_logging, tracer_provider
    from jobrunner.operator.leases import default_identity

    settings = ctx.settings
    op = settings.operator
    if settings.executor is Executor.LOCAL:
        raise CliError(
            "the operator serves ScaledJobs of a cluster; JOBRUNNER_EXECUTOR=local does not apply"
        )
    _apply_flags(ctx, op)
    _check_operator_settings(op)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    ctx.check_kubeconfig()
    identity = op.identity or default_identity(os.environ.get("POD_NAME"), socket.gethostname())
    lease_namespace = op.lease_namespace or _own_namespace()
    endpoint = settings.telemetry.otlp_endpoint or settings.otel_traces_endpoint
    telemetry = Telemetry.create(tracer_provider(otlp_endpoint=endpoint))
    reach = _tenant_reach(op)
    signals = StopSignals()
    try:
        asyncio.run(
            _serve(
                settings,
                telemetry=telemetry,
                identity=identity,
                lease_namespace=lease_namespace,
                reach=reach,
                signals=signals,
            )
        )
    finally:
        if telemetry.provider is not None:
            telemetry.provider.shutdown()
    return signals.exit_code


def _apply_flags(ctx: Context, op: OperatorSettings) -> None:
    """The command's flags over the operator settings: the namespaces watched
    (``--watch-namespace``, ``-n``, ``-A``), the selector, the Leases, the identity, the
    buckets and the KEDA takeover."""
    args = ctx.args
    namespaces = [n for value in args.watch_namespace for n in value.split(",") if n.strip()]
    if ctx.flag("namespace"):
        namespaces.append(ctx.flag("namespace"))
    if args.all_namespaces and namespaces:
        raise CliError("-A (all namespaces) and --watch-namespace/-n exclude each other; give one")
    if namespaces:
        op.watch_namespaces = ",".join(dict.fromkeys(n.strip() for n in namespaces))
    elif args.all_namespaces:
        op.watch_namespaces = ""
    for flag, name in (
        ("selector", "label_selector"),
        ("lease_namespace", "lease_namespace"),
        ("identity", "identity"),
        ("buckets", "buckets"),
    ):
        if getattr(args, flag) is not None:
            setattr(op, name, getattr(args, flag))
    if args.keda_takeover:
        op.keda_takeover = True


def _check_operator_settings(op: OperatorSettings) -> None:
    """Refuse namespaces that are no namespace names, and Lease timings that cannot work
    (a renewal must come before its deadline, the deadline before the Lease ends)."""
    from jobrunner.core.limits import dns1123_label_problem

    for name in [*op.namespaces(), *([op.lease_namespace] if op.lease_namespace else [])]:
        problem = dns1123_label_problem(name, "a namespace")
        if problem:
            raise CliError(f"{problem} (--watch-namespace, --lease-namespace or their settings)")
    if not op.renew_seconds < op.renew_deadline_seconds < op.lease_duration_seconds:
        raise CliError(
            "JOBRUNNER_OPERATOR__RENEW_SECONDS < JOBRUNNER_OPERATOR__RENEW_DEADLINE_SECONDS < "
            f"JOBRUNNER_OPERATOR__LEASE_DURATION_SECONDS must hold (now {op.renew_seconds}, "
            f"{op.renew_deadline_seconds}, {op.lease_duration_seconds})"
        )


def _tenant_reach(op: OperatorSettings) -> Reach:
    """The operator's environment is its owner's, not the tenants': ScaledJobs may read
    only the variables the owner lists, and its cloud identity only where allowed."""
    from jobrunner.manifest.triggers import Reach

    return Reach.for_tenants(
        os.environ,
        allow_env=op.tenant_env_names(),
        operator_identity=op.allow_operator_identity,
    )


async def _serve(
    settings: Settings,
    *,
    telemetry: Telemetry,
    identity: str,
    lease_namespace: str,
    reach: Reach,
    signals: StopSignals,
) -> None:
    """Run the operator against the cluster until SIGTERM or SIGINT (``signals`` says
    which, for the exit code), with its HTTP endpoints (health, readiness, metrics)
    beside it."""
    from jobrunner.core.failpoints import Failpoints
    from jobrunner.kube.client import KubeJobClient, load_api_client
    from jobrunner.kube.objects import KubeObjects
    from jobrunner.operator.operator import Operator, serve_http

    # Signals belong to the program: SIGTERM and SIGINT ask the operator to stop.
    signals.install(asyncio.get_running_loop())
    jobs = KubeJobClient(
        load_api_client(settings.kube.kubeconfig, settings.kube.context),
        failpoints=Failpoints(settings.dispatcher.failpoints),
        read_message_secrets=settings.dispatcher.read_message_secrets,
    )
    try:
        operator = Operator.assemble(
            settings=settings,
            objects=KubeObjects(jobs),
            jobs=jobs,
            telemetry=telemetry,
            identity=identity,
            lease_namespace=lease_namespace,
            reach=reach,
        )
        operator.register_metrics(lambda: jobs.requests)
        async with serve_http(operator, settings, telemetry):
            await operator.run(signals.stop)
    finally:
        await jobs.close()
