"""``render`` and ``validate``: what a manifest and a message become, with nothing
running (``validate --server-dry-run`` asks the API server too)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from jobrunner.cli.context import Context
from jobrunner.cli.errors import USAGE
from jobrunner.cli.inputs import parse_headers, read_body
from jobrunner.core.models import Delivery
from jobrunner.core.naming import message_identity
from jobrunner.manifest.scaledjob import ManifestError, ManifestErrors, ScaledJob
from jobrunner.rendering.renderer import Renderer, RenderError, template_dirs


def _metadata(scaledjob: ScaledJob) -> dict[str, str]:
    meta = scaledjob.spec.triggers[0].metadata
    if "topic" in meta:
        return {"topic": meta["topic"], "partition": "0", "offset": "0"}
    return {"queue": meta.get("queueName", "")}


def cmd_render(ctx: Context) -> int:
    scaledjob = ctx.scaledjobs()[0]
    body = read_body(ctx.args.message, flag="--message", verb="render", force=ctx.args.force)
    headers = parse_headers(ctx.args.header)
    delivery = Delivery(
        source=scaledjob.spec.triggers[0].type,
        identity=message_identity(ctx.args.message_id, body, headers),
        body=body,
        message_id=ctx.args.message_id,
        headers=headers,
        metadata=_metadata(scaledjob),
        received_at=time.monotonic(),
    )
    rendered = Renderer(scaledjob, base_dirs=template_dirs(ctx.manifests.path)).render(delivery)
    job = rendered.job
    secret = rendered.secret
    owner: dict[str, Any] | None = None
    if secret is not None:
        from jobrunner.rendering.messagesecret import owner_reference

        owner = owner_reference(job)
        owner["uid"] = "<the Job's uid, known once it exists>"
    if ctx.args.output == "json":
        items = [d for d in (secret, job) if d is not None]
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
        if secret is not None:
            print(
                f"note: jobrunner creates the Job first, then makes Job "
                f"{job['metadata']['name']} own Secret {secret['metadata']['name']} from its "
                "creation (an ownerReference with the Job's uid), so it is deleted with the "
                "Job; applied by hand, it is not",
                file=sys.stderr,
            )
        return 0
    if secret is not None and owner is not None:
        patch = yaml.safe_dump({"metadata": {"ownerReferences": [owner]}}, sort_keys=False)
        print("# The message Secret. jobrunner creates the Job first, then this Secret owned")
        print("# by it (deleted with the Job), with, once the Job has its uid:")
        for line in patch.splitlines():
            print(f"#   {line}")
        print(yaml.safe_dump(secret, sort_keys=False), end="")
        print("---")
    print(yaml.safe_dump(job, sort_keys=False), end="")
    return 0


def cmd_validate(ctx: Context) -> int:
    """Everything ``run`` or the API server would refuse: the manifest and its triggers,
    the Job template against the batch/v1 schema, a sample message rendered through it,
    and (``--server-dry-run``) the API server's own strict check."""
    try:
        scaledjobs = ctx.scaledjobs()
    except ManifestErrors as exc:
        # Every mistake at once: the file's, and those of the templates of the ScaledJobs
        # that parsed (a template error is not hidden behind a trigger error).
        every = list(exc.problems)
        for scaledjob in exc.checkable:
            every += _template_problems(ctx, scaledjob)
        raise ManifestErrors(every, checkable=[]) from None
    ctx.notes()
    template_problems = [p for s in scaledjobs for p in _template_problems(ctx, s)]
    if template_problems:
        raise ManifestErrors(template_problems, checkable=[])
    args = ctx.args
    body = (  # read once: standard input (-) is one body for every ScaledJob
        read_body(args.sample_message, flag="--sample-message", verb="render", force=args.force)
        if args.sample_message is not None
        else None
    )
    problems = 0
    client = ctx.kube_client() if args.server_dry_run else None
    try:
        for scaledjob in scaledjobs:
            problems += _validate_one(ctx, scaledjob, client, body)
    finally:
        if client is not None:
            asyncio.run(client.close())
    return USAGE if problems else 0


def _local_mode(ctx: Context) -> bool:
    """Whether the Jobs would run on the local executor: ``--local``, or
    ``JOBRUNNER_EXECUTOR=local`` as ``run`` reads it."""
    from jobrunner.core.settings import Executor

    return ctx.local or ctx.settings.executor is Executor.LOCAL


def _template_problems(ctx: Context, scaledjob: ScaledJob) -> list[str]:
    """The mistakes of a ScaledJob's Job template that need no message (syntax, the
    batch/v1 schema, files that cannot be read), as the Renderer finds them at start."""
    try:
        Renderer(scaledjob, base_dirs=template_dirs(Path(ctx.args.file)))
    except ManifestError as exc:
        return [str(exc)]
    return []


def _validate_one(ctx: Context, scaledjob: ScaledJob, client: Any, body: bytes | None) -> int:
    args = ctx.args
    renderer = Renderer(scaledjob, base_dirs=template_dirs(ctx.manifests.path))
    where = f"{args.file}: ScaledJob {scaledjob.namespace}/{scaledjob.name}"
    delivery = Delivery(
        source=scaledjob.spec.triggers[0].type,
        identity="validate-sample",
        body=body if body is not None else b"{}",
        message_id="validate-sample",
        metadata=_metadata(scaledjob),
    )
    local = _local_mode(ctx)
    if local:
        from jobrunner.local.compat import check_template

        check_template(renderer.template)  # refused as run --local refuses it at start
    try:
        rendered = renderer.render(delivery)
    except RenderError as exc:
        if body is None and exc.reason in ("TemplateError", "InvalidMessage"):
            # No sample given: `{}` may simply lack what the template reads.
            if client is not None:
                print(
                    f"{where}: server-side dry run needs a Job, and the default sample {{}} "
                    f"does not render one ({exc.detail}): pass --sample-message",
                    file=sys.stderr,
                )
                return USAGE
            print(
                f"{where}: valid; a sample message was not rendered ({exc.detail}); "
                "pass --sample-message to check one"
            )
            return 0
        print(f"{where}: the sample message cannot become a Job: {exc}", file=sys.stderr)
        return USAGE
    sample = "the sample message" if body is not None else "a sample message {}"
    if local:
        from jobrunner.local.compat import unrunnable

        refused = unrunnable(rendered.job)
        if refused is not None:
            print(f"{where}: {sample} renders a Job refused: {refused}", file=sys.stderr)
            return 1
    # "valid" is said only once every check asked for has passed: a script that reads
    # stdout must not see it for a Job the API server refuses.
    if client is not None:
        problem = asyncio.run(client.dry_run_create(rendered.job))
        if problem:
            print(f"{where}: server-side dry run rejected the Job: {problem}", file=sys.stderr)
            return USAGE
    print(
        f"{where}: valid (apiVersion {scaledjob.apiVersion}, ack policy "
        f"{scaledjob.spec.ackPolicy.value}, maxReplicaCount "
        f"{scaledjob.spec.maxReplicaCount}; {sample} renders a valid Job"
        + (" the local executor runs)" if local else ")")
    )
    if client is not None:
        print("  server-side dry run (strict field validation): the API server accepts the Job")
    return 0
