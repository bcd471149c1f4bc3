"""The command line: ``jobrunner run | publish | render | validate | status | jobs | logs
| dead-letters | functions import``. The only code that reads the environment (through
Settings).

One module per command group, sharing one way to build settings, manifests and clients
(``context``) and one way to say an error (``errors``):

* ``parser``       the grammar and the help (standard library only, so ``--help`` and
                   ``--version`` are instant);
* ``run``          run a dispatcher, publish to the embedded queue;
* ``offline``      render, validate: nothing running needed;
* ``observe``      status, jobs, logs;
* ``deadletters``  list and replay dead letters;
* ``functions``    import an Azure Functions app (the mapping is jobrunner.functions').

A command module is imported only when its command runs, and heavy libraries only by
the command that uses them.

It is the top of the house: it may import every package. Must not import: nothing, but
nothing imports it (import-linter's layers contract).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from jobrunner.cli.parser import build_parser

    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # a TAB: the shell asks what fits (see completion)
        from jobrunner.cli.completion import autocomplete

        autocomplete(parser)
    args = parser.parse_args(argv)  # --version and --help end here
    if args.command is None:
        parser.print_help()
        return 0
    from jobrunner.cli.context import Context
    from jobrunner.cli.envcheck import warn_misspelt
    from jobrunner.cli.errors import run_guarded

    warn_misspelt()  # every command: a setting misspelt is a setting silently not set
    ctx = Context(args)

    def command() -> int:
        module, _, function = ctx.command.target.partition(":")
        code: int = getattr(importlib.import_module(module), function)(ctx)
        return code

    return run_guarded(
        command, debug=bool(getattr(args, "debug", False)), no_cluster_hint=ctx.no_cluster_hint
    )


if __name__ == "__main__":
    sys.exit(main())
