"""Command line: ``jobrunner run | publish | status | jobs | logs | render | validate |
functions import``.
The only module that reads the environment (through Settings).

Errors are for a person: each names the file and field (or the service) and says what
to do next, on one line, with exit code 2 for a problem in what was given and 1 for a
problem met while running."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from jobrunner import __version__
from jobrunner.config import (
    Executor,
    ManifestError,
    ManifestSet,
    ScaledJob,
    Settings,
    load_manifest,
)
from jobrunner.models import Delivery
from jobrunner.naming import message_identity
from jobrunner.rendering import Renderer, RenderError, template_dirs


def _read_message(value: str) -> bytes:
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        return Path(value[1:]).read_bytes()
    return value.encode()


def _headers(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--header {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _selected(manifests: ManifestSet, wanted: str | None) -> list[ScaledJob]:
    if not wanted:
        return list(manifests.scaledjobs)
    matches = [s for s in manifests.scaledjobs if s.name == wanted]
    if not matches:
        names = ", ".join(s.name for s in manifests.scaledjobs)
        raise ManifestError(
            f"{manifests.path}: no ScaledJob named {wanted!r}; --scaledjob takes one of: {names}"
        )
    return matches


def cmd_render(args: argparse.Namespace) -> int:
    manifests = load_manifest(Path(args.file))
    scaledjob = _selected(manifests, args.scaledjob)[0]
    body = _read_message(args.message)
    headers = _headers(args.header)
    delivery = Delivery(
        source=scaledjob.spec.triggers[0].type,
        identity=message_identity(args.message_id, body, headers),
        body=body,
        message_id=args.message_id,
        headers=headers,
        metadata={"queue": scaledjob.spec.triggers[0].metadata.get("queueName", "")},
        received_at=time.monotonic(),
    )
    rendered = Renderer(scaledjob, base_dirs=template_dirs(Path(args.file))).render(delivery)
    docs = [d for d in (rendered.secret, rendered.job) if d is not None]
    if args.output == "json":
        print(json.dumps(docs if len(docs) > 1 else docs[0], indent=2))
    else:
        print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


def _notes(manifests: ManifestSet) -> None:
    for note in manifests.skipped:
        print(f"{manifests.path}: note: skipped {note}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    """Everything ``run`` or the API server would refuse: the manifest and its triggers,
    the Job template against the batch/v1 schema, a sample message rendered through it,
    and (``--server-dry-run``) the API server's own strict check."""
    manifests = load_manifest(Path(args.file))
    _notes(manifests)
    problems = 0
    for scaledjob in manifests.scaledjobs:
        renderer = Renderer(scaledjob, base_dirs=template_dirs(Path(args.file)))
        where = f"{args.file}: ScaledJob {scaledjob.namespace}/{scaledjob.name}"
        body = args.sample_message.encode() if args.sample_message else None
        delivery = Delivery(
            source=scaledjob.spec.triggers[0].type,
            identity="validate-sample",
            body=body if body is not None else b"{}",
            message_id="validate-sample",
            metadata={"queue": scaledjob.spec.triggers[0].metadata.get("queueName", "")},
        )
        try:
            rendered = renderer.render(delivery)
        except RenderError as exc:
            if body is None and exc.reason in ("TemplateError", "InvalidMessage"):
                # No sample given: `{}` may simply lack what the template reads.
                print(
                    f"{where}: valid; a sample message was not rendered ({exc.detail}); "
                    "pass --sample-message to check one"
                )
                rendered = None
            else:
                print(f"{where}: the sample message cannot become a Job: {exc}", file=sys.stderr)
                problems += 1
                continue
        else:
            sample = "the sample message" if body is not None else "a sample message {}"
            print(
                f"{where}: valid (apiVersion {scaledjob.apiVersion}, ack policy "
                f"{scaledjob.spec.ackPolicy.value}, maxReplicaCount "
                f"{scaledjob.spec.maxReplicaCount}; {sample} renders a valid Job)"
            )
        if args.server_dry_run:
            if rendered is None:
                print("  server-side dry run needs a Job: pass --sample-message", file=sys.stderr)
                problems += 1
                continue
            from jobrunner.kube.client import KubeJobClient, load_api_client

            client = KubeJobClient(load_api_client(settings.kube.kubeconfig, settings.kube.context))
            problem = asyncio.run(client.dry_run_create(rendered.job))
            if problem:
                print(f"  server-side dry run rejected the Job: {problem}", file=sys.stderr)
                problems += 1
                continue
            print("  server-side dry run (strict field validation): the API server accepts the Job")
    return 1 if problems else 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from jobrunner import runner
    from jobrunner.telemetry import configure_logging

    configure_logging(settings.log_level, json_lines=settings.log_json)
    manifests = load_manifest(Path(args.file))
    _notes(manifests)
    for scaledjob in manifests.scaledjobs:  # fail at start, not at the first message
        Renderer(scaledjob, base_dirs=template_dirs(Path(args.file)))
    from jobrunner.telemetry import Telemetry, tracer_provider

    endpoint = settings.telemetry.otlp_endpoint or settings.otel_traces_endpoint
    telemetry = Telemetry.create(tracer_provider(otlp_endpoint=endpoint))

    async def serve() -> None:
        # Signals belong to the program, not the runner: SIGTERM and SIGINT ask it to stop.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runner.run(manifests, settings, stop=stop, telemetry=telemetry)

    try:
        asyncio.run(serve())
    finally:
        provider = telemetry.provider
        if provider is not None:
            provider.shutdown()
    return 0


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from jobrunner.views import publish

    manifests = load_manifest(Path(args.file))
    scaledjob = _selected(manifests, args.scaledjob)[0]
    bodies = [_read_message(m) for m in args.messages]
    if args.jsonl:
        lines = Path(args.jsonl).read_text().splitlines()
        bodies.extend(line.encode() for line in lines if line.strip())
    if not bodies:
        raise SystemExit("error: nothing to publish; give messages, @file, - (stdin) or --jsonl")
    if args.message_id and len(bodies) > 1:
        raise SystemExit("error: --message-id names one message; publish the others separately")
    queue, path = asyncio.run(
        publish(
            scaledjob,
            settings,
            bodies,
            message_id=args.message_id,
            headers=_headers(args.header),
            content_type=args.content_type,
        )
    )
    print(f"published {len(bodies)} message(s) to queue {queue} ({path})")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from jobrunner.views import show_status

    manifests = load_manifest(Path(args.file))
    scaledjobs = _selected(manifests, args.scaledjob)
    asyncio.run(show_status(scaledjobs, settings, watch=args.watch, interval=args.interval))
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    from jobrunner.views import show_history

    manifests = load_manifest(Path(args.file))
    asyncio.run(show_history(_selected(manifests, args.scaledjob), settings, limit=args.limit))
    return 0


def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    from jobrunner.views import show_logs

    if settings.executor is not Executor.LOCAL:
        print(
            f"error: on a cluster, read logs with `kubectl logs job/{args.job}`; "
            "`jobrunner logs` reads the local executor's (add --local)",
            file=sys.stderr,
        )
        return 2
    return show_logs(settings, args.job, namespace=args.namespace)


def cmd_functions(args: argparse.Namespace) -> int:
    from jobrunner.functions import importer

    return importer.run(args)


def _add_local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--local",
        action="store_true",
        help="Jobs on this machine (the local executor) instead of a cluster",
    )
    parser.add_argument(
        "--state-dir",
        help="the local executor's and embedded queue's directory (default .jobrunner)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobrunner", description="One message, one Kubernetes Job."
    )
    parser.add_argument("--version", action="version", version=f"jobrunner {__version__}")
    parser.add_argument(
        "--kubeconfig", help="kubeconfig path (default: in-cluster, then ~/.kube/config)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="consume messages and run one Job per message")
    run.add_argument("-f", "--file", required=True, help="ScaledJob manifest (YAML)")
    _add_local(run)

    publish = sub.add_parser(
        "publish", help="put messages on a ScaledJob's embedded (sqlite) queue"
    )
    publish.add_argument("-f", "--file", required=True, help="ScaledJob manifest (YAML)")
    publish.add_argument("messages", nargs="*", metavar="MESSAGE", help="body, @file or -")
    publish.add_argument("--jsonl", help="a file with one message per line")
    publish.add_argument("--message-id", help="the message's id (one message only)")
    publish.add_argument("--header", action="append", default=[], metavar="KEY=VALUE")
    publish.add_argument("--content-type")
    publish.add_argument("--scaledjob", help="which ScaledJob of the file (default: the first)")
    publish.add_argument("--state-dir", help="where the embedded queue lives (default .jobrunner)")

    status = sub.add_parser("status", help="Jobs in flight per ScaledJob (and the queue)")
    status.add_argument("-f", "--file", required=True, help="ScaledJob manifest (YAML)")
    status.add_argument("--scaledjob", help="only this ScaledJob of the file")
    status.add_argument("-w", "--watch", action="store_true", help="keep the view live")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    _add_local(status)

    jobs = sub.add_parser("jobs", help="finished Jobs with their outcomes, newest first")
    jobs.add_argument("-f", "--file", required=True, help="ScaledJob manifest (YAML)")
    jobs.add_argument("--scaledjob", help="only this ScaledJob of the file")
    jobs.add_argument("--limit", type=int, default=50)
    _add_local(jobs)

    logs = sub.add_parser("logs", help="a local Job's logs, every attempt")
    logs.add_argument("job", help="the Job's name")
    logs.add_argument("-n", "--namespace", default="default")
    _add_local(logs)

    render = sub.add_parser("render", help="print the Job a message would become (offline)")
    render.add_argument("-f", "--file", required=True)
    render.add_argument("--message", required=True, help="body text, @file, or - for stdin")
    render.add_argument("--message-id")
    render.add_argument("--header", action="append", default=[], metavar="KEY=VALUE")
    render.add_argument("--scaledjob", help="which ScaledJob of the file (default: the first)")
    render.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")

    validate = sub.add_parser(
        "validate", help="check a manifest (and optionally the API server's view)"
    )
    validate.add_argument("-f", "--file", required=True)
    validate.add_argument(
        "--server-dry-run",
        action="store_true",
        help="also create the rendered Job with dryRun=All on the cluster",
    )
    validate.add_argument("--sample-message", help="body used for the dry run (default {})")

    from jobrunner.functions import importer

    functions = sub.add_parser("functions", help="Azure Functions-style apps as ScaledJobs")
    functions_sub = functions.add_subparsers(dest="functions_command", metavar="COMMAND")
    functions_sub.required = True
    importer.add_arguments(
        functions_sub.add_parser(
            "import", help="write one ScaledJob manifest per function of a function app"
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    settings = Settings()
    if args.kubeconfig:
        settings.kube.kubeconfig = args.kubeconfig
    if getattr(args, "local", False):
        settings.executor = Executor.LOCAL
    if getattr(args, "state_dir", None):
        settings.local.state_dir = Path(args.state_dir)
    commands = {
        "render": lambda: cmd_render(args),
        "validate": lambda: cmd_validate(args, settings),
        "run": lambda: cmd_run(args, settings),
        "publish": lambda: cmd_publish(args, settings),
        "status": lambda: cmd_status(args, settings),
        "jobs": lambda: cmd_jobs(args, settings),
        "logs": lambda: cmd_logs(args, settings),
        "functions": lambda: cmd_functions(args),
    }
    from jobrunner.sources.sqlite import QueueBusy

    try:
        return commands[args.command]()
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RenderError as exc:
        print(f"error: the message cannot become a Job: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc.filename}: no such file", file=sys.stderr)
        return 2
    except QueueBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        hint = _hint(exc)
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 1


def _hint(exc: Exception) -> str | None:
    """A known failure to meet a service, said in words, with what to do about it."""
    from kubernetes.config.config_exception import ConfigException

    from jobrunner.protocols import TransientError

    if isinstance(exc, ConfigException):
        return (
            f"no Kubernetes configuration ({exc}); pass --kubeconfig or set KUBECONFIG, "
            "or add --local to run Jobs on this machine"
        )
    if isinstance(exc, TransientError):
        return f"{exc}; is the cluster up (`make stack-up` for the local one)?"
    return None


if __name__ == "__main__":
    sys.exit(main())
