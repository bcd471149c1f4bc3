"""Every command's --help, walked: each option says what it does once, with its default
at most once, and nothing it documents is a leftover ("unused", "None", a format
string)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from jobrunner.cli.parser import COMMANDS, build_parser
from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.rendering.renderer import load_job_template, template_dirs


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_entries(help_text: str) -> list[str]:
    """Each option's entry of a help page (``  -x, --xx ARG  what it does``, and the
    positional arguments' ``  NAME  what it is``), its wrapped lines joined."""
    entries: list[str] = []
    current: int | None = None
    for line in help_text.splitlines():
        if re.match(r"^  (-|[A-Za-z{])", line):
            entries.append(line.strip())
            current = len(entries) - 1
        elif current is not None and re.match(r"^\s{6,}\S", line):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_option_of_every_command_says_its_default_at_most_once(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    page = subparsers()[command].format_help()
    entries = option_entries(page)
    assert entries, page
    for entry in entries:
        assert entry.count("(default") <= 1, entry
        assert len(re.findall(r"\bdefault[: ]", entry)) <= 1, entry
    for leftover in ("unused", "None)", "%(", "(default: )"):
        assert leftover not in page, f"{command} --help shows {leftover!r}:\n{page}"


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_option_of_every_command_has_a_help_text(command: str) -> None:
    for action in subparsers()[command]._actions:
        assert action.help, (command, action.dest)
        assert action.help != argparse.SUPPRESS, (command, action.dest)


def test_a_missing_job_template_names_each_path_tried_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the manifest's directory is the working directory
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "ScaledJob",
                "metadata": {"name": "w"},
                "spec": {
                    "jobTemplate": "nowhere.yaml",
                    "triggers": [{"type": "sqlite", "metadata": {"queueName": "w"}}],
                },
            }
        )
    )
    scaledjob = load_manifest(path).scaledjobs[0]
    with pytest.raises(ManifestError) as error:
        load_job_template(scaledjob, base_dirs=template_dirs(path))
    tried = re.search(r"\(tried ([^)]*)\)", str(error.value))
    assert tried is not None, str(error.value)
    paths = tried.group(1).split(", ")
    assert len(paths) == len(set(paths)) == 2, paths
    assert "./job_templates/" in str(error.value)
