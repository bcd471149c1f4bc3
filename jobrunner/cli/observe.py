"""``status``, ``jobs`` and ``logs``: what the dispatcher did and is doing, on the cluster
or on this machine (``--local``)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import yaml

from jobrunner.cli.context import Context
from jobrunner.cli.errors import USAGE, CliError
from jobrunner.core.settings import Executor
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.views.console import finished_rows
from jobrunner.views.queries import (
    LocalLogs,
    history_renderable,
    job_rows,
    make_console,
    print_local_logs,
    refresh,
    status_of,
    where,
)


def _emit(value: Any, output: str, *, stream: bool = False) -> None:
    """A value as JSON or YAML; ``stream``: one document of a sequence (a JSON line, or a
    YAML document after ``---``)."""
    if output == "json":
        print(json.dumps(value, separators=(",", ":")) if stream else json.dumps(value, indent=2))
    else:
        if stream:
            print("---")
        print(yaml.safe_dump(value, sort_keys=False), end="")
    sys.stdout.flush()


def _local_checks(ctx: Context) -> None:
    if ctx.settings.executor is Executor.LOCAL or any(
        s.spec.triggers[0].type == "sqlite" for s in ctx.scaledjobs()
    ):
        ctx.warn_if_no_state()


def cmd_status(ctx: Context) -> int:
    args = ctx.args
    settings = ctx.settings
    scaledjobs = ctx.scaledjobs()
    client = ctx.job_client()
    _local_checks(ctx)
    local = settings.executor is Executor.LOCAL

    def start(scaledjob: ScaledJob) -> str:
        return ctx.again("run", "-f", args.file, local=local)

    async def main() -> None:
        try:
            if args.output in ("json", "yaml"):
                while True:
                    found = await status_of(client, scaledjobs, settings, start_hint=start)
                    _emit([s.as_dict() for s in found], args.output, stream=args.watch)
                    if not args.watch:
                        return
                    await asyncio.sleep(args.interval)

            async def view() -> Any:
                from rich.console import Group

                found = await status_of(client, scaledjobs, settings, start_hint=start)
                return Group(*(s.renderable(wide=args.output == "wide") for s in found))

            console = make_console(wide=args.output == "wide")
            await refresh(console, view, interval=args.interval, watching=args.watch)
        finally:
            await client.close()

    asyncio.run(main())
    return 0


def cmd_jobs(ctx: Context) -> int:
    args = ctx.args
    settings = ctx.settings
    scaledjobs = ctx.scaledjobs()
    client = ctx.job_client()
    _local_checks(ctx)

    async def collect() -> list[tuple[ScaledJob, Any]]:
        try:
            return [(s, await job_rows(client, s, finished_limit=args.limit)) for s in scaledjobs]
        finally:
            await client.close()

    found = asyncio.run(collect())
    if args.output in ("json", "yaml"):
        items = [
            {"scaledjob": s.name, "namespace": s.namespace, **row.as_dict()}
            for s, rows in found
            for row in finished_rows(rows, args.limit)
        ]
        _emit(items, args.output)
        return 0
    console = make_console(wide=args.output == "wide")
    for scaledjob, rows in found:
        console.print(
            history_renderable(
                scaledjob,
                rows,
                where=where(settings),
                limit=args.limit,
                wide=args.output == "wide",
            )
        )
    local = settings.executor is Executor.LOCAL
    if any(r.finished for _, rows in found for r in rows):
        # `logs` looks in -n or default: name the manifest's namespace when it is another.
        namespaces = {s.namespace for s, rows in found if rows}
        extra = ["-n", *namespaces] if len(namespaces) == 1 and not ctx.flag("namespace") else []
        if extra == ["-n", "default"]:
            extra = []
        console.print(
            f"logs of a Job: {ctx.again('logs', *extra, local=local)} JOB",
            style="dim",
            soft_wrap=True,
        )
    if any(r.dead_lettered for _, rows in found for r in rows):
        # Two vocabularies meet here: REASON is the Job's, the dead letter's may say more.
        console.print(
            "REASON is the Job's own (its Failed condition, as kubectl shows it); why each "
            "message was dead-lettered (the same word, or more: FunctionFailed for a "
            "function's error) is in: "
            f"{ctx.again('dead-letters', *ctx.file_args(), local=local)}",
            style="dim",
            soft_wrap=True,
        )
    return 0


def cmd_logs(ctx: Context) -> int:
    args = ctx.args
    settings = ctx.settings
    namespace = ctx.flag("namespace") or _manifest_namespace(ctx) or "default"
    if settings.executor is Executor.LOCAL:
        return _local_logs(ctx, namespace)
    return asyncio.run(_cluster_logs(ctx, namespace, args.job))


def _manifest_namespace(ctx: Context) -> str | None:
    """``logs --file FILE``: the namespace of the file's ScaledJobs (of ``--scaledjob``),
    where their Jobs are; an error when they are in more than one."""
    if not ctx.flag("file"):
        if ctx.flag("scaledjob"):
            raise CliError("--scaledjob needs --file FILE: the manifest that has it")
        return None
    namespaces = sorted({s.namespace for s in ctx.scaledjobs()})
    if len(namespaces) > 1:
        raise CliError(
            f"--file {ctx.flag('file')}: its ScaledJobs are in namespaces "
            f"{', '.join(namespaces)}; pick one with --scaledjob NAME or -n NAMESPACE"
        )
    return namespaces[0]


def _local_logs(ctx: Context, namespace: str) -> int:
    args = ctx.args
    logs = LocalLogs(ctx.settings, namespace, args.job)
    if not logs.exists:
        ctx.warn_if_no_state()
        raise CliError(
            f"no local Job {namespace}/{args.job} in {ctx.settings.local.state_dir}; "
            f"`{ctx.again('jobs', '-f', 'MANIFEST')}` lists them",
            USAGE,
        )
    _check_container(args.container, [name for name, _ in logs.containers()])
    print_local_logs(logs, sys.stdout, container=args.container, follow=args.follow)
    return 0


def _check_container(wanted: str | None, names: list[str]) -> None:
    if wanted is not None and wanted not in names:
        raise CliError(f"-c {wanted}: the Job has no such container; it has {', '.join(names)}")


# ---------------------------------------------------------------------- on a cluster
def _container_state(status: dict[str, Any] | None) -> str:
    state = (status or {}).get("state") or {}
    if "terminated" in state:
        ended = state["terminated"]
        return f"exit {ended.get('exitCode')} ({ended.get('reason') or 'Terminated'})"
    if "running" in state:
        return "running"
    if "waiting" in state:
        return f"waiting ({state['waiting'].get('reason') or 'Waiting'})"
    return "not started"


def _pod_parts(pod: dict[str, Any], container: str | None) -> list[tuple[str, bool, str, bool]]:
    """(container, is init, state text, has started) in the order they run."""
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    statuses = {
        s.get("name"): s
        for s in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]
    }
    out = []
    for key, init in (("initContainers", True), ("containers", False)):
        for c in spec.get(key) or []:
            name = c.get("name", "")
            if container is not None and name != container:
                continue
            state = (statuses.get(name) or {}).get("state") or {}
            started = "running" in state or "terminated" in state
            out.append((name, init, _container_state(statuses.get(name)), started))
    return out


async def _cluster_logs(ctx: Context, namespace: str, name: str) -> int:
    """The Job's pods (one per attempt, oldest first), each container's output under a
    header with its exit code and reason; ``-f`` streams running containers and waits
    for new attempts until the Job ends."""
    from jobrunner.kube.client import KubeJobClient
    from jobrunner.tracking.tracker import outcome_of

    client = ctx.job_client()
    assert isinstance(client, KubeJobClient)
    args = ctx.args
    try:
        job = await client.get_job(namespace, name)
        if job is None:
            hint = "" if ctx.flag("namespace") else " (-n NAMESPACE for another namespace)"
            raise CliError(
                f"no Job {namespace}/{name} on the cluster{hint}; "
                f"`{ctx.again('jobs', '-f', 'MANIFEST')}` lists them",
                USAGE,
            )
        pod_spec = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        _check_container(
            args.container,
            [
                c.get("name", "")
                for k in ("initContainers", "containers")
                for c in pod_spec.get(k) or []
            ],
        )
        shown: set[tuple[str, str]] = set()
        while True:
            finished = job is None or outcome_of(job) is not None
            pods = await client.list_pods(namespace, f"job-name={name}")
            if not pods and not args.follow:
                sys.stdout.write("(no pod: the Job has not started one, or they were deleted)\n")
            for attempt, pod in enumerate(pods, start=1):
                await _show_pod(
                    client,
                    namespace,
                    attempt,
                    pod,
                    shown,
                    container=args.container,
                    follow=args.follow,
                )
            if not args.follow or finished:
                break
            await asyncio.sleep(1.0)
            job = await client.get_job(namespace, name)
        outcome = outcome_of(job) if job is not None else None
        if outcome is not None:
            text = f"Job {outcome.outcome.value}: {outcome.reason}"
            sys.stdout.write(
                f"==> {text if outcome.succeeded else f'{text} ({outcome.message})'} <==\n"
            )
        return 0
    finally:
        await client.close()


async def _show_pod(
    client: Any,
    namespace: str,
    attempt: int,
    pod: dict[str, Any],
    shown: set[tuple[str, str]],
    *,
    container: str | None,
    follow: bool,
) -> None:
    from jobrunner.core.protocols import ApiRejected, TransientError

    out = sys.stdout
    pod_name = (pod.get("metadata") or {}).get("name", "")
    for name, init, state, started in _pod_parts(pod, container):
        key = (pod_name, name)
        if key in shown or (follow and not started):
            continue  # following: shown once it has started
        shown.add(key)
        kind = "init container" if init else "container"
        out.write(f"==> attempt {attempt} (pod {pod_name}), {kind} {name}: {state} <==\n")
        out.flush()
        if not started:
            continue
        try:
            if follow and state == "running":
                async for chunk in client.follow_pod_log(namespace, pod_name, name):
                    out.write(chunk)
                    out.flush()
            else:
                out.write(await client.pod_log(namespace, pod_name, name))
        except ApiRejected as exc:
            out.write(f"(no log from the node: {exc.message})\n")
        except TransientError as exc:
            # A node without a kubelet to ask (KWOK's) or one that is down.
            out.write(f"(no log from the node: {exc})\n")
        out.flush()
