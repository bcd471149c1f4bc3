"""The command line's grammar and help, in the manner of kubectl and helm: a one-line
summary per command, a description and examples in each command's help, every option
documented, global options (``--kubeconfig``, ``--context``, ``-n``) and every option of a
command accepted before or after the command's name, and a usage error that says where to
look (an option the command does not take names the commands that do).

Standard library only: ``jobrunner --help`` and ``--version`` import nothing else.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import math
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from jobrunner import __version__

PROG = "jobrunner"

DEAD_LETTER_LIMIT = 1000
"""How many dead letters ``dead-letters`` looks at by default (the oldest)."""


@dataclass(frozen=True)
class Command:
    name: str
    target: str
    """``module:function`` run with the command's Context; imported only when run."""
    summary: str
    description: str
    usage: str
    examples: list[tuple[str, str]]
    """(what it does, the command line)."""
    configure: Callable[[argparse.ArgumentParser], None]
    group: str
    local: bool = False
    """Takes ``--local`` (and ``--state-dir``)."""
    state_dir: bool = False
    """Takes ``--state-dir`` (``--local`` commands always do)."""
    aliases: list[str] = field(default_factory=list)


class Parser(argparse.ArgumentParser):
    """argparse with kubectl's way of saying a usage error: one ``error:`` line (with a
    did-you-mean for a mistyped command), then where the help is; exit 2."""

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice and self.prog == PROG:
            wanted = choice.group(1)
            names = [c.name for c in COMMANDS]
            close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.6)
            message = f"unknown command {wanted!r}" + (
                f"; did you mean {close[0]!r}?" if close else ""
            )
        sys.stderr.write(f"error: {message}\nSee '{self.prog} --help' for usage and examples.\n")
        sys.exit(2)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help fits the terminal (at most 100 columns, so it stays readable when wide)."""

    def __init__(self, prog: str) -> None:
        columns = shutil.get_terminal_size().columns
        super().__init__(prog, max_help_position=30, width=max(60, min(columns, 100) - 2))


# ---------------------------------------------------------------------- value types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def interval_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds (e.g. 2 or 0.5), got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0.1:
        raise argparse.ArgumentTypeError(
            f"must be at least 0.1 (seconds between refreshes), got {text!r}"
        )
    return value


def namespace_name(text: str) -> str:
    """A Kubernetes namespace name (a DNS-1123 label), refused before any request."""
    from jobrunner.core.limits import dns1123_label_problem

    problem = dns1123_label_problem(text, "a namespace")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def job_name(text: str) -> str:
    """A Job's name (a DNS-1123 subdomain), refused before any request or file access."""
    from jobrunner.core.limits import dns1123_subdomain_problem

    problem = dns1123_subdomain_problem(text, "a Job name")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def scaledjob_name(text: str) -> str:
    """A ScaledJob's name (a DNS-1123 label: it becomes a label value), refused before
    it reaches a label selector."""
    from jobrunner.core.limits import dns1123_label_problem

    problem = dns1123_label_problem(text, "a ScaledJob name")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


# ---------------------------------------------------------------------- completion
COMPLETES = "jobrunner_completes"
"""The attribute naming an argument's completer (a completer of jobrunner.cli.completion,
which attaches it at TAB time): the grammar says what an argument completes with and
imports no completion code, so building the parser stays standard library only."""


def _completes(action: argparse.Action, completer: str) -> None:
    setattr(action, COMPLETES, completer)


# ---------------------------------------------------------------------- option sets
def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Options every command takes, before or after its name. A subcommand's copy has no
    defaults, so it never overwrites what was given before the command."""
    group = parser.add_argument_group("global options (before or after the command)")
    default = None if defaults else argparse.SUPPRESS
    group.add_argument(
        "--kubeconfig",
        metavar="PATH",
        default=default,
        help="kubeconfig file (default: $KUBECONFIG, in-cluster config, then ~/.kube/config)",
    )
    group.add_argument(
        "--context",
        metavar="NAME",
        default=default,
        help="kubeconfig context to use (default: its current-context)",
    )
    group.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        type=namespace_name,
        default=default,
        help="namespace of the ScaledJobs and their Jobs (default: the manifest's, else default)",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="show the Python traceback of an unexpected error",
    )


def _file(
    parser: argparse.ArgumentParser,
    *,
    scaledjob: str = "only this ScaledJob of the file (default: every one)",
) -> None:
    """``-f`` and ``--scaledjob``; ``scaledjob`` is the whole help of the latter, its
    default included (each command's default differs)."""
    parser.add_argument(
        "-f",
        "--file",
        required=True,
        metavar="FILE",
        help="the ScaledJob manifest (YAML; may also hold TriggerAuthentications and Secrets)",
    )
    _completes(
        parser.add_argument("--scaledjob", metavar="NAME", type=scaledjob_name, help=scaledjob),
        "scaledjob_names",
    )


def _local(parser: argparse.ArgumentParser, *, executor: bool = True) -> None:
    group = parser.add_argument_group("local mode (no cluster)")
    if executor:
        group.add_argument(
            "--local",
            action="store_true",
            help="Jobs run as processes on this machine (the local executor) instead of on "
            "a cluster",
        )
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the local executor keeps its Jobs and the embedded queue its file "
        "(default: .jobrunner in the current directory; JOBRUNNER_LOCAL__STATE_DIR)",
    )


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=["table", "wide", "json", "yaml"],
        default="table",
        metavar="FORMAT",
        help="table (default; fits the terminal), wide (nothing cut), json or yaml",
    )


# ---------------------------------------------------------------------- commands
def _run(p: argparse.ArgumentParser) -> None:
    _file(p, scaledjob="serve only this ScaledJob of the file (default: every one)")
    _local(p)


def _publish(p: argparse.ArgumentParser) -> None:
    _file(p, scaledjob="the ScaledJob whose queue to publish to (default: the first)")
    p.add_argument(
        "messages",
        nargs="*",
        metavar="MESSAGE",
        help="a message body; @FILE for a file's content, - for standard input",
    )
    p.add_argument(
        "--jsonl",
        metavar="FILE",
        help="a file with one message per line (JSON Lines); - for standard input",
    )
    p.add_argument(
        "--message-id",
        metavar="ID",
        help="the message's id (one message only); a Job's name derives from it",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a message header (repeat for more)",
    )
    p.add_argument("--content-type", metavar="TYPE", help="the body's MIME type")
    p.add_argument(
        "--force",
        action="store_true",
        help="publish what the checks refuse: a MESSAGE that names a file, a --jsonl line "
        "that is not JSON, a message the ScaledJob's template would dead-letter",
    )
    _local(p, executor=False)


def _status(p: argparse.ArgumentParser) -> None:
    _file(p)
    p.add_argument("-w", "--watch", action="store_true", help="keep refreshing (Ctrl-C stops)")
    p.add_argument(
        "--interval",
        type=interval_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes with --watch (default 1, at least 0.1)",
    )
    _output(p)
    _local(p)


def _jobs(p: argparse.ArgumentParser) -> None:
    _file(p)
    p.add_argument(
        "--limit",
        type=positive_int,
        default=50,
        metavar="N",
        help="show the N most recently finished Jobs per ScaledJob (default 50)",
    )
    _output(p)
    _local(p)


def _logs(p: argparse.ArgumentParser) -> None:
    _completes(
        p.add_argument(
            "job", metavar="JOB", type=job_name, help="the Job's name (see `jobrunner jobs`)"
        ),
        "job_names",
    )
    p.add_argument(
        "-c",
        "--container",
        metavar="NAME",
        help="only this container (init containers included)",
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing output as it is written, until the Job ends (as kubectl logs -f; "
        "the manifest is --file here)",
    )
    p.add_argument(
        "--file",
        metavar="FILE",
        help="a ScaledJob manifest: look in its ScaledJobs' namespace (default: -n, else default)",
    )
    p.add_argument(
        "--scaledjob", metavar="NAME", type=scaledjob_name, help="with --file: this ScaledJob's"
    )
    _local(p)


def _dead_letters(p: argparse.ArgumentParser) -> None:
    _file(p)
    p.add_argument(
        "--reason",
        action="append",
        default=[],
        metavar="REASON",
        help="only dead letters with this reason, in any case, e.g. BackoffLimitExceeded "
        "(repeat for more; one that matches none lists the reasons there are)",
    )
    p.add_argument(
        "--replay",
        nargs="*",
        metavar="ID",
        help="publish the dead letters shown (or only those with these IDs) back to their "
        "queue or topic as new work, and remove them from the dead letters",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=DEAD_LETTER_LIMIT,
        metavar="N",
        help="look at the N oldest dead letters (default 1000)",
    )
    p.add_argument(
        "--dead-letter-queue",
        metavar="NAME",
        help="read this queue (topic, for Kafka) instead of the ScaledJob's deadLetter.queue "
        "(topic) or <queue>.dead-letter; for dead letters routed through an exchange",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="Kafka: also show records already replayed (the topic keeps them)",
    )
    _output(p)
    _local(p)


def _functions(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["import"], help="import: write the manifests")
    p.add_argument(
        "directory",
        metavar="DIR",
        help="the function app: host.json with function.json folders or a function_app.py",
    )
    p.add_argument(
        "-o",
        "--out",
        metavar="DIR",
        help="where to write the manifests (default ./<app>-scaledjobs)",
    )
    p.add_argument("--name", metavar="NAME", help="the app's name (default: the directory's)")
    p.add_argument(
        "--image", metavar="IMAGE", help="the function app's image (default <app>:latest)"
    )
    p.add_argument(
        "--jobrunner-image",
        default="jobrunner:latest",
        metavar="IMAGE",
        help="the image that carries the in-Job invoker (default jobrunner:latest)",
    )
    p.add_argument(
        "--port", type=positive_int, default=8080, help="a custom handler's port (default 8080)"
    )
    p.add_argument(
        "--python",
        metavar="PATH",
        help="the interpreter that indexes a v2 app (and runs it with --local); it needs "
        "azure-functions and the app's imports (default: jobrunner's own)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="manifests for the local executor: this machine's paths, images ignored",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="with --local: triggers and queue outputs on the embedded queue (no broker)",
    )
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an app setting, over local.settings.json (repeat for more)",
    )


def _finalizers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["list", "release"],
        help="list the guarded Jobs, or release them (remove the finalizer)",
    )
    p.add_argument(
        "-f",
        "--file",
        metavar="FILE",
        help="a ScaledJob manifest: look in its ScaledJobs' namespaces",
    )
    _completes(
        p.add_argument(
            "--scaledjob",
            metavar="NAME",
            type=scaledjob_name,
            help="only the Jobs of this ScaledJob",
        ),
        "scaledjob_names",
    )
    p.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="every namespace (cluster: one cluster-wide list)",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="release without asking (a Job whose message is unsettled loses its guard)",
    )
    _output(p)
    _local(p)


def _render(p: argparse.ArgumentParser) -> None:
    _file(p, scaledjob="the ScaledJob to render (default: the first)")
    p.add_argument(
        "--message",
        required=True,
        metavar="BODY",
        help="the message body; @FILE for a file's content, - for standard input",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="render a --message that is the name of a file here as that text (without "
        "it, that is refused: @FILE is the file's content)",
    )
    p.add_argument("--message-id", metavar="ID", help="the message's id")
    p.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a message header (repeat for more)",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["yaml", "json"],
        default="yaml",
        metavar="FORMAT",
        help="yaml (default: the objects as documents) or json (a kind: List)",
    )


def _validate(p: argparse.ArgumentParser) -> None:
    _file(p)
    p.add_argument(
        "--sample-message",
        metavar="BODY",
        help="a message body to render through the template (default: {}); @FILE for a "
        "file's content, - for standard input",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="render a --sample-message that is the name of a file here as that text "
        "(without it, that is refused: @FILE is the file's content)",
    )
    p.add_argument(
        "--server-dry-run",
        action="store_true",
        help="also send the rendered Job to the cluster's API server with dryRun=All and "
        "strict field validation",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="also check what the local executor (run --local) refuses; "
        "JOBRUNNER_EXECUTOR=local does the same",
    )


def _completion(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=["bash", "zsh", "fish"], help="the shell: bash, zsh or fish")


def _operator(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--watch-namespace",
        action="append",
        default=[],
        metavar="NS",
        help="serve the ScaledJobs of this namespace (repeat, or a comma list; -n adds one; "
        "default: all namespaces; JOBRUNNER_OPERATOR__WATCH_NAMESPACES)",
    )
    p.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="serve the ScaledJobs of every namespace (the default without --watch-namespace)",
    )
    p.add_argument(
        "--selector",
        "-l",
        metavar="SELECTOR",
        help="only ScaledJobs with these labels, e.g. team=media "
        "(JOBRUNNER_OPERATOR__LABEL_SELECTOR)",
    )
    p.add_argument(
        "--lease-namespace",
        metavar="NS",
        type=namespace_name,
        help="namespace of the replicas' Leases (default: the pod's namespace, else default)",
    )
    p.add_argument(
        "--identity",
        metavar="NAME",
        help="this replica's name among the replicas (default: $POD_NAME or the host name, "
        "with a random suffix)",
    )
    p.add_argument(
        "--buckets",
        type=positive_int,
        metavar="N",
        help="ScaledJobs hash into N buckets, one Lease each, shared by the replicas "
        "(default 16; every replica must use the same)",
    )
    p.add_argument(
        "--keda-takeover",
        action="store_true",
        help="also serve keda.sh ScaledJobs annotated jobrunner.dev/takeover=true (and paused "
        "for KEDA): migrate one at a time",
    )


M = "scaledjob.yaml"
COMMANDS = [
    Command(
        name="run",
        group="Run",
        target="jobrunner.cli.run:cmd_run",
        summary="Consume messages and run one Job per message",
        description="Consume the trigger's queue or topic of every ScaledJob in the file and run\n"
        "one Job per message, until SIGTERM or Ctrl-C. Running Jobs are left running\n"
        "on exit; the next dispatcher adopts them.",
        usage="jobrunner run -f FILE [--local [--state-dir DIR]] [options]",
        examples=[
            ("Run without a cluster: Jobs are processes here", f"jobrunner run --local -f {M}"),
            ("Run on the cluster of a kubeconfig", f"jobrunner run -f {M} --kubeconfig ~/.kube/c"),
        ],
        configure=_run,
        local=True,
    ),
    Command(
        name="operator",
        group="Run",
        target="jobrunner.cli.operator:cmd_operator",
        summary="Serve the cluster's ScaledJob resources, one dispatcher each",
        description="Watch ScaledJob custom resources (jobrunner.dev/v1alpha1) and run one\n"
        "dispatcher per ScaledJob, writing its status and Events. Replicas share the\n"
        "ScaledJobs through Leases, every replica working; a spec change never touches\n"
        "running Jobs. Until SIGTERM or Ctrl-C, which hands the ScaledJobs over at once.",
        usage="jobrunner operator [--watch-namespace NS ... | -A] [-l SELECTOR] [options]",
        examples=[
            ("Serve every namespace's ScaledJobs", "jobrunner operator -A"),
            (
                "Two namespaces, Leases in jobrunner-system",
                "jobrunner operator --watch-namespace media,etl --lease-namespace jobrunner-system",
            ),
            (
                "Also take over KEDA ScaledJobs annotated for it",
                "jobrunner operator -A --keda-takeover",
            ),
        ],
        configure=_operator,
    ),
    Command(
        name="publish",
        group="Run",
        target="jobrunner.cli.run:cmd_publish",
        summary="Put messages on a ScaledJob's embedded queue",
        description="Put messages on the embedded queue (a `type: sqlite` trigger) of a "
        "ScaledJob.\nFor RabbitMQ or Kafka, publish with the broker's own tools.",
        usage="jobrunner publish -f FILE (MESSAGE... | --jsonl FILE) [options]",
        examples=[
            (
                "Two messages",
                f'jobrunner publish -f {M} \'{{"image": "cat.png"}}\' \'{{"image": "dog.png"}}\'',
            ),
            ("One message per line of a file", f"jobrunner publish -f {M} --jsonl messages.jsonl"),
            (
                "A message with an id and a header",
                f"jobrunner publish -f {M} --message-id order-7 --header tenant=acme @order.json",
            ),
        ],
        configure=_publish,
        state_dir=True,
    ),
    Command(
        name="render",
        group="Run",
        target="jobrunner.cli.offline:cmd_render",
        summary="Print the Job (and Secret) a message would become, offline",
        description="Print the Job a message would become, and its message Secret when the\n"
        "body goes by file, exactly as `run` would create them. Needs no cluster.",
        usage="jobrunner render -f FILE --message BODY [options]",
        examples=[
            (
                "The Job for a message",
                f'jobrunner render -f {M} --message \'{{"image": "cat.png"}}\'',
            ),
            (
                "As JSON (a kind: List), to apply by hand",
                f"jobrunner render -f {M} --message @msg.json -o json | kubectl apply -f -",
            ),
        ],
        configure=_render,
    ),
    Command(
        name="validate",
        group="Run",
        target="jobrunner.cli.offline:cmd_validate",
        summary="Check a manifest, its triggers and its Job template",
        description="Check what `run` or the API server would refuse: the manifest's fields "
        "and\ntriggers, the Job template against the batch/v1 schema, and a sample message\n"
        "rendered through it. Errors name the file, the line and the field.",
        usage="jobrunner validate -f FILE [--sample-message BODY] [--server-dry-run | --local]",
        examples=[
            ("Check a manifest offline", f"jobrunner validate -f {M}"),
            (
                "Also ask the API server",
                f'jobrunner validate -f {M} --server-dry-run --sample-message \'{{"task": "x"}}\'',
            ),
        ],
        configure=_validate,
    ),
    Command(
        name="status",
        group="Inspect and act",
        target="jobrunner.cli.observe:cmd_status",
        summary="Show Jobs in flight, the queue and whether a dispatcher runs",
        description="Show, per ScaledJob, the Jobs in flight against maxReplicaCount, how many\n"
        "finished, the embedded queue's counts and whether a dispatcher consumes it.",
        usage="jobrunner status -f FILE [--local] [-w] [-o FORMAT] [options]",
        examples=[
            ("Local Jobs, refreshed every second", f"jobrunner status --local -f {M} -w"),
            ("On the cluster, as JSON", f"jobrunner status -f {M} -n jobs -o json"),
        ],
        configure=_status,
        local=True,
    ),
    Command(
        name="jobs",
        group="Inspect and act",
        target="jobrunner.cli.observe:cmd_jobs",
        summary="List finished Jobs: outcome, reason, attempts, duration",
        description="List finished Jobs, newest first, with the message each was for, its\n"
        "outcome and reason, whether the message was dead-lettered, attempts and duration.",
        usage="jobrunner jobs -f FILE [--local] [--limit N] [-o FORMAT] [options]",
        examples=[
            ("Local Jobs", f"jobrunner jobs --local -f {M}"),
            ("The last 5, nothing cut", f"jobrunner jobs --local -f {M} --limit 5 -o wide"),
        ],
        configure=_jobs,
        local=True,
    ),
    Command(
        name="logs",
        group="Inspect and act",
        target="jobrunner.cli.observe:cmd_logs",
        summary="Print a Job's logs, every attempt, with exit codes",
        description="Print a Job's output: every attempt (a pod, on a cluster), init "
        "containers\nfirst in their order, each headed by its exit code and reason.",
        usage="jobrunner logs JOB [-c CONTAINER] [-f] [--file FILE] [--local] [options]",
        examples=[
            ("A local Job's logs", "jobrunner logs --local thumbnails-4d23ba658750ecd6"),
            (
                "Follow one container on the cluster",
                "jobrunner logs thumbnails-4d23ba658750ecd6 -n jobs -c worker -f",
            ),
        ],
        configure=_logs,
        local=True,
    ),
    Command(
        name="dead-letters",
        group="Inspect and act",
        target="jobrunner.cli.deadletters:cmd_dead_letters",
        summary="List dead letters and replay them as new work",
        description="List the messages a ScaledJob dead-lettered (embedded queue, RabbitMQ,\n"
        "Kafka or Azure Storage queue): id, reason, Job, age, the failure's detail and\n"
        "a body preview. --replay publishes them back to their queue or topic as new\n"
        "work, each with the header x-jobrunner-replay so it gets a new Job instead of\n"
        "being refused as a duplicate of the one that failed.",
        usage="jobrunner dead-letters -f FILE [--reason R] [--replay [ID ...]] [options]",
        examples=[
            ("List them", f"jobrunner dead-letters --local -f {M}"),
            (
                "Replay those that hit their backoff limit",
                f"jobrunner dead-letters --local -f {M} --reason BackoffLimitExceeded --replay",
            ),
            ("Replay two by id", f"jobrunner dead-letters --local -f {M} --replay 12 17"),
        ],
        configure=_dead_letters,
        local=True,
    ),
    Command(
        name="functions",
        group="Run",
        target="jobrunner.cli.functions:cmd_functions",
        summary="Import an Azure Functions app: one ScaledJob per function",
        description="Read a function app (host.json, each */function.json or a Python v2\n"
        "function_app.py, local.settings.json) and write one ScaledJob manifest per\n"
        "function a message triggers: queueTrigger -> azure-queue, rabbitMQTrigger ->\n"
        "rabbitmq, kafkaTrigger -> kafka, %Setting% values resolved, connection strings in\n"
        "a Secret. Functions jobrunner cannot run are listed with the reason.",
        usage="jobrunner functions import DIR [-o DIR] [-n NS] [--image IMAGE] [--local] [options]",
        examples=[
            (
                "Manifests for a cluster",
                "jobrunner functions import ./my-app -o manifests/ -n jobs --image my-app:1",
            ),
            (
                "Run an app on this machine with no broker",
                "jobrunner functions import ./my-app -o local/ --local --embedded",
            ),
        ],
        configure=_functions,
    ),
    Command(
        name="finalizers",
        group="Inspect and act",
        target="jobrunner.cli.finalizers:cmd_finalizers",
        summary="List or release Jobs still guarded by jobrunner's finalizer",
        description="Every Job jobrunner creates carries the finalizer jobrunner.dev/settlement\n"
        "until its message has a durable fate; a running dispatcher removes it. After\n"
        "jobrunner is uninstalled nothing will, and such Jobs (and their namespace) cannot\n"
        "be deleted: list them, then release them.",
        usage="jobrunner finalizers (list | release) [-f FILE | -n NS | -A] [options]",
        examples=[
            ("The guarded Jobs of a manifest's ScaledJobs", f"jobrunner finalizers list -f {M}"),
            ("Release every guarded Job on the cluster", "jobrunner finalizers release -A --yes"),
        ],
        configure=_finalizers,
        local=True,
    ),
]
COMMANDS.append(
    Command(
        name="completion",
        group="Shell",
        target="jobrunner.cli.completion:cmd_completion",
        summary="Print the shell completion script (bash, zsh or fish)",
        description="Print the script that makes TAB complete jobrunner's commands, options,\n"
        "files, the -f manifest's ScaledJob names (--scaledjob) and Job names (logs JOB:\n"
        "the state directory's with --local, else the cluster's). Load it in the shell's\n"
        "start-up file, as the examples show.",
        usage="jobrunner completion (bash | zsh | fish)",
        examples=[
            (
                'bash: put eval "$(jobrunner completion bash)" in ~/.bashrc',
                "jobrunner completion bash",
            ),
            ('zsh: put eval "$(jobrunner completion zsh)" in ~/.zshrc', "jobrunner completion zsh"),
            ("fish: put this in ~/.config/fish/config.fish", "jobrunner completion fish | source"),
        ],
        configure=_completion,
    )
)
BY_NAME = {c.name: c for c in COMMANDS}


def root_help() -> str:
    lines = [
        "jobrunner turns each message from a queue into exactly one Kubernetes Job, tracks",
        "it to its end and settles the message: ack, or dead-letter with the reason.",
        "",
        "Try it without a cluster or a broker:",
        '  jobrunner publish -f deploy/examples/scaledjob-local.yaml \'{"image": "cat.png"}\'',
        "  jobrunner run --local -f deploy/examples/scaledjob-local.yaml",
    ]
    for group in dict.fromkeys(c.group for c in COMMANDS):
        lines += ["", f"{group}:"]
        lines += [f"  {c.name:<14} {c.summary}" for c in COMMANDS if c.group == group]
    lines += [
        "",
        "Global options (before or after the command):",
        "  --kubeconfig PATH   kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)",
        "  --context NAME      kubeconfig context to use",
        "  -n, --namespace NS  namespace of the ScaledJobs and their Jobs",
        "  --debug             show the Python traceback of an unexpected error",
        "  --version           print the version",
        "  -h, --help          print this help",
        "",
        "Settings come from JOBRUNNER_* environment variables (see the README).",
        "",
        "Usage:",
        "  jobrunner [global options] COMMAND [options]",
        "",
        'Use "jobrunner COMMAND --help" for more about a command.',
    ]
    return "\n".join(lines) + "\n"


class _RootParser(Parser):
    """The root: a command's options work before its name as after it (see ``_hoist``),
    and an option the command does not take names the commands that do."""

    def format_help(self) -> str:
        return root_help()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = super().parse_known_args(self._hoist(argv), namespace)
        if extras and getattr(parsed, "command", None):
            self._not_an_option(str(parsed.command), extras)
        return parsed, extras

    def _commands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def _hoist(self, argv: list[str]) -> list[str]:
        """``argv`` with the options of its command that come before the command's name
        moved to just after it, so ``jobrunner --state-dir D publish …`` and ``jobrunner
        --local status …`` mean what they mean after the name. The command is the first
        word that is a command's name and not the value of an option before it (so
        ``--state-dir run publish`` is ``publish`` with the directory ``run``)."""
        commands = self._commands()
        for index, word in enumerate(argv):
            if word == "--":
                break
            if word in commands:
                _refuse_logs_file(word, argv[:index])
                split = self._split(argv[:index], word, commands[word])
                if split is not None:
                    root, own = split
                    rest = argv[index + 1 :]
                    _refuse_logs_file(word, rest)
                    _refuse_a_bare_manifest(word, commands[word], [*own, *rest])
                    return [*root, word, *own, *rest]
        return argv

    def _split(
        self, before: list[str], command: str, sub: argparse.ArgumentParser
    ) -> tuple[list[str], list[str]] | None:
        """``before`` as (the root's options, the command's options), or None when it
        cannot all be options (then ``command`` is an option's value, not the command)."""
        root: list[str] = []
        own: list[str] = []
        i = 0
        while i < len(before):
            word = before[i]
            if not word.startswith("-") or word == "-":
                return None
            name, attached = _option_name(word)
            action = self._option_string_actions.get(name)
            target = root
            if action is None:
                action = sub._option_string_actions.get(name)
                target = own
            if action is None:
                if self._takers(name):  # some other command's option
                    self._not_an_option(command, [word])
                return None
            taken = [] if attached else _values(action, before[i + 1 :])
            if taken is None:
                return None
            target += [word, *taken]
            i += 1 + len(taken)
        return root, own

    def _takers(self, option: str) -> list[str]:
        return [
            name for name, sub in self._commands().items() if option in sub._option_string_actions
        ]

    def _not_an_option(self, command: str, extras: list[str]) -> None:
        """Refuse ``extras``: for an option another command takes, name those commands."""
        for word in extras:
            name, _ = _option_name(word)
            takers = self._takers(name) if word.startswith("-") else []
            if takers:
                sys.stderr.write(
                    f"error: {command} takes no {name} (it is an option of "
                    f"{', '.join(takers)})\nSee '{PROG} {command} --help' for its options.\n"
                )
                sys.exit(2)
        # The command's own help is where its options are (not the top-level one).
        sys.stderr.write(
            f"error: unrecognized arguments: {' '.join(extras)}\n"
            f"See '{PROG} {command} --help' for usage and examples.\n"
        )
        sys.exit(2)

    def format_usage(self) -> str:
        return "usage: jobrunner [global options] COMMAND [options]\n"


def _option_name(word: str) -> tuple[str, bool]:
    """(the option, whether its value is attached): ``--x=v`` and ``-nv`` carry theirs."""
    if word.startswith("--"):
        name, eq, _ = word.partition("=")
        return name, bool(eq)
    if len(word) > 2:
        return word[:2], True
    return word, False


def _values(action: argparse.Action, following: list[str]) -> list[str] | None:
    """The words after an option that are its values (argparse's rule for its nargs),
    or None when it needs more than there are."""
    nargs = action.nargs
    if nargs == 0:
        return []
    if nargs is None or isinstance(nargs, int):
        count = 1 if nargs is None else nargs
        return following[:count] if len(following) >= count else None
    values = []
    for word in following:
        if word.startswith("-") and word != "-":
            break
        values.append(word)
        if nargs == "?":
            break
    if nargs == "+" and not values:
        return None
    return values


def _refuse_logs_file(command: str, rest: list[str]) -> None:
    """``logs -f`` is --follow, as kubectl's: ``logs -f m.yaml JOB`` would take the
    manifest as the Job, so a file after it is refused, naming ``--file``."""
    if command != "logs":
        return
    for word, following in itertools.pairwise(rest):
        if word == "-f" and _looks_like_a_file(following):
            sys.stderr.write(
                f"error: logs -f means --follow (as kubectl logs -f), not the manifest; "
                f"give the manifest as --file {following}\n"
                f"See '{PROG} logs --help' for usage and examples.\n"
            )
            sys.exit(2)


def _refuse_a_bare_manifest(command: str, sub: argparse.ArgumentParser, words: list[str]) -> None:
    """A manifest given without ``-f`` (``jobrunner run m.yaml``, as many tools take it):
    say to give it as ``-f``, not only that ``-f/--file`` is required."""
    if command == "logs" or "--file" not in sub._option_string_actions:
        return
    if any(w in ("-f", "--file") or w.startswith(("--file=", "-f")) for w in words):
        return
    manifest = next((w for w in words if w.endswith((".yaml", ".yml"))), None)
    if manifest is not None:
        sys.stderr.write(
            f"error: {command} takes the manifest as -f FILE; give it as -f {manifest}\n"
            f"See '{PROG} {command} --help' for usage and examples.\n"
        )
        sys.exit(2)


def _looks_like_a_file(word: str) -> bool:
    import os.path

    return word.endswith((".yaml", ".yml", ".json")) or "/" in word or os.path.isfile(word)


def _epilog(command: Command) -> str:
    lines = ["examples:"]
    for what, line in command.examples:
        lines += [f"  # {what}", f"  {line}", ""]
    return "\n".join(lines).rstrip()


def build_parser() -> Parser:
    parser = _RootParser(prog=PROG, allow_abbrev=False, add_help=True)
    parser.add_argument("--version", action="version", version=f"jobrunner {__version__}")
    _global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.summary,
            description=command.description,
            usage=command.usage,
            epilog=_epilog(command),
            formatter_class=_Formatter,
            allow_abbrev=False,
            aliases=command.aliases,
        )
        p.prog = f"{PROG} {command.name}"
        command.configure(p)
        _global_options(p, defaults=False)
    return parser
