#!/usr/bin/env python3
"""Write the CustomResourceDefinitions of operator mode, rendered from jobrunner's pydantic
models (jobrunner/operator/crd.py), here and into the Helm chart's crds/ directory.

    python deploy/crds/generate.py          # write
    python deploy/crds/generate.py --check  # exit 1 naming each file that differs

A test runs --check, so the files can never drift from the models.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobrunner.operator.crd import render  # noqa: E402

TARGETS = [ROOT / "deploy" / "crds", ROOT / "deploy" / "helm" / "jobrunner" / "crds"]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for target in TARGETS:
        for name, text in render().items():
            path = target / name
            if check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path.relative_to(ROOT)))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)} ({len(text.encode())} bytes)")
    if stale:
        print(
            "out of date (run python deploy/crds/generate.py): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
