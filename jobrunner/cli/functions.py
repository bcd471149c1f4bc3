"""``functions import``: a function app -> ScaledJob manifests (see
jobrunner.functions.importer, which owns the mapping)."""

from __future__ import annotations

from jobrunner.cli.context import Context
from jobrunner.cli.errors import CliError


def cmd_functions(ctx: Context) -> int:
    from jobrunner.functions import importer

    if ctx.args.embedded and not ctx.args.local:
        # Cluster manifests on a queue file of this machine: neither the cluster's
        # dispatcher nor its Jobs could reach it (it was accepted, and silently so).
        raise CliError(
            "--embedded needs --local: the embedded queue is a file on this machine, which "
            "a cluster's dispatcher and Jobs do not share; add --local, or drop --embedded "
            "to keep the app's own triggers"
        )
    return importer.run(ctx.args)
