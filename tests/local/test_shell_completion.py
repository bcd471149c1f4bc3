"""Shell completion, run by the shells themselves: bash's completion function called as
bash calls it on TAB (COMP_WORDS, COMP_LINE, COMP_POINT), zsh's through its completion
system's registration (only the display, ``_describe``, stood in for), fish's with
``complete -C``. Commands, options, choices, a manifest's ScaledJob names and a state
directory's Job names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner.local.client import LocalJobClient
from tests.local.conftest import ManifestFactory
from tests.local.test_local_executor import render
from tests.services import program

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "deploy/examples/scaledjob-local.yaml"

BASH = r"""
source <(jobrunner completion bash)
line="$1"
COMP_LINE="$line"; COMP_POINT=${#line}
read -ra COMP_WORDS <<< "$line"
[[ "$line" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMPREPLY=()
"$(complete -p jobrunner | sed -E 's/.* -F ([^ ]+) .*/\1/')" jobrunner \
    "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""

ZSH = r"""
autoload -U compinit && compinit -u -D
eval "$(jobrunner completion zsh)"
[[ -n ${_comps[jobrunner]} ]] || { print "jobrunner not registered with compdef"; exit 3; }
# The completion system's display, stood in for: print what would be offered.
_describe() { print -rl -- "${(@P)2}" }
BUFFER="$1"; CURSOR=${#BUFFER}; words=(${=BUFFER}); [[ $BUFFER == *" " ]] && words+=("")
${_comps[jobrunner]}
"""

FISH = r"""
jobrunner completion fish | source
complete -C "$argv[1]"
"""


def offered(shell: str, line: str) -> list[str]:
    """What ``shell`` offers on TAB at the end of ``line``, one entry per candidate
    (zsh's and fish's descriptions cut off)."""
    program(shell, how=f"install Debian's {shell} package (deploy/local/install-system.sh does)")
    argv = {
        "bash": ["bash", "-c", BASH, "bash", line],
        "zsh": ["zsh", "-f", "-c", ZSH, "zsh", line],
        "fish": ["fish", "--no-config", "-c", FISH, line],
    }[shell]
    done = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
    )
    assert done.returncode == 0, done.stderr
    cut = {"bash": None, "zsh": ":", "fish": "\t"}[shell]
    out = []
    for entry in done.stdout.splitlines():
        if cut is not None:
            entry = entry.split(cut, 1)[0]
        out.append(entry.strip())
    return [e for e in out if e]


SHELLS = ["bash", "zsh", "fish"]


@pytest.mark.parametrize("shell", SHELLS)
def test_commands_complete(shell: str) -> None:
    assert offered(shell, "jobrunner lo") == ["logs"]
    assert "dead-letters" in offered(shell, "jobrunner ")


@pytest.mark.parametrize("shell", SHELLS)
def test_options_and_their_choices_complete(shell: str) -> None:
    assert set(offered(shell, "jobrunner dead-letters --re")) == {"--reason", "--replay"}
    assert sorted(offered(shell, "jobrunner completion ")) == ["bash", "fish", "zsh"]
    assert offered(shell, "jobrunner jobs -o y") == ["yaml"]


@pytest.mark.parametrize("shell", SHELLS)
def test_scaledjob_names_come_from_the_manifest(shell: str) -> None:
    assert offered(shell, f"jobrunner run -f {EXAMPLE} --scaledjob ") == ["thumbnails"]
    # One that does not load completes nothing, and says nothing.
    assert offered(shell, "jobrunner run -f nowhere.yaml --scaledjob ") == []


@pytest.mark.parametrize("shell", SHELLS)
async def test_job_names_come_from_the_state_directory(
    shell: str, state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    names = []
    for number in range(2):
        job, secret = render(manifest("print('hi')"), b"{}", message_id=f"m-{number}")
        await client.create_job(job, secret)
        names.append(job["metadata"]["name"])
    line = f"jobrunner logs --local --state-dir {state_dir} "
    assert offered(shell, line) == sorted(names)
    assert offered(shell, line + names[0][:-3]) == [names[0]]
