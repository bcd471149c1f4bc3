"""Command line: ``jobrunner run | render | validate``. The only module that reads the
environment (through Settings)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from jobrunner import __version__
from jobrunner.config import ManifestError, Settings, load_manifest
from jobrunner.models import Delivery
from jobrunner.naming import message_identity
from jobrunner.rendering import Renderer, RenderError
from jobrunner.runner import template_dirs


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


def cmd_render(args: argparse.Namespace) -> int:
    manifests = load_manifest(Path(args.file))
    scaledjob = manifests.scaledjobs[0]
    if args.scaledjob:
        matches = [s for s in manifests.scaledjobs if s.name == args.scaledjob]
        if not matches:
            raise ManifestError(f"{args.file}: no ScaledJob named {args.scaledjob!r}")
        scaledjob = matches[0]
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


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    manifests = load_manifest(Path(args.file))
    for scaledjob in manifests.scaledjobs:
        renderer = Renderer(scaledjob, base_dirs=template_dirs(Path(args.file)))
        print(
            f"{args.file}: ScaledJob {scaledjob.namespace}/{scaledjob.name}: valid "
            f"(apiVersion {scaledjob.apiVersion}, ack policy {scaledjob.spec.ackPolicy.value}, "
            f"maxReplicaCount {scaledjob.spec.maxReplicaCount})"
        )
        if args.server_dry_run:
            sample = args.sample_message.encode() if args.sample_message else b"{}"
            delivery = Delivery(
                source="validate", identity="dry-run", body=sample, message_id="dry-run"
            )
            try:
                rendered = renderer.render(delivery)
            except RenderError as exc:
                print(
                    f"  cannot render a sample message ({exc}); pass --sample-message",
                    file=sys.stderr,
                )
                return 1
            from jobrunner.kube.client import KubeJobClient, load_api_client

            client = KubeJobClient(load_api_client(settings.kube.kubeconfig, settings.kube.context))
            problem = asyncio.run(client.dry_run_create(rendered.job))
            if problem:
                print(f"  server-side dry run rejected the Job: {problem}", file=sys.stderr)
                return 1
            print("  server-side dry run: the API server accepts the Job")
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from jobrunner import runner
    from jobrunner.telemetry import configure_logging

    configure_logging(settings.log_level, json_lines=settings.log_json)
    manifests = load_manifest(Path(args.file))
    for scaledjob in manifests.scaledjobs:  # fail at start, not at the first message
        Renderer(scaledjob, base_dirs=template_dirs(Path(args.file)))
    from jobrunner.telemetry import Telemetry, tracer_provider

    endpoint = settings.telemetry.otlp_endpoint or settings.otel_traces_endpoint
    telemetry = Telemetry.create(tracer_provider(otlp_endpoint=endpoint))
    try:
        asyncio.run(runner.run(manifests, settings, telemetry=telemetry))
    finally:
        provider = telemetry.provider
        if provider is not None:
            provider.shutdown()
    return 0


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
    try:
        if args.command == "render":
            return cmd_render(args)
        if args.command == "validate":
            return cmd_validate(args, settings)
        return cmd_run(args, settings)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RenderError as exc:
        print(f"error: the message cannot become a Job: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc.filename}: no such file", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
