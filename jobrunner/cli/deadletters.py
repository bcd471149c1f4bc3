"""``dead-letters``: list what a ScaledJob dead-lettered (embedded queue, RabbitMQ, Kafka)
and replay it to its source as new work (see ``jobrunner.core.deadletters``)."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import yaml

from jobrunner.cli.context import Context
from jobrunner.cli.errors import CliError
from jobrunner.cli.parser import DEAD_LETTER_LIMIT
from jobrunner.core.deadletters import (
    REASONS,
    DeadLetter,
    DeadLetterStore,
    replay_value,
    select,
    unknown_reasons,
)
from jobrunner.core.settings import Executor
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.views.console import Cell, Column, FitTable, age, preview, rfc3339
from jobrunner.views.queries import make_console

_NO_STORE = {
    "http": (
        "an http trigger keeps no dead-letter queue: a failed event is answered at its "
        "Location (GET <path>/<id>) and POSTed to spec.deadLetter.url when set; "
        "`jobrunner jobs` lists the failed Jobs"
    )
}
"""Where the failures of a trigger type without a dead-letter store are instead."""


async def open_store(ctx: Context, scaledjob: ScaledJob) -> DeadLetterStore:
    """The dead letters of ``scaledjob``'s trigger, from the module of its source (its
    ``open_dead_letters``), the trigger resolved as ``run`` resolves it."""
    from jobrunner.cli.clusterauth import cluster_authentication
    from jobrunner.manifest.triggers import FileSecrets, Reach, ResolveContext, resolve_trigger

    settings = ctx.settings
    override = ctx.flag("dead_letter_queue")
    if override:
        dead_letter = scaledjob.spec.deadLetter.model_copy(
            update={"queue": override, "topic": override}
        )
        scaledjob = scaledjob.model_copy(
            update={"spec": scaledjob.spec.model_copy(update={"deadLetter": dead_letter})}
        )
    clients: list[Any] = []

    async def cluster_secret(namespace: str, name: str) -> Mapping[str, str] | None:
        if not clients:
            clients.append(ctx.job_client())
        found: Mapping[str, str] | None = await clients[0].read_secret(namespace, name)
        return found

    try:
        trigger = scaledjob.spec.triggers[0]
        authentications = dict(ctx.manifests.authentications)
        ref = trigger.authenticationRef
        if (
            ref is not None
            and ref.kind == "TriggerAuthentication"
            and ref.name not in authentications
            and settings.executor is not Executor.LOCAL
        ):
            if not clients:
                clients.append(ctx.job_client())
            authentications[ref.name] = await cluster_authentication(
                clients[0], scaledjob, ref.name, file=str(ctx.manifests.path), index=0
            )
        kind, resolved = await resolve_trigger(
            ResolveContext(
                scaledjob=scaledjob,
                trigger=trigger,
                authentications=authentications,
                read_secret=FileSecrets(cluster_secret, ctx.manifests.secrets),
                state_dir=settings.local.state_dir,
                reach=Reach.own(os.environ),  # a file's ScaledJob, read by its own user
            )
        )
    finally:
        for client in clients:
            await client.close()
    module = importlib.import_module(kind.source.partition(":")[0])
    factory = getattr(module, "open_dead_letters", None)
    if factory is None:
        raise CliError(
            _NO_STORE.get(kind.name, f"dead-letters does not know {kind.name} triggers yet")
        )
    store: DeadLetterStore = factory(resolved, scaledjob=scaledjob, settings=settings)
    return store


def _body(letter: DeadLetter) -> dict[str, str]:
    try:
        return {"body": letter.body.decode("utf-8"), "encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"body": base64.b64encode(letter.body).decode(), "encoding": "base64"}


def as_dict(scaledjob: ScaledJob, letter: DeadLetter) -> dict[str, Any]:
    return {
        "scaledjob": scaledjob.name,
        "namespace": scaledjob.namespace,
        "id": letter.id,
        "messageId": letter.message_id,
        "reason": letter.reason or None,
        "detail": letter.detail or None,
        "job": letter.job or None,
        "deadLetteredAt": rfc3339(letter.when),
        "replayed": letter.replayed,
        "headers": dict(letter.headers),
        "contentType": letter.content_type,
        **_body(letter),
    }


def table(letters: list[DeadLetter], *, title: str, wide: bool) -> FitTable:
    t = FitTable(
        columns=[
            Column("ID"),
            Column("MESSAGE", shrink="end", min_width=10),
            Column("REASON"),
            Column("JOB", shrink="middle", min_width=14),
            Column("AGE", drop=1),
        ],
        title=title,
        wide=wide,
    )
    for letter in letters:
        notes = []
        if letter.detail:
            notes.append(Cell(f"detail: {letter.detail}", "dim"))
        notes.append(Cell(f"body: {preview(letter.body, 0)}", "dim"))
        if letter.replayed:
            notes.append(Cell(f"replayed: {letter.replayed}", "yellow"))
        label = letter.message_id or preview(letter.body, 40)
        t.add_row(
            letter.id,
            label,
            Cell(letter.reason or "-", "red"),
            letter.job or "-",
            age(letter.when),
            notes=notes,
        )
    return t


def cmd_dead_letters(ctx: Context) -> int:
    args = ctx.args
    scaledjobs = ctx.scaledjobs()
    if args.replay and len(scaledjobs) > 1:
        raise CliError(
            f"{args.file} has {len(scaledjobs)} ScaledJobs and IDs are per ScaledJob: add "
            "--scaledjob NAME to replay by id"
        )
    if any(s.spec.triggers[0].type == "sqlite" for s in scaledjobs):
        ctx.warn_if_no_state()
    return asyncio.run(_dead_letters(ctx, scaledjobs))


async def _dead_letters(ctx: Context, scaledjobs: list[ScaledJob]) -> int:
    args = ctx.args
    found: list[tuple[ScaledJob, DeadLetterStore, list[DeadLetter]]] = []
    try:
        for scaledjob in scaledjobs:
            store = await open_store(ctx, scaledjob)
            try:
                letters = await store.read(limit=args.limit)
            except BaseException:
                await store.close()
                raise
            shown = select(letters, reasons=args.reason, include_replayed=args.all)
            found.append((scaledjob, store, shown))
            listed = select(letters, include_replayed=args.all)
            hint = unknown_reasons(args.reason, listed) if args.reason else None
            if hint is not None:
                print(f"{scaledjob.namespace}/{scaledjob.name}: {hint}", file=sys.stderr)
        if args.replay is not None:
            return await _replay(ctx, found)
        _show(ctx, found)
        return 0
    finally:
        for _, store, _ in found:
            await store.close()


def _show(ctx: Context, found: list[tuple[ScaledJob, DeadLetterStore, list[DeadLetter]]]) -> None:
    args = ctx.args
    if args.output in ("json", "yaml"):
        items = [as_dict(s, d) for s, _, letters in found for d in letters]
        if args.output == "json":
            print(json.dumps(items, indent=2))
        else:
            print(yaml.safe_dump(items, sort_keys=False), end="")
        return
    console = make_console(wide=args.output == "wide")
    local = ctx.settings.executor is Executor.LOCAL
    for scaledjob, store, letters in found:
        name = f"{scaledjob.namespace}/{scaledjob.name}"
        filters = f" with reason {' or '.join(args.reason)}" if args.reason else ""
        if not letters:
            console.print(f"{name}: no dead letters{filters} in {store.where}", style="dim")
            continue
        title = f"{name}: {len(letters)} dead letter(s){filters} in {store.where}"
        console.print(table(letters, title=title, wide=args.output == "wide"))
    shown = sorted({d.reason for _, _, letters in found for d in letters} & set(REASONS))
    for reason in shown:
        console.print(f"  {reason}: {REASONS[reason]}", style="dim", soft_wrap=True)
    if any(letters for _, _, letters in found):
        # The same selection as this listing (a replay without IDs takes every letter it
        # selects: without --reason, copying the line replayed the ones not listed too).
        selection = [w for r in args.reason for w in ("--reason", r)]
        if args.all:
            selection.append("--all")
        if args.limit != DEAD_LETTER_LIMIT:
            selection += ["--limit", str(args.limit)]
        replay = ctx.again("dead-letters", *ctx.file_args(), *selection, local=local)
        console.print(
            f"replay them as new work: {replay} --replay [ID ...]", style="dim", soft_wrap=True
        )


async def _replay(
    ctx: Context, found: list[tuple[ScaledJob, DeadLetterStore, list[DeadLetter]]]
) -> int:
    args = ctx.args
    value = replay_value()
    total = 0
    for scaledjob, store, letters in found:
        chosen = select(letters, ids=args.replay, include_replayed=args.all)
        missing = sorted(set(args.replay) - {d.id for d in chosen})
        if missing:
            known = ", ".join(d.id for d in letters) or "none"
            raise CliError(
                f"no dead letter with id {', '.join(missing)} in {store.where}"
                + (f" with reason {' or '.join(args.reason)}" if args.reason else "")
                + f" (ids there: {known}); nothing was replayed"
            )
        name = f"{scaledjob.namespace}/{scaledjob.name}"
        if not chosen:
            print(f"{name}: nothing to replay")
            continue
        count = await store.replay(chosen, value=value)
        total += count
        labels = ", ".join(
            f"{d.id} ({d.message_id})" if d.message_id else d.id for d in chosen[:10]
        ) + (f" and {len(chosen) - 10} more" if len(chosen) > 10 else "")
        print(
            f"{name}: replayed {count} dead letter(s) to {store.destination} as new work "
            f"(x-jobrunner-replay: {value}): {labels}"
        )
    if total:
        local = ctx.settings.executor is Executor.LOCAL
        print(
            f"follow them: {ctx.again('status', *ctx.file_args(), '-w', local=local)}",
            file=sys.stderr,
        )
        _note_no_dispatcher(ctx, [s for s, _, _ in found])
    return 0


def _note_no_dispatcher(ctx: Context, scaledjobs: list[ScaledJob]) -> None:
    """After a replay to an embedded queue that no dispatcher consumes, how to start one."""
    from jobrunner.sources.sqlite import consumer_lock
    from jobrunner.views.queries import embedded_queue, paused_text

    for scaledjob in scaledjobs:
        embedded = embedded_queue(scaledjob, ctx.settings)
        if embedded is None:
            continue
        lock = consumer_lock(*embedded)
        if lock is not None and lock.live and lock.paused_by is not None:
            print(
                f"the dispatcher that serves queue {embedded[1]} is "
                + paused_text(lock.pid, lock.paused_by),
                file=sys.stderr,
            )
            return
        if lock is None or not lock.live:
            start = ctx.again("run", *ctx.file_args(), local=True)
            print(
                f"no dispatcher consumes queue {embedded[1]}; start one: {start}", file=sys.stderr
            )
            return
