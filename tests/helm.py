"""The Helm binary the chart tests use: the one deploy/local/build-helm.sh builds into
the stack's cache (its HELM_VERSION), else `helm` on PATH; skipped (failed with CI=true)
when neither is there, saying how to get one. `make test-unit` builds it first when Go
is on PATH (`make helm`, about a minute with a warm Go cache); no stack is needed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import services

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "jobrunner"
_BUILD = ROOT / "deploy" / "local" / "build-helm.sh"
# The version the build script makes, read from it so the two never disagree.
_PINNED = re.search(r'HELM_VERSION="\$\{HELM_VERSION:-(v[0-9.]+)\}"', _BUILD.read_text())
assert _PINNED is not None, f"no HELM_VERSION default in {_BUILD}"
HELM_VERSION = _PINNED[1]


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
    how = (
        "`make helm` builds it (Go is on PATH; about a minute), or put helm on PATH"
        if shutil.which("go")
        else "put helm on PATH, or install Go and run `make helm`"
    )
    message = f"Helm is not available: no {built} and no helm on PATH; {how}"
    if services.in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def helm(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result
