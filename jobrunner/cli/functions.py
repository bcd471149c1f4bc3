"""``functions import``: a function app -> ScaledJob manifests (see
jobrunner.functions.importer, which owns the mapping)."""

from __future__ import annotations

from jobrunner.cli.context import Context


def cmd_functions(ctx: Context) -> int:
    from jobrunner.functions import importer

    return importer.run(ctx.args)
