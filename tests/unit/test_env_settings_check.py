"""Misspelt JOBRUNNER_* settings are said, with the setting meant; the variables of
jobrunner's own scripts and Jobs are not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from jobrunner.cli.envcheck import misspelt, setting_names
from jobrunner.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_a_misspelt_setting_is_said_with_the_one_meant() -> None:
    said = misspelt(
        {
            "JOBRUNNER_LOCAL_STATE_DIR": "/tmp/x",  # one underscore for two
            "JOBRUNNER_LOG_LEVL": "DEBUG",
            "jobrunner_dispatcher__shutdown_grace": "5",  # any case, as pydantic reads
            "JOBRUNNER_NOTHING_LIKE_IT": "1",
        },
        Settings,
    )
    assert said == [
        "JOBRUNNER_LOCAL_STATE_DIR is not a jobrunner setting and is ignored; did you mean "
        "JOBRUNNER_LOCAL__STATE_DIR?",
        "JOBRUNNER_LOG_LEVL is not a jobrunner setting and is ignored; did you mean "
        "JOBRUNNER_LOG_LEVEL?",
        "JOBRUNNER_NOTHING_LIKE_IT is not a jobrunner setting and is ignored (the settings "
        "are the fields of jobrunner/core/settings.py's Settings)",
        "jobrunner_dispatcher__shutdown_grace is not a jobrunner setting and is ignored; did "
        "you mean JOBRUNNER_DISPATCHER__SHUTDOWN_GRACE_SECONDS?",
    ]


def test_settings_and_the_variables_of_our_own_scripts_and_jobs_are_not_said() -> None:
    # Every JOBRUNNER_* name the repository uses (scripts, Makefile, tests, the code that
    # hands variables to Jobs, the README) is a setting or one of our own.
    # (Both files below name misspelt ones on purpose.)
    skip = {Path(__file__).resolve(), ROOT / "jobrunner/cli/envcheck.py"}
    found: set[str] = set()
    for base in ("deploy", "tests", "bench", "jobrunner", "examples"):
        for path in (ROOT / base).rglob("*"):
            if (
                path.is_file()
                and path not in skip
                and path.suffix in {".py", ".sh", ".yaml", ".env", ""}
            ):
                found |= set(
                    re.findall(
                        r"\bJOBRUNNER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")
                    )
                )
    for path in (ROOT / "Makefile", ROOT / "README.md"):
        found |= set(re.findall(r"\bJOBRUNNER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert "JOBRUNNER_LOCAL__STATE_DIR" in found  # the walk saw the code
    found.discard("JOBRUNNER_LOCAL_STATE_DIR")  # the README's example of a misspelling
    assert misspelt(dict.fromkeys(found, "x"), Settings) == []


def test_every_settings_field_has_its_variable() -> None:
    names = set(setting_names(Settings))
    assert "JOBRUNNER_DISPATCHER__SHUTDOWN_GRACE_SECONDS" in names
    assert "JOBRUNNER_OTEL_TRACES_ENDPOINT" in names
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in names
    assert "JOBRUNNER_OTEL_TRACES_ENDPOINT".lower() not in names


def test_every_command_warns_of_a_misspelt_setting() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobrunner.cli",
            "validate",
            "-f",
            str(ROOT / "deploy/examples/scaledjob-local.yaml"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "JOBRUNNER_LOG_LEVL": "DEBUG"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "warning: JOBRUNNER_LOG_LEVL is not a jobrunner setting and is ignored; did you mean "
        "JOBRUNNER_LOG_LEVEL?"
    ) in done.stderr
