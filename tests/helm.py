"""The Helm binary the chart tests use: the one deploy/local/build-helm.sh builds into
the stack's cache (HELM_VERSION there), else `helm` on PATH; skipped (failed with
CI=true) when neither is there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests import services

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "jobrunner"
HELM_VERSION = "v3.22.0"


def helm_binary() -> str:
    cache = Path(
        os.environ.get("JOBRUNNER_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jobrunner"
    )
    built = cache / f"helm-{HELM_VERSION}" / "bin" / "helm"
    if built.is_file():
        return str(built)
    found = shutil.which("helm")
    if found:
        return found
    services.missing("Helm", f"no {built} and no helm on PATH (make helm builds it)")
    raise AssertionError("unreachable")


def helm(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result
