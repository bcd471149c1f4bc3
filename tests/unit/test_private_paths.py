"""Every file and directory jobrunner makes in a state directory is made private from the
start, through ``jobrunner.core.privatefs``: a plain ``mkdir``/``open``/``write_text``
takes its mode from the umask (0755/0644 under the usual 022), so the state directory
`publish` made was readable by every user of the machine until a dispatcher tightened it
(i21, F1). This test finds any new way of making a path that does not go through the
helper; the few that write elsewhere say where, and why they may."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "jobrunner"

MAKES_A_PATH = re.compile(
    r"\.mkdir\(|os\.mkdir\(|os\.makedirs\(|\.write_text\(|\.write_bytes\(|\.touch\("
    r"|(?<![\w.])open\([^)]*['\"][wax]b?['\"]|shutil\.copy"
)

ELSEWHERE = {
    "core/privatefs.py": "the helper itself",
    "functions/importer.py": "writes the manifests of `functions import -o DIR`, the user's",
    "functions/invoker.py": "runs inside a Job's image (standard library only), not here",
    "rendering/sandbox/worker.py": "writes /proc/self/oom_score_adj",
}


def test_state_directory_paths_are_only_made_through_the_private_mode_helper() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name in ELSEWHERE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if MAKES_A_PATH.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == [], "make these through jobrunner.core.privatefs:\n" + "\n".join(found)
