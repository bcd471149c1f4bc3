"""``jobrunner`` as it ran before the settlement finalizer, for a benchmark's baseline only
(``bench_finalizer.py``): the same command line, but its Jobs carry no finalizer and a
settlement writes nothing to the Job (no release PATCH), as before the guard landed.

Never a setting of the product: jobrunner itself always guards its Jobs. This module
patches a copy of jobrunner in its own process, and only a benchmark starts it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from jobrunner.cli import main
from jobrunner.core.models import FINALIZER
from jobrunner.kube.client import KubeJobClient
from jobrunner.rendering.renderer import RenderedJob, Renderer

_assemble = Renderer._assemble


def _assemble_unguarded(self: Renderer, *args: Any, **kwargs: Any) -> RenderedJob:
    rendered = _assemble(self, *args, **kwargs)
    meta = rendered.job["metadata"]
    meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
    if not meta["finalizers"]:
        del meta["finalizers"]
    return rendered


async def _no_release(
    self: KubeJobClient, namespace: str, name: str, annotations: Mapping[str, str]
) -> Mapping[str, Any] | None:
    return None


Renderer._assemble = _assemble_unguarded  # type: ignore[method-assign]
KubeJobClient.release_job = _no_release  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
