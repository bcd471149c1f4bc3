"""The one way every command builds what it works with: settings (the ``JOBRUNNER_*``
environment, then the flags), the manifest's ScaledJobs (with ``-n`` applied), a client
for Jobs (the cluster's or the local executor's), and hints that repeat the flags the
user gave (a hint that drops ``--state-dir`` points at the wrong place).

Every input is checked here before anything uses it, so a bad setting, a kubeconfig that
does not exist or a ``--state-dir`` that is a file is one ``error:`` line, not a
traceback from deep inside.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobrunner.cli.errors import USAGE, CliError, warn
from jobrunner.cli.parser import BY_NAME, Command
from jobrunner.core.privatefs import private_dir

if TYPE_CHECKING:
    from jobrunner.core.settings import Settings
    from jobrunner.manifest.loader import ManifestSet
    from jobrunner.manifest.scaledjob import ScaledJob
    from jobrunner.runner import ClosableJobClient

_ENV_PREFIX = "JOBRUNNER_"


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.command: Command = BY_NAME[args.command]

    # ------------------------------------------------------------------ flags
    def flag(self, name: str) -> Any:
        return getattr(self.args, name, None)

    @property
    def local(self) -> bool:
        return bool(self.flag("local"))

    # ------------------------------------------------------------------ settings
    @cached_property
    def settings(self) -> Settings:
        from pydantic import ValidationError
        from pydantic_settings import SettingsError

        from jobrunner.core.settings import Executor, Settings

        try:
            settings = Settings()
        except ValidationError as exc:
            raise CliError(_env_problems(exc)) from None
        except SettingsError as exc:
            raise CliError(_env_parse_problem(exc)) from None
        if self.flag("kubeconfig"):
            path = Path(self.flag("kubeconfig")).expanduser()
            if not path.is_file():
                what = "is a directory" if path.is_dir() else "does not exist"
                raise CliError(f"--kubeconfig {self.flag('kubeconfig')}: the file {what}")
            settings.kube.kubeconfig = str(path)
        if self.flag("context"):
            settings.kube.context = self.flag("context")
        if self.local:
            settings.executor = Executor.LOCAL
        if self.flag("state_dir"):
            settings.local.state_dir = Path(self.flag("state_dir")).expanduser()
        _check_state_dir(
            settings.local.state_dir,
            where=self.state_dir_source(settings.local.state_dir),
            used=self._uses_state_dir(),
            create=self.command.name in _WRITES_STATE,
        )
        if logging.getLevelName(settings.log_level.upper()) not in range(0, 51):
            raise CliError(
                f"{_ENV_PREFIX}LOG_LEVEL={settings.log_level!r} is not a log level; use "
                "DEBUG, INFO, WARNING or ERROR"
            )
        return settings

    # ------------------------------------------------------------------ manifests
    @cached_property
    def manifests(self) -> ManifestSet:
        """The file's ScaledJobs, in the namespace of ``-n`` when given (a ScaledJob that
        names another namespace is an error, as with kubectl)."""
        return self.read_manifests()

    def read_manifests(self) -> ManifestSet:
        """The file read now, as ``manifests`` reads it (``run`` reads it again on a
        change)."""
        from jobrunner.manifest.loader import load_manifest

        path = Path(self.args.file)
        manifests = load_manifest(path)
        namespace = self.flag("namespace")
        if not namespace:
            return manifests
        moved = []
        for scaledjob in manifests.scaledjobs:
            meta = scaledjob.metadata
            if "namespace" in meta.model_fields_set and meta.namespace != namespace:
                raise CliError(
                    f"{path}: ScaledJob {scaledjob.name} is in namespace {meta.namespace!r}, "
                    f"not {namespace!r}; drop -n or pass -n {meta.namespace}"
                )
            moved.append(
                scaledjob.model_copy(
                    update={"metadata": meta.model_copy(update={"namespace": namespace})}
                )
            )
        return manifests.model_copy(update={"scaledjobs": moved})

    def scaledjobs(self) -> list[ScaledJob]:
        """The ScaledJobs ``--scaledjob`` selects (all of the file without it)."""
        manifests = self.manifests
        wanted = self.flag("scaledjob")
        if not wanted:
            return list(manifests.scaledjobs)
        matches = [s for s in manifests.scaledjobs if s.name == wanted]
        if not matches:
            names = ", ".join(s.name for s in manifests.scaledjobs)
            raise CliError(
                f"{manifests.path}: no ScaledJob named {wanted!r}; --scaledjob takes one of: "
                f"{names}"
            )
        return matches

    def notes(self) -> None:
        """A line on stderr for each document of the file jobrunner skips."""
        for skipped in self.manifests.skipped:
            print(f"{self.manifests.path}: note: skipped {skipped}", file=sys.stderr)

    # ------------------------------------------------------------------ clients
    def job_client(self, *, read_only: bool = True) -> ClosableJobClient:
        """Where Jobs are: the local executor (``--local``; read-only unless asked) or the
        cluster (its kubeconfig checked first)."""
        from jobrunner.core.settings import Executor

        settings = self.settings
        if settings.executor is Executor.LOCAL:
            from jobrunner.local.client import LocalJobClient

            if read_only:
                return LocalJobClient(settings.local.state_dir, controller=False)
        else:
            self.check_kubeconfig()
        from jobrunner.runner import job_client

        return job_client(settings)

    def kube_client(self) -> ClosableJobClient:
        """The cluster's client whatever the executor (``validate --server-dry-run``)."""
        from jobrunner.kube.client import KubeJobClient, load_api_client

        self.check_kubeconfig()
        kube = self.settings.kube
        return KubeJobClient(load_api_client(kube.kubeconfig, kube.context))

    def check_kubeconfig(self) -> None:
        configured = self.settings.kube.kubeconfig
        if configured and not self.flag("kubeconfig") and not Path(configured).is_file():
            raise CliError(
                f"{_ENV_PREFIX}KUBE__KUBECONFIG={configured}: the file does not exist", USAGE
            )
        if not configured and os.environ.get("KUBECONFIG"):
            files = [p for p in os.environ["KUBECONFIG"].split(os.pathsep) if p]
            if files and not any(Path(p).expanduser().is_file() for p in files):
                raise CliError(
                    f"KUBECONFIG={os.environ['KUBECONFIG']}: no such file; fix or unset it, "
                    "or pass --kubeconfig",
                    USAGE,
                )

    def no_cluster_hint(self) -> str:
        """What to do without a usable kubeconfig, in flags this command takes."""
        hint = "pass --kubeconfig PATH or set KUBECONFIG"
        if self.command.local:
            hint += ", or add --local to use Jobs on this machine"
        elif self.command.name == "validate":
            hint += ", or drop --server-dry-run to check offline"
        return hint

    # ------------------------------------------------------------------ hints
    def again(self, command: str, *args: str, local: bool | None = None) -> str:
        """A command line for ``command`` that keeps the flags the user gave and the
        command takes (global ones, ``--local``, ``--state-dir``), then ``args``.
        ``local``: whether to say ``--local`` (default: as the user did)."""
        target = BY_NAME[command]
        words = ["jobrunner", command]
        if (self.local if local is None else local) and target.local:
            words.append("--local")
        if self.flag("state_dir") and (target.local or target.state_dir):
            words += ["--state-dir", self.flag("state_dir")]
        for flag, name in (
            ("--kubeconfig", "kubeconfig"),
            ("--context", "context"),
            ("-n", "namespace"),
        ):
            if self.flag(name):
                words += [flag, self.flag(name)]
        words += list(args)
        return shlex.join(words)

    def file_args(self) -> list[str]:
        out = ["-f", self.args.file]
        if self.flag("scaledjob"):
            out += ["--scaledjob", self.flag("scaledjob")]
        return out

    def state_dir_source(self, state: Path) -> str:
        """How the user named the state directory (the flag, the setting or the default),
        so that an error about it points at what to change."""
        if self.flag("state_dir"):
            return f"--state-dir {self.flag('state_dir')}"
        if os.environ.get(f"{_ENV_PREFIX}LOCAL__STATE_DIR"):
            return f"{_ENV_PREFIX}LOCAL__STATE_DIR={state}"
        return f"the state directory {state} (the default; --state-dir DIR for another)"

    def _uses_state_dir(self) -> bool:
        """Whether this command reads or writes the state directory for certain: the local
        executor, ``publish`` (the embedded queue), or a directory the user named. (A
        cluster command may also read an embedded queue's counts; it only warns.)"""
        return (
            self.local
            or self.command.name == "publish"
            or bool(self.flag("state_dir"))
            or bool(os.environ.get(f"{_ENV_PREFIX}LOCAL__STATE_DIR"))
        )

    def warn_if_no_state(self) -> bool:
        """Warn when the state directory looked at does not exist (nothing ran here, or
        it is elsewhere); True when it exists."""
        state = self.settings.local.state_dir
        if state.is_dir():
            return True
        if self.flag("state_dir"):
            warn(f"--state-dir {self.flag('state_dir')} does not exist: nothing has run there yet")
        elif os.environ.get(f"{_ENV_PREFIX}LOCAL__STATE_DIR"):
            warn(f"{_ENV_PREFIX}LOCAL__STATE_DIR={state} does not exist: nothing has run there yet")
        else:
            warn(
                f"no {state} here ({Path.cwd()}): nothing has run in this directory; "
                "pass --state-dir DIR if the dispatcher keeps its state elsewhere"
            )
        return False


_WRITES_STATE = frozenset({"run", "publish"})
"""Commands that fill the state directory (Jobs, the embedded queue): it is created
before they start. The others (which may write in it too: a replay, a released
finalizer, SQLite's journal) find it writable or say so."""


def _check_state_dir(state: Path, *, where: str, used: bool, create: bool) -> None:
    """Refuse, in one line naming ``where``, a state directory this command cannot use:
    a file, a path under a file, and (when the command uses it) one that cannot be
    created or written, such as one on a read-only filesystem or under /sys. Found by
    trying (creating a probe file), not by ``os.access``: root passes ``access(2)`` on a
    filesystem that then refuses the write (sysfs, a read-only bind mount). Without this
    ``run`` retried forever and ``publish`` met the failure deep inside SQLite."""
    if state.exists() and not state.is_dir():
        raise CliError(
            f"{where}: is a file, not a directory; give a directory (it is created when missing)"
        )
    parent = next((p for p in state.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CliError(f"{where}: {parent} is a file, not a directory")
    if not used:
        return
    fix = "give a directory you can write, e.g. --state-dir ~/.jobrunner"
    if create and not state.is_dir():
        try:
            # Private from the start (0700, and its missing parents too): it will hold
            # message bodies and Secrets; a plain mkdir gave 0755 under the usual umask.
            private_dir(state)
        except OSError as exc:
            raise CliError(
                f"{where}: cannot be created in {parent} ({exc.strerror or exc}; a read-only "
                f"filesystem?); {fix}"
            ) from None
    target = state if state.is_dir() else parent
    if target is None:
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".jobrunner-probe-", dir=target)
    except OSError as exc:
        what = "cannot write in it" if target == state else f"cannot be created in {target}"
        raise CliError(
            f"{where}: {what} ({exc.strerror or exc}; a read-only filesystem?); {fix}"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The variable a settings field is read from (``("local", "retry_seconds")`` is
    JOBRUNNER_LOCAL__RETRY_SECONDS), or its parent's when that is the one set."""
    parts = [str(p) for p in loc]
    for n in range(len(parts), 0, -1):
        name = _ENV_PREFIX + "__".join(parts[:n]).upper()
        if name in os.environ:
            return name
    if parts and parts[0].isupper():  # an alias such as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
        return parts[0]
    return _ENV_PREFIX + "__".join(parts).upper()


def _env_problems(exc: Any) -> str:
    problems = []
    for item in exc.errors():
        name = _env_name(tuple(item["loc"]))
        given = os.environ.get(name)
        shown = f"{name}={given!r}" if given is not None else name
        text = str(item["msg"])
        text = text[0].lower() + text[1:] if text else text
        problems.append(f"{shown}: {text}")
    return "invalid setting " + "; ".join(problems) + "; fix it or unset it"


def _env_parse_problem(exc: Exception) -> str:
    text = str(exc)
    field = text.split('"')[1] if '"' in text else ""
    names = sorted(k for k in os.environ if k.startswith(_ENV_PREFIX + field.upper()))
    shown = ", ".join(f"{k}={os.environ[k]!r}" for k in names) or _ENV_PREFIX + field.upper()
    return f"invalid setting {shown}: not valid JSON for a list or mapping; fix it or unset it"
