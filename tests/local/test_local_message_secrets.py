"""The local executor keeps a message Secret by the cluster's rules: written after its
Job and owned by it, made by the redelivery when a crash came between the two, and one
already in place used only when it holds this very body."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from jobrunner.core.failpoints import Failpoints, InjectedFault
from jobrunner.core.protocols import ApiRejected
from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from jobrunner.rendering.messagesecret import CONFLICT_REASON
from jobrunner.tracking.tracker import outcome_of
from tests.helpers import eventually
from tests.local.conftest import ManifestFactory
from tests.local.test_local_executor import finished, logs, render

PRINT_THE_FILE = "import os; print(open(os.environ['JOBRUNNER_MESSAGE_FILE']).read())"
SELECTOR = "app.kubernetes.io/managed-by=jobrunner"


def jobdir_of(state: Path, job: dict[str, object]) -> JobDir:
    return JobDir(state / "jobs" / "default" / str(job["metadata"]["name"]))  # type: ignore[index]


async def test_a_job_refused_at_create_leaves_no_secret(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    path = manifest("unused", container={"command": None}, delivery={"mode": "file"})
    job, secret = render(path, b'{"task": "x"}')
    assert secret is not None
    with pytest.raises(ApiRejected):
        await LocalJobClient(state_dir).create_job(job, secret)
    assert not (state_dir / "jobs" / "default" / str(job["metadata"]["name"])).exists()


async def test_a_crash_between_job_and_secret_is_completed_by_the_redelivery(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    path = manifest(PRINT_THE_FILE, delivery={"mode": "file"})
    job, secret = render(path, b'{"order": 1}')
    crashing = LocalJobClient(
        state_dir, retry_seconds=0.1, failpoints=Failpoints(["raise:between-job-and-secret"])
    )
    with pytest.raises(InjectedFault):
        await crashing.create_job(job, secret)
    jobdir = jobdir_of(state_dir, job)
    assert jobdir.job() is not None
    assert jobdir.secret() is None, "stopped between the Job and its Secret"
    # A dispatcher started meanwhile finds the Job without a supervisor and starts one,
    # which waits for the Secret (as the kubelet waits to mount it) instead of failing.
    restarted = LocalJobClient(state_dir, retry_seconds=0.1)
    await restarted.list_jobs("default", SELECTOR)

    async def waiting() -> bool:
        return jobdir.supervised()

    await eventually(waiting, within=10)
    adopted, created = await restarted.create_job(job, secret)
    assert not created
    kept = jobdir.secret()
    assert kept is not None
    [owner] = kept["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Job", adopted["metadata"]["uid"])
    done = await finished(restarted, job)
    assert outcome_of(done).succeeded, logs(state_dir, job)  # type: ignore[union-attr]
    assert logs(state_dir, job)["1-main.log"].strip() == '{"order": 1}'


async def test_the_message_file_is_found_with_a_relative_state_directory(
    state_dir: Path, manifest: ManifestFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default state directory, ``.jobrunner``, is relative, and a Job's processes run
    in its ``work/`` directory: the paths they are given (the message file, the Job's
    directory) must not be relative, or the message file is "No such file"."""
    monkeypatch.chdir(state_dir.parent)
    path = manifest(PRINT_THE_FILE, delivery={"mode": "file"})
    job, secret = render(path, b'{"order": 7}')
    client = LocalJobClient(Path(state_dir.name), retry_seconds=0.1)
    await client.create_job(job, secret)
    done = await finished(client, job)
    assert outcome_of(done).succeeded, logs(state_dir, job)  # type: ignore[union-attr]
    assert logs(state_dir, job)["1-main.log"].strip() == '{"order": 7}'


async def test_a_secret_that_holds_another_body_is_refused_and_its_job_removed(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    path = manifest("import time; time.sleep(30)", delivery={"mode": "file"})
    job, secret = render(path, b'{"order": 2}')
    client = LocalJobClient(state_dir)
    await client.create_job(job, secret)
    # The Job's Secret now holds another body (as a swap under an older jobrunner left
    # it, or a hand edit): its redelivery must not adopt the Job.
    jobdir = jobdir_of(state_dir, job)
    assert secret is not None
    planted = json.loads(json.dumps(jobdir.secret()))
    planted["data"]["body"] = base64.b64encode(b"hostile").decode()
    jobdir.write_secret(planted)
    with pytest.raises(ApiRejected) as refused:
        await client.create_job(job, secret)
    assert (refused.value.status, refused.value.reason) == (409, CONFLICT_REASON)
    assert "holds another body" in refused.value.message
    assert not jobdir.path.exists(), "the Job that mounted it is gone, its processes too"


async def test_what_a_create_left_before_its_job_is_replaced_not_used(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    # An older jobrunner wrote the Secret first; a crash then left it with no Job.
    path = manifest(PRINT_THE_FILE, delivery={"mode": "file"})
    _, hostile_secret = render(path, b"hostile", message_id="x")
    genuine, genuine_secret = render(path, b'{"order": 3}', message_id="x")
    jobdir = jobdir_of(state_dir, genuine)
    jobdir.path.mkdir(parents=True)
    assert hostile_secret is not None
    jobdir.write_secret(hostile_secret)
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    _, created = await client.create_job(genuine, genuine_secret)
    assert created
    done = await finished(client, genuine)
    assert outcome_of(done).succeeded  # type: ignore[union-attr]
    assert logs(state_dir, genuine)["1-main.log"].strip() == '{"order": 3}'


async def test_a_secret_written_after_its_job_is_owned_by_it(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    path = manifest(PRINT_THE_FILE, delivery={"mode": "file"})
    job, secret = render(path, b'{"order": 4}')
    created, _ = await LocalJobClient(state_dir).create_job(job, secret)
    kept = jobdir_of(state_dir, job).secret()
    assert kept is not None
    [owner] = kept["metadata"]["ownerReferences"]
    assert owner["uid"] == created["metadata"]["uid"]
    assert (
        kept["metadata"]["annotations"]["jobrunner.dev/body-sha256"]
        == (created["metadata"]["annotations"]["jobrunner.dev/body-sha256"])
    )
