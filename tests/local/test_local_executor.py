"""The local executor on its own: Jobs rendered as the dispatcher renders them, run as
processes, with Kubernetes' outcomes."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.core.models import Delivery
from jobrunner.core.protocols import ApiRejected
from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from jobrunner.manifest.loader import load_manifest
from jobrunner.rendering.renderer import Renderer
from jobrunner.tracking.tracker import outcome_of
from tests.helpers import eventually
from tests.local.conftest import ROOT, ManifestFactory

NOTE_PID_AND_SLEEP = (
    "import os, time; open(os.environ['RUNS_FILE'], 'w').write(str(os.getpid()));"
    "print('started', flush=True); time.sleep(60)"
)


def render(manifest: Path, body: bytes, message_id: str = "m-1") -> tuple[dict[str, Any], Any]:
    scaledjob = load_manifest(manifest).scaledjobs[0]
    rendered = Renderer(scaledjob).render(
        Delivery(source="sqlite", identity=message_id, body=body, message_id=message_id)
    )
    return rendered.job, rendered.secret


async def finished(client: LocalJobClient, job: Mapping[str, Any], within: float = 20) -> Any:
    meta = job["metadata"]

    async def done() -> Mapping[str, Any] | None:
        current = await client.get_job(meta["namespace"], meta["name"])
        return current if current is not None and outcome_of(current) else None

    return await eventually(done, within=within)


def logs(state: Path, job: Mapping[str, Any]) -> dict[str, str]:
    jobdir = JobDir(state / "jobs" / "default" / job["metadata"]["name"])
    return {p.name: p.read_text() for p in sorted(jobdir.logs.glob("*.log"))}


async def test_exit_code_zero_completes_the_job(state_dir: Path, manifest: ManifestFactory) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    script = "import os; print('hello from', os.environ['HOSTNAME'])"
    job, secret = render(manifest(script), b"{}")
    created, was_new = await client.create_job(job, secret)
    assert was_new
    assert created["metadata"]["uid"]
    done = await finished(client, job)
    assert outcome_of(done).reason == "CompletionsReached"  # type: ignore[union-attr]
    assert done["status"]["succeeded"] == 1
    assert logs(state_dir, job) == {"1-main.log": f"hello from {job['metadata']['name']}-1\n"}


async def test_failed_attempts_are_retried_up_to_the_backoff_limit(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(manifest("import sys; print('try'); sys.exit(3)", backoff_limit=2), b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)
    outcome = outcome_of(done)
    assert outcome is not None
    assert (outcome.outcome.value, outcome.reason) == ("failed", "BackoffLimitExceeded")
    assert done["status"]["failed"] == 3
    assert [a["exitCodes"] for a in done["status"]["attempts"]] == [{"main": 3}] * 3
    assert list(logs(state_dir, job)) == ["1-main.log", "2-main.log", "3-main.log"]


async def test_a_job_that_fails_then_succeeds_completes(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    # The first attempt leaves a mark and fails; the retry finds it and succeeds.
    script = (
        "import os, sys, pathlib; p = pathlib.Path(os.environ['RUNS_FILE']);"
        "first = not p.exists(); p.write_text('x'); sys.exit(1 if first else 0)"
    )
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(manifest(script, backoff_limit=1), b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)
    assert outcome_of(done).succeeded  # type: ignore[union-attr]
    assert done["status"]["failed"] == 1


async def test_active_deadline_ends_the_job_and_its_processes(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    client = LocalJobClient(state_dir)
    job, secret = render(manifest(NOTE_PID_AND_SLEEP, deadline=2), b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)  # within 20 s, though the process sleeps 60
    outcome = outcome_of(done)
    assert outcome is not None
    assert outcome.reason == "DeadlineExceeded"
    pid = int((tmp_path / "runs.txt").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert logs(state_dir, job)["1-main.log"] == "started\n"


@pytest.mark.parametrize(
    ("mode", "script"),
    [
        ("env", "import os; print(os.environ['JOBRUNNER_MESSAGE'])"),
        ("file", "import os; print(open(os.environ['JOBRUNNER_MESSAGE_FILE']).read())"),
        ("args", "import sys; print(sys.argv[1])"),
    ],
)
async def test_the_message_reaches_the_process_as_on_a_cluster(
    state_dir: Path, manifest: ManifestFactory, mode: str, script: str
) -> None:
    # `$(HOME)` must reach the Job as written, though the kubelet expands $(VAR).
    path = manifest(script, delivery={"mode": mode})
    body = json.dumps({"order": 42, "note": "it's $(HOME) and {{ not a template }}"}).encode()
    client = LocalJobClient(state_dir)
    job, secret = render(path, body)
    await client.create_job(job, secret)
    done = await finished(client, job)
    assert outcome_of(done).succeeded, logs(state_dir, job)  # type: ignore[union-attr]
    assert logs(state_dir, job)["1-main.log"].strip() == body.decode()


async def test_creating_the_same_job_again_adopts_it(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir)
    job, secret = render(manifest("import time; time.sleep(0.5)"), b"{}")
    first, created = await client.create_job(job, secret)
    again, created_again = await client.create_job(job, secret)
    assert (created, created_again) == (True, False)
    assert again["metadata"]["uid"] == first["metadata"]["uid"]


async def test_a_job_without_a_command_is_rejected_naming_the_field(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    path = manifest("unused", container={"command": None})
    client = LocalJobClient(state_dir)
    job, secret = render(path, b"{}")
    with pytest.raises(ApiRejected) as info:
        await client.create_job(job, secret)
    assert info.value.status == 422
    assert "spec.template.spec.containers[0].command" in info.value.message
    assert "add `command:`" in info.value.message
    assert not (state_dir / "jobs" / "default" / job["metadata"]["name"]).exists()


async def test_jobs_outlive_a_lost_supervisor_which_is_restarted(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(manifest("import time; time.sleep(1.5)", backoff_limit=1), b"{}")
    await client.create_job(job, secret)
    jobdir = JobDir(state_dir / "jobs" / "default" / job["metadata"]["name"])

    async def running() -> bool:
        return bool(jobdir.status().get("active")) and jobdir.supervised()

    await eventually(running, within=10)
    pid = jobdir.supervisor_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def orphaned() -> bool:
        return not jobdir.supervised()

    await eventually(orphaned, within=5)
    # A new dispatcher's client (as after a restart) finds the Job unsupervised.
    fresh = LocalJobClient(state_dir, retry_seconds=0.1)
    await fresh.list_jobs("default", "app.kubernetes.io/managed-by=jobrunner")
    done = await finished(fresh, job)
    assert outcome_of(done).succeeded  # type: ignore[union-attr]
    attempts = done["status"]["attempts"]
    assert attempts[0]["problem"] == "the attempt's supervisor was lost"
    assert done["status"]["failed"] == 1


async def test_deleting_a_job_stops_its_processes_and_removes_it(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    client = LocalJobClient(state_dir)
    job, secret = render(manifest(NOTE_PID_AND_SLEEP), b"{}")
    await client.create_job(job, secret)
    runs = tmp_path / "runs.txt"

    async def started() -> bool:
        return runs.exists() and runs.read_text() != ""

    await eventually(started, within=10)
    name = job["metadata"]["name"]
    # As on a cluster, jobrunner's finalizer holds the deletion until the message is
    # settled: the Job is marked, and runs on.
    await client.delete_job("default", name)
    marked = await client.get_job("default", name)
    assert marked is not None
    assert marked["metadata"]["deletionTimestamp"]
    os.kill(int(runs.read_text()), 0)  # still running
    released = await client.release_job("default", name, {"jobrunner.dev/settled": "ack"})
    assert released is not None
    assert released["metadata"]["finalizers"] == []
    assert await client.get_job("default", name) is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(runs.read_text()), 0)


async def test_a_job_without_finalizers_is_deleted_at_once(
    state_dir: Path, manifest: ManifestFactory, tmp_path: Path
) -> None:
    client = LocalJobClient(state_dir)
    job, secret = render(manifest(NOTE_PID_AND_SLEEP), b"{}")
    job["metadata"]["finalizers"] = []
    await client.create_job(job, secret)
    runs = tmp_path / "runs.txt"

    async def started() -> bool:
        return runs.exists() and runs.read_text() != ""

    await eventually(started, within=10)
    await client.delete_job("default", job["metadata"]["name"])
    assert await client.get_job("default", job["metadata"]["name"]) is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(runs.read_text()), 0)


async def test_ttl_after_finished_deletes_the_job(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir)
    path = manifest("pass", job_spec={"ttlSecondsAfterFinished": 1})
    job, secret = render(path, b"{}")
    await client.create_job(job, secret)
    await finished(client, job)
    selector = "jobrunner.dev/scaledjob=work"

    async def marked() -> bool:
        page = await client.list_jobs("default", selector)
        return bool(page.items and page.items[0]["metadata"].get("deletionTimestamp"))

    # The TTL controller's deletion waits on the finalizer, then completes.
    await eventually(marked, within=10)
    await client.release_job("default", job["metadata"]["name"], {})

    async def gone() -> bool:
        page = await client.list_jobs("default", selector)
        return not page.items

    await eventually(gone, within=10)


async def test_watch_reports_a_job_finishing(state_dir: Path, manifest: ManifestFactory) -> None:
    client = LocalJobClient(state_dir, poll_interval=0.05)
    selector = "jobrunner.dev/scaledjob=work"
    page = await client.list_jobs("default", selector)
    job, secret = render(manifest("import time; time.sleep(0.3)"), b"{}")
    await client.create_job(job, secret)
    seen = []
    async for event in client.watch_jobs("default", selector, page.resource_version):
        seen.append(event.type)
        if outcome_of(event.object) is not None:
            break
    assert seen[0] == "ADDED"
    assert seen[-1] == "MODIFIED"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"backoffLimit": "two"}, "spec.backoffLimit"),
        ({"activeDeadlineSeconds": "1m"}, "spec.activeDeadlineSeconds"),
        ({"completions": True}, "spec.completions"),
        ({"backofLimit": 1}, "spec.backofLimit"),
    ],
)
async def test_a_job_the_api_server_would_refuse_is_refused_at_create(
    state_dir: Path, manifest: ManifestFactory, change: dict[str, Any], field: str
) -> None:
    client = LocalJobClient(state_dir)
    job, secret = render(manifest("print('never')"), b"{}")
    job["spec"].update(change)
    with pytest.raises(ApiRejected) as info:
        await client.create_job(job, secret)
    assert info.value.status == 422
    assert f"{field}: " in info.value.message
    assert not (state_dir / "jobs" / "default" / job["metadata"]["name"]).exists()


async def test_a_container_env_with_a_nul_byte_is_refused_at_create(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir)
    job, secret = render(manifest("print('never')"), b"{}")
    job["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "X", "value": "a\0b"})
    with pytest.raises(ApiRejected) as info:
        await client.create_job(job, secret)
    assert "NUL byte" in info.value.message


async def test_a_supervisor_that_meets_the_unexpected_fails_the_job_once_not_forever(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, _ = render(manifest("print('never')"), b"{}")
    name = job["metadata"]["name"]
    jobdir = JobDir(state_dir / "jobs" / "default" / name)
    jobdir.path.mkdir(parents=True)
    # A Job record written by something other than create (an older version, a hand
    # edit) that the supervisor cannot run.
    job["spec"]["backoffLimit"] = "two"
    job["metadata"].update(uid="u-1", creationTimestamp="2026-01-01T00:00:00Z")
    jobdir.write_job(job)
    await client.list_jobs("default", "app.kubernetes.io/managed-by=jobrunner")
    done = await finished(client, job)
    condition = done["status"]["conditions"][-1]
    assert (condition["type"], condition["reason"]) == ("Failed", "LocalExecutorError")
    assert "ValueError" in condition["message"]
    assert "Traceback" in (jobdir.path / "supervisor.log").read_text()


async def test_security_context_and_resources_are_said_to_be_not_applied(
    state_dir: Path, manifest: ManifestFactory, caplog: pytest.LogCaptureFixture
) -> None:
    path = manifest(
        "print('ok')",
        container={
            "resources": {"limits": {"memory": "64Mi"}},
            "securityContext": {"runAsUser": 1},
        },
    )
    job, secret = render(path, b"{}")
    with caplog.at_level("WARNING", logger="jobrunner.local.client"):
        await LocalJobClient(state_dir).create_job(job, secret)
    [line] = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert line.startswith("local executor: resources and securityContext not applied")


EXAMPLE_TEMPLATES = {
    # The README's embedded-mode example, as it is.
    "scaledjob-local.yaml": ROOT / "deploy/examples/scaledjob-local.yaml",
    # The Job template the broker examples name, under an embedded trigger.
    "echo-job.yaml": ROOT / "job_templates/echo-job.yaml",
}


@pytest.mark.parametrize("example", sorted(EXAMPLE_TEMPLATES))
async def test_the_example_jobs_take_a_body_that_comes_as_a_file(
    example: str, state_dir: Path, tmp_path: Path
) -> None:
    """A body over ``maxEnvBytes`` (32 KiB) comes as ``$JOBRUNNER_MESSAGE_FILE``, not in
    ``$JOBRUNNER_MESSAGE``: the examples a newcomer copies read whichever they got (i21,
    F10: the embedded example's worker crashed on ``KeyError: 'JOBRUNNER_MESSAGE'``)."""
    path = EXAMPLE_TEMPLATES[example]
    if example == "echo-job.yaml":
        path = tmp_path / "echo.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "keda.sh/v1alpha1",
                    "kind": "ScaledJob",
                    "metadata": {"name": "echo"},
                    "spec": {
                        "jobTemplate": str(EXAMPLE_TEMPLATES[example]),
                        "triggers": [{"type": "sqlite", "metadata": {"queueName": "echo"}}],
                    },
                }
            )
        )
    body = json.dumps({"image": "big.png", "task": "t", "seconds": 0, "pad": "x" * 40_000})
    job, secret = render(path, body.encode())
    assert secret is not None  # it goes by file
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    await client.create_job(job, secret)
    done = await finished(client, job, within=60)
    output = "".join(logs(state_dir, job).values())
    assert outcome_of(done).succeeded, output  # type: ignore[union-attr]
    assert "big.png" in output or '"pad"' in output, output
