"""What the local executor refuses is said before any message, where it can be known:
``run --local`` does not start and ``validate --local`` (or with JOBRUNNER_EXECUTOR=local)
fails, naming the file, the line and the field; what depends on the message is refused at
create and dead-lettered in the local executor's words, never as the API server's."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import yaml

from jobrunner.sources.sqlite import SQLiteQueue
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers, ManifestFactory
from tests.local.test_embedded_dispatch import dead_letters, publish, queue_state, settled
from tests.local.test_functions_embedded import holding_app


def jobrunner(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def without_command(manifest: ManifestFactory) -> Path:
    path = manifest("unused", job_spec={"suspend": True})
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0].pop("command")
    path.write_text(yaml.safe_dump(doc))
    return path


def test_run_local_refuses_at_start_what_the_local_executor_cannot_run(
    manifest: ManifestFactory, state_dir: Path
) -> None:
    path = without_command(manifest)
    publish(path, state_dir, {"id": 1})
    done = jobrunner("run", "--local", "--state-dir", str(state_dir), "-f", str(path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "error: the local executor cannot run this Job template"
    assert any(
        line.startswith(f"  {path}: line ")
        and "field spec.jobTargetRef.template.spec.containers[0].command: the local "
        "executor runs a container's command and args, not its image's entrypoint"
        in line
        for line in lines
    ), done.stderr
    assert any("field spec.jobTargetRef.suspend: the local executor" in line for line in lines)
    assert "Traceback" not in done.stderr
    # Nothing was consumed: the message waits for a template that can run.
    assert queue_state(state_dir, "work") == {"ready": 1, "in_hand": 0, "dead": 0}


def test_validate_in_local_mode_refuses_it_too_and_on_a_cluster_does_not(
    manifest: ManifestFactory,
) -> None:
    path = without_command(manifest)
    for args, env in (
        (["validate", "--local", "-f", str(path)], {}),
        (["validate", "-f", str(path)], {"JOBRUNNER_EXECUTOR": "local"}),
    ):
        done = jobrunner(*args, env=env)
        assert done.returncode == 2, done.stderr
        assert "containers[0].command: the local executor runs" in done.stderr
    # On a cluster the image's entrypoint runs; suspend is the user's to lift.
    assert jobrunner("validate", "-f", str(path)).returncode == 0


def test_validate_local_renders_the_sample_and_says_what_the_local_executor_refuses(
    manifest: ManifestFactory,
) -> None:
    path = manifest("print('x')", job_spec={"completions": "{{ message.json.parts }}"})
    refused = jobrunner("validate", "--local", "-f", str(path), "--sample-message", '{"parts": 3}')
    assert refused.returncode == 2  # a problem validate finds: a mistake in what was given
    assert "spec.completions: the local executor runs one pod per Job" in refused.stderr
    accepted = jobrunner("validate", "--local", "-f", str(path), "--sample-message", '{"parts": 1}')
    assert accepted.returncode == 0, accepted.stderr
    assert "renders a valid Job the local executor runs" in accepted.stdout


def test_a_refusal_that_depends_on_the_message_is_dead_lettered_in_the_local_executors_words(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers
) -> None:
    path = manifest("print('ran')", job_spec={"completions": "{{ message.json.parts }}"})
    publish(path, state_dir, {"parts": 1}, {"parts": 4})
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    [(body, headers)] = dead_letters(state_dir, "work")
    assert body == b'{"parts": 4}'
    assert headers["x-jobrunner-reason"] == "ApiRejected"
    detail = headers["x-jobrunner-detail"]
    assert "spec.completions: the local executor runs one pod per Job" in detail
    assert "API server" not in detail
    logs = dispatchers.logs()
    assert "the local executor rejected Job" in logs
    assert "API server rejected" not in logs


def test_an_imported_function_app_runs_with_the_readmes_commands_and_default_state_dir(
    tmp_path: Path,
) -> None:
    # functions import --local sets workingDir to the app; with the default, relative
    # state directory (.jobrunner) the invoker's files were looked for relative to it.
    app = holding_app(tmp_path)
    (app / "go").touch()  # the handler answers at once
    manifest = "local/shop-order.yaml"
    imported = jobrunner_in(
        tmp_path, "functions", "import", "./shop", "-o", "local/", "--local", "--embedded"
    )
    assert imported.returncode == 0, imported.stderr
    assert jobrunner_in(tmp_path, "publish", "-f", manifest, '{"id": "o-1"}').returncode == 0
    state = tmp_path / ".jobrunner"
    with (tmp_path / "run.log").open("wb") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "jobrunner.cli", "run", "--local", "-f", manifest],
            cwd=tmp_path,
            env={**os.environ, "JOBRUNNER_LOCAL__RETRY_SECONDS": "0.2"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: settled(state, "orders"), timeout=90)
        shown = (tmp_path / "run.log").read_text()
        assert dead_letters(state, "orders") == [], shown
        assert [b for b, _ in queue_messages(state, "receipts")] == [b"receipt o-1"], shown
    finally:
        run.kill()
        run.wait(timeout=10)


def jobrunner_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def queue_messages(state: Path, queue: str) -> list[tuple[bytes, dict[str, str]]]:
    async def read() -> list[tuple[bytes, dict[str, str]]]:
        db = await SQLiteQueue.open(state / "queue.db")
        try:
            return [(m.body, m.headers) for m in await db.messages(queue)]
        finally:
            await db.close()

    return asyncio.run(read())
