"""File mode honours what operator mode honours: the pause annotations, and an edit of
the manifest file (seen by polling, or on SIGHUP) applied by the operator's rule —
running Jobs untouched, the change logged, an invalid edit refused with its line and the
old manifest kept running. `jobrunner run --local` as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import wait_until
from tests.local.conftest import Dispatchers, ManifestFactory
from tests.local.test_embedded_dispatch import publish, queue_state

# Notes "<version> <id>" when it starts; waits for the message's gate file (bounded)
# before it ends, so a test can hold a Job running across an edit.
JOB = """
import json, os, time
message = json.loads(os.environ["JOBRUNNER_MESSAGE"])
with open(os.environ["RUNS_FILE"], "a") as runs:
    runs.write(f"{os.environ['VERSION']} {message['id']} start\\n")
gate = message.get("until")
deadline = time.time() + 120
while gate and not os.path.exists(gate) and time.time() < deadline:
    time.sleep(0.05)
with open(os.environ["RUNS_FILE"], "a") as runs:
    runs.write(f"{os.environ['VERSION']} {message['id']} end\\n")
"""


def _runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs.txt"
    return path.read_text().splitlines() if path.exists() else []


def _edit(path: Path, change: Any) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))


def _set_version(version: str) -> Any:
    def change(doc: dict[str, Any]) -> None:
        [container] = doc["spec"]["jobTargetRef"]["template"]["spec"]["containers"]
        container["env"] = [e for e in container["env"] if e["name"] != "VERSION"]
        container["env"].append({"name": "VERSION", "value": version})

    return change


def _annotate(annotations: dict[str, str]) -> Any:
    def change(doc: dict[str, Any]) -> None:
        doc["metadata"]["annotations"] = annotations

    return change


def _versioned(manifest: ManifestFactory, version: str = "v1") -> Path:
    return manifest(JOB, container={"env": [{"name": "VERSION", "value": version}]})


def _reload(proc: subprocess.Popen[bytes], how: str) -> None:
    """After an edit: SIGHUP, or nothing (the file is watched)."""
    if how == "sighup":
        proc.send_signal(signal.SIGHUP)


@pytest.mark.parametrize("annotation", ["autoscaling.keda.sh/paused", "jobrunner.dev/paused"])
def test_a_paused_scaledjob_consumes_nothing_until_the_annotation_goes(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    tmp_path: Path,
    annotation: str,
) -> None:
    path = _versioned(manifest)
    _edit(path, _annotate({annotation: "true"}))
    publish(path, state_dir, {"id": "m1"})
    dispatchers.start(path)
    wait_until(lambda: f"paused by the annotation {annotation}" in dispatchers.logs())
    wait_until(lambda: "watched for changes" in dispatchers.logs())
    # The loop is up and has said it is paused: the message must still wait.
    assert queue_state(state_dir, "work")["ready"] == 1, dispatchers.logs()
    assert _runs(tmp_path) == []
    # KEDA's rule: a Go false unpauses.
    _edit(path, _annotate({annotation: "false"}))
    wait_until(lambda: "v1 m1 end" in _runs(tmp_path), timeout=60)
    assert "reloaded; changed: work" in dispatchers.logs()


@pytest.mark.parametrize("how", ["watch", "sighup"])
def test_an_edited_template_serves_new_messages_and_leaves_running_jobs_alone(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    tmp_path: Path,
    how: str,
) -> None:
    path = _versioned(manifest)
    gate = tmp_path / "gate"
    publish(path, state_dir, {"id": "m1", "until": str(gate)})
    proc = dispatchers.start_with(path, {"JOBRUNNER_DISPATCHER__SHUTDOWN_GRACE_SECONDS": "1"})
    wait_until(lambda: "v1 m1 start" in _runs(tmp_path), timeout=60)
    _edit(path, _set_version("v2"))
    _reload(proc, how)
    replaced = "dispatcher replaced, running Jobs untouched"
    wait_until(lambda: replaced in dispatchers.logs(), timeout=60)
    reason = "SIGHUP" if how == "sighup" else "the file changed"
    assert f"({reason}): reloaded; changed: work" in dispatchers.logs()
    publish(path, state_dir, {"id": "m2"})
    wait_until(lambda: "v2 m2 end" in _runs(tmp_path), timeout=60)
    # The Job started before the edit still runs, under the old template.
    assert "v1 m1 end" not in _runs(tmp_path)
    gate.touch()
    wait_until(lambda: "v1 m1 end" in _runs(tmp_path), timeout=60)
    wait_until(lambda: queue_state(state_dir, "work")["in_hand"] == 0, timeout=60)
    assert queue_state(state_dir, "work") == {"ready": 0, "in_hand": 0, "dead": 0}
    assert not any(line.startswith("v2 m1") for line in _runs(tmp_path))


@pytest.mark.parametrize(
    ("breakage", "said"),
    [
        (lambda path: path.write_text(path.read_text() + "  bad: [\n"), "line"),
        (
            lambda path: _edit(path, lambda d: d["spec"].update(maxReplicaCount=0)),
            "field spec.maxReplicaCount",
        ),
        (
            lambda path: _edit(
                path,
                lambda d: d["spec"]["jobTargetRef"]["template"]["spec"].update(
                    containers="not a list"
                ),
            ),
            "containers",
        ),
    ],
    ids=["yaml", "field", "template"],
)
def test_an_invalid_edit_is_refused_with_its_line_and_the_old_manifest_keeps_running(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    tmp_path: Path,
    breakage: Any,
    said: str,
) -> None:
    path = _versioned(manifest)
    proc = dispatchers.start(path)
    wait_until(lambda: "watched for changes" in dispatchers.logs(), timeout=60)
    good = path.with_name("good.yaml")  # what publish can still read
    good.write_text(path.read_text())
    breakage(path)
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "the edit is refused" in dispatchers.logs(), timeout=60)
    [refusal] = [line for line in dispatchers.logs().splitlines() if "edit is refused" in line]
    assert str(path) in refusal, refusal
    assert said in refusal, refusal
    publish(good, state_dir, json.dumps({"id": "m1"}))
    wait_until(lambda: "v1 m1 end" in _runs(tmp_path), timeout=60)
    assert proc.poll() is None


def test_a_new_limit_is_applied_live_and_a_removed_scaledjob_stops(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = _versioned(manifest)
    proc = dispatchers.start(path)
    wait_until(lambda: "watched for changes" in dispatchers.logs(), timeout=60)
    _edit(path, lambda d: d["spec"].update(maxReplicaCount=2))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "applied live: maxReplicaCount 2" in dispatchers.logs(), timeout=60)
    other = yaml.safe_load(path.read_text())
    other["metadata"]["name"] = "other"
    other["spec"]["triggers"][0]["metadata"]["queueName"] = "other"
    path.write_text(yaml.safe_dump(other))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "added: other; removed: work" in dispatchers.logs(), timeout=60)
    wait_until(lambda: "dispatcher stopped; running Jobs continue" in dispatchers.logs())
    publish(path, state_dir, {"id": "m1"})
    wait_until(lambda: "v1 m1 end" in _runs(tmp_path), timeout=60)
