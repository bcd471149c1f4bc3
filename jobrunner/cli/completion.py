"""Shell completion: ``jobrunner completion bash|zsh|fish`` prints the script to load
(``source <(jobrunner completion bash)``, ``jobrunner completion fish | source``), and
every TAB then asks jobrunner itself what fits: commands, options and their choices,
files for ``-f``, the names of the ScaledJobs of the ``-f`` manifest for
``--scaledjob``, and for ``logs`` the names of the Jobs (of the state directory with
``--local``, else of the cluster, in ``-n`` or ``default``).

Built on argcomplete (its shell scripts for bash, zsh and fish, and its parsing of the
line as argparse parses it, quoting and ``--opt=value`` included) rather than on our own
shell code, and rather than on shtab, whose scripts are static: no fish, and names known
only at TAB time (a manifest's ScaledJobs, a state directory's Jobs) would need shell
code of our own for each shell. The price is a Python start per TAB (the parser is
standard library only: about 50 ms) and, for a cluster's Job names, a listing bounded
by ``_CLUSTER_SECONDS``.

A completer never prints and never raises: a manifest that does not load or a cluster
that does not answer completes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobrunner.cli.context import Context

SHELLS = ("bash", "zsh", "fish")
_CLUSTER_SECONDS = 3.0
"""The longest a TAB waits for the cluster's Job names."""
_MOST = 200
"""At most this many names are offered (a namespace may keep thousands of Jobs)."""


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request (argcomplete's ``_ARGCOMPLETE`` protocol)
    and exit; returns at once when the process was not started for one."""
    import argcomplete

    _attach_completers(parser)

    # Options are offered once a "-" is typed, as kubectl and git do.
    argcomplete.autocomplete(parser, always_complete_options=False)


def _attach_completers(parser: argparse.ArgumentParser) -> None:
    """Give each argument the parser marked (``parser.COMPLETES``) the completer of this
    module it names, in the subcommands' parsers too; argcomplete calls ``completer``."""
    from jobrunner.cli.parser import COMPLETES

    for action in parser._actions:
        name = getattr(action, COMPLETES, None)
        if name is not None:
            action.completer = _COMPLETERS[name]  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                _attach_completers(sub)


def cmd_completion(ctx: Context) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["jobrunner"], shell=ctx.args.shell))
    return 0


def _quiet(find: Callable[..., list[str]]) -> Callable[..., list[str]]:
    def complete(*, prefix: str = "", parsed_args: Any = None, **_: Any) -> list[str]:
        with contextlib.suppress(Exception):
            names = find(parsed_args)
            return sorted(n for n in names if n.startswith(prefix))[:_MOST]
        return []

    return complete


def _scaledjobs(parsed_args: argparse.Namespace) -> list[str]:
    from jobrunner.manifest.loader import load_manifest

    path = getattr(parsed_args, "file", None)
    if not path:
        return []
    return [s.name for s in load_manifest(Path(path).expanduser()).scaledjobs]


def _jobs(parsed_args: argparse.Namespace) -> list[str]:
    from jobrunner.cli.context import Context
    from jobrunner.core.models import LABEL_MANAGED_BY, MANAGED_BY

    ctx = Context(parsed_args)
    namespace = ctx.flag("namespace") or "default"
    client = ctx.job_client()

    async def names() -> list[str]:
        try:
            page = await asyncio.wait_for(
                client.list_jobs(namespace, f"{LABEL_MANAGED_BY}={MANAGED_BY}", limit=_MOST),
                timeout=_CLUSTER_SECONDS,
            )
            return [str(j["metadata"]["name"]) for j in page.items]
        finally:
            await client.close()

    return asyncio.run(names())


scaledjob_names = _quiet(_scaledjobs)
"""Completer of ``--scaledjob``: the ScaledJobs of the ``-f`` manifest."""
job_names = _quiet(_jobs)
"""Completer of ``logs JOB``: the Jobs jobrunner made, locally or on the cluster."""
_COMPLETERS = {"scaledjob_names": scaledjob_names, "job_names": job_names}
"""The completers by the names the parser marks its arguments with."""
