"""``finalizers list | release``: the Jobs still guarded by jobrunner's finalizer, and its
removal by hand after an uninstall (see ``jobrunner.views.finalizers``)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from jobrunner.cli.context import Context
from jobrunner.cli.errors import CliError

if TYPE_CHECKING:
    from jobrunner.views.finalizers import GuardedJob


def cmd_finalizers(ctx: Context) -> int:
    from jobrunner.core.models import FINALIZER
    from jobrunner.views import finalizers

    args = ctx.args
    given = [
        f
        for f, on in (
            ("-f", ctx.flag("file")),
            ("-n", ctx.flag("namespace")),
            ("-A", ctx.flag("all_namespaces")),
        )
        if on
    ]
    if len(given) > 1:
        raise CliError(f"{' and '.join(given)} exclude each other: give one (or none: default)")

    async def go() -> int:
        jobs = ctx.job_client()
        try:
            scaledjob = ctx.flag("scaledjob")
            selector = finalizers.selector(scaledjob)
            if args.all_namespaces and hasattr(jobs, "list_guarded_jobs"):
                found = [
                    finalizers.GuardedJob.of(j) for j in await jobs.list_guarded_jobs(selector)
                ]
            else:
                found = await finalizers.guarded_jobs(jobs, namespaces(ctx), scaledjob)
            show(found, output=args.output)
            if args.action == "list":
                print(f"{len(found)} Job(s) carry the finalizer {FINALIZER}", file=sys.stderr)
                return 0
            if found and not args.yes:
                raise CliError(
                    f"this would release {len(found)} Job(s): a Job whose message is still "
                    "unsettled could then be deleted and its message run again by a second "
                    "Job. Stop here if a dispatcher still runs for them; else add --yes"
                )
            released = await finalizers.release(jobs, found)
            print(f"released {released} Job(s)", file=sys.stderr)
            return 0
        finally:
            await jobs.close()

    return asyncio.run(go())


def as_dict(job: GuardedJob) -> dict[str, str]:
    return {
        "namespace": job.namespace,
        "name": job.name,
        "scaledjob": job.scaledjob,
        "state": job.state,
        "messageId": job.message_id,
        "uid": job.uid,
    }


def show(found: list[GuardedJob], *, output: str) -> None:
    """The guarded Jobs on stdout: a table under a header like every other listing
    (``table``, ``wide``: nothing cut), or ``json``/``yaml`` (a list, empty for none)."""
    if output in ("json", "yaml"):
        items = [as_dict(job) for job in found]
        if output == "json":
            print(json.dumps(items, indent=2))
        else:
            print(yaml.safe_dump(items, sort_keys=False), end="")
        return
    if not found:
        return  # the count on stderr says so; a header alone would be noise
    from jobrunner.views.console import Column, FitTable
    from jobrunner.views.queries import make_console

    table = FitTable(
        columns=[
            Column("NAMESPACE"),
            Column("NAME", shrink="middle", min_width=14),
            Column("SCALEDJOB"),
            Column("STATE", shrink="end", min_width=8),
            Column("MESSAGE", shrink="end", min_width=10, drop=1),
        ],
        wide=output == "wide",
    )
    for job in found:
        table.add_row(job.namespace, job.name, job.scaledjob, job.state, job.message_id or "-")
    make_console(wide=output == "wide").print(table)


def namespaces(ctx: Context) -> list[str]:
    """-n, else every namespace of the local executor with -A, else the file's."""
    if ctx.flag("namespace"):
        return [str(ctx.flag("namespace"))]
    if ctx.flag("all_namespaces"):
        from jobrunner.core.limits import dns1123_label_problem

        base: Path = ctx.settings.local.state_dir / "jobs"
        found = base.iterdir() if base.is_dir() else []
        # Only directories a namespace can have made (the local executor refuses others).
        return sorted(p.name for p in found if p.is_dir() and not dns1123_label_problem(p.name))
    if ctx.flag("file"):
        return sorted({s.namespace for s in ctx.scaledjobs()})
    return ["default"]
