"""Errors for a person: every failure the command line meets ends as one ``error:`` line
that names the input (a file and line, a flag, an environment variable, a service) and
says what to do, with exit code 2 for a problem in what was given and 1 for a problem met
while running. Never a raw traceback: an error nobody foresaw says it is a bug and how
to see its traceback (``--debug``).

Exception types of libraries that are imported only by some commands are recognised
only when their module is already loaded (if it is not, the exception cannot be one of
them), so this module imports nothing heavy. It imports no other module of the command
line either (every one of them may import it): what it needs of the command being run,
the hint for a missing kubeconfig, is passed in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

USAGE = 2
"""A problem in what was given: a flag, a file, a setting."""
FAILED = 1
"""A problem met while running: a service down, a refusal, a failed render."""
INTERRUPTED = 130
"""Stopped by Ctrl-C (128 + SIGINT), whatever the command: also ``run`` and ``operator``,
which stop gracefully on it (see jobrunner.cli.stopping)."""
BROKEN_PIPE = 141
"""The reader of the output went away (128 + SIGPIPE): ``jobrunner jobs | head``."""


class CliError(Exception):
    """An error already said for a person; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def _loaded(module: str, name: str) -> type[BaseException] | None:
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _is(exc: BaseException, module: str, name: str) -> bool:
    kind = _loaded(module, name)
    return kind is not None and isinstance(exc, kind)


_NO_CLUSTER_HINT = "pass --kubeconfig"
"""What to do without a usable kubeconfig when the command gives no hint of its own."""


def explain(
    exc: BaseException, no_cluster_hint: Callable[[], str] | None = None
) -> tuple[str, int] | None:
    """The line (without ``error: ``) and exit code for a known failure; None for one
    nobody foresaw. ``no_cluster_hint``: what to do without a usable kubeconfig, in the
    flags of the command being run (asked only when that is the failure)."""
    if isinstance(exc, CliError):
        return str(exc), exc.code
    if _is(exc, "jobrunner.manifest.scaledjob", "ManifestError"):
        return str(exc), USAGE
    if _is(exc, "jobrunner.rendering.renderer", "RenderError"):
        # Only the offline commands render here (`run` renders in its dispatcher): the
        # message or the template they were given cannot make a Job.
        return f"the message cannot become a Job: {exc}", USAGE
    if _is(exc, "jobrunner.sources.sqlite", "QueueBusy"):
        return str(exc), FAILED
    if _is(exc, "kubernetes.config.config_exception", "ConfigException"):
        missing = _missing_context(str(exc))
        if missing is not None:  # the kubeconfig is there: the context is not in it
            return missing, USAGE
        # No kubeconfig: what was given (or not).
        hint = no_cluster_hint() if no_cluster_hint is not None else _NO_CLUSTER_HINT
        return f"no Kubernetes configuration ({exc}); {hint}", USAGE
    if _is(exc, "jobrunner.core.protocols", "TransientError"):
        return f"{exc}; is the cluster up? (`make stack-up` starts the local one)", FAILED
    if _is(exc, "jobrunner.core.apipath", "InvalidName"):  # refused before any request
        return str(getattr(exc, "message", exc)), USAGE
    if _is(exc, "jobrunner.core.protocols", "ApiRejected"):
        return f"the Kubernetes API server refused: {exc}", FAILED
    if _is(exc, "jobrunner.core.protocols", "SourceError"):
        return str(exc), FAILED
    for module, name, what in (
        ("aiokafka.errors", "KafkaError", "Kafka"),
        ("aiormq.exceptions", "AMQPError", "RabbitMQ"),
    ):
        if _is(exc, module, name):
            return f"{what}: {exc or type(exc).__name__}", FAILED
    if isinstance(exc, ConnectionError):
        return f"cannot reach the service: {exc}", FAILED
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc or 'no answer'}", FAILED
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}", USAGE
    return None


def _missing_context(text: str) -> str | None:
    """For the Kubernetes client's "Expected object with name NAME in PATH/contexts list":
    that the kubeconfig PATH has no context NAME, naming those it has; None for another
    configuration problem."""
    import re

    found = re.search(r"Expected object with name (\S+) in (.+)/contexts list", text)
    if found is None:
        return None
    name, path = found.groups()
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        names = [str(c.get("name")) for c in config.get("contexts") or [] if isinstance(c, dict)]
    except (OSError, ValueError, AttributeError, ImportError):
        names = []
    has = f"its contexts: {', '.join(names)}" if names else "it names none"
    return (
        f"--context {name}: the kubeconfig {path} has no context of that name ({has}); "
        "pass --context with one of them, or leave --context out for its current-context"
    )


def run_guarded(
    action: Callable[[], int],
    *,
    debug: bool,
    no_cluster_hint: Callable[[], str] | None = None,
) -> int:
    """Run ``action``; any exception becomes one line on stderr and an exit code
    (``no_cluster_hint`` as for ``explain``)."""
    try:
        code = action()
        # What is still buffered is written now, where a reader gone away is answered
        # (141); at exit it would be Python's "Exception ignored" and exit 120.
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`jobrunner jobs | head`): nothing more to say.
        _silence_stdout()
        return BROKEN_PIPE
    except SystemExit:
        raise
    except BaseException as exc:
        known = explain(exc, no_cluster_hint)
        if known is None:
            if debug:
                import traceback

                traceback.print_exc()
            print(
                f"error: unexpected {type(exc).__name__}: {exc}. This is a bug in jobrunner; "
                "run the command again with --debug for the traceback, and report it",
                file=sys.stderr,
            )
            return FAILED
        if debug:
            import traceback

            traceback.print_exc()
        message, code = known
        print(f"error: {message}", file=sys.stderr)
        return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def note(message: str, *args: Any) -> None:
    print(message % args if args else message, file=sys.stderr)
