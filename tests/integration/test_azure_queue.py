"""``type: azure-queue`` against the real emulator (Azurite from the local stack), with
Jobs run by the local executor: one Job per message, leases renewed while a Job runs,
crash and restart, the poison queue, and one undecodable message among good ones."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.storage.queue.aio import QueueClient

from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers

pytestmark = pytest.mark.azurite

JOB = """
import json, os, sys, time
message = json.loads(os.environ["JOBRUNNER_MESSAGE"])
with open(os.environ["RUNS_FILE"], "a") as runs:
    runs.write(f"start {message['id']} {os.environ['JOBRUNNER_MESSAGE_ID']}\\n")
time.sleep(message.get("seconds", 0.2))
with open(os.environ["RUNS_FILE"], "a") as runs:
    runs.write(f"end {message['id']} {os.environ['JOBRUNNER_MESSAGE_ID']}\\n")
sys.exit(message.get("exit", 0))
"""


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    state.mkdir()
    yield state
    client = LocalJobClient(state, controller=False)
    jobs = state / "jobs"

    async def delete_all() -> None:
        for namespace in jobs.iterdir() if jobs.is_dir() else []:
            for job in namespace.iterdir():
                await client.delete_job(namespace.name, job.name)

    asyncio.run(delete_all())


@pytest.fixture
def dispatchers(state_dir: Path, tmp_path: Path) -> Iterator[Dispatchers]:
    d = Dispatchers(state_dir, tmp_path)
    yield d
    for proc in d.started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
async def azure_queue(azure_storage: str) -> AsyncIterator[str]:
    """A fresh queue; it and its poison queue are deleted afterwards."""
    name = f"q-{uuid.uuid4().hex[:12]}"
    async with QueueClient.from_connection_string(azure_storage, name) as queue:
        await queue.create_queue()
    yield name
    for each in (name, f"{name}-poison"):
        async with QueueClient.from_connection_string(azure_storage, each) as queue:
            with contextlib.suppress(Exception):
                await queue.delete_queue()


def manifest(tmp_path: Path, queue: str, *, max_replicas: int = 4) -> Path:
    doc = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "azq"},
        "spec": {
            "maxReplicaCount": max_replicas,
            "triggers": [
                {
                    "type": "azure-queue",
                    "metadata": {"queueName": queue, "connectionFromEnv": "STORAGE_CONNECTION"},
                }
            ],
            "jobTargetRef": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "main",
                                "image": "python:3.12-slim",
                                "command": ["python3", "-c", JOB],
                                "env": [{"name": "RUNS_FILE", "value": str(tmp_path / "runs")}],
                            }
                        ]
                    }
                },
            },
        },
    }
    path = tmp_path / "azq.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start(dispatchers: Dispatchers, path: Path, connection: str, **settings: str) -> Any:
    return dispatchers.start_with(
        path,
        {
            "STORAGE_CONNECTION": connection,
            "JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5",
            **settings,
        },
    )


async def send(connection: str, queue: str, *texts: str) -> None:
    async with QueueClient.from_connection_string(connection, queue) as client:
        for text in texts:
            await client.send_message(text)


def b64json(value: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def peek_all(connection: str, queue: str) -> list[str]:
    async def peek() -> list[str]:
        async with QueueClient.from_connection_string(connection, queue) as client:
            try:
                return [str(m.content) for m in await client.peek_messages(max_messages=32)]
            except Exception:
                return []

    return asyncio.run(peek())


def count(connection: str, queue: str) -> int:
    async def read() -> int:
        async with QueueClient.from_connection_string(connection, queue) as client:
            props = await client.get_queue_properties()
            return int(props.approximate_message_count or 0)

    return asyncio.run(read())


def runs(tmp_path: Path) -> list[tuple[str, str, str]]:
    path = tmp_path / "runs"
    if not path.exists():
        return []
    return [tuple(line.split()) for line in path.read_text().splitlines()]  # type: ignore[misc]


def outcomes(state: Path) -> dict[str, str]:
    base = state / "jobs" / "default"
    out = {}
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        conditions = JobDir(path).status().get("conditions") or [{}]
        out[path.name] = conditions[0].get("reason", "running")
    return out


def settled_count(dispatchers: Dispatchers, action: str = "acked the message (Job") -> int:
    return dispatchers.logs().count(action)


def test_each_azure_queue_message_runs_as_one_job_then_is_deleted(
    azure_storage: str, azure_queue: str, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    asyncio.run(send(azure_storage, azure_queue, *(b64json({"id": f"m{i}"}) for i in range(6))))
    start(dispatchers, manifest(tmp_path, azure_queue), azure_storage)
    wait_until(lambda: settled_count(dispatchers) >= 6, timeout=90)
    starts = sorted(ident for what, ident, _ in runs(tmp_path) if what == "start")
    assert starts == [f"m{i}" for i in range(6)], dispatchers.logs()
    # The Job's message id is the queue message's id: one Job per id.
    ids = {qid for what, _, qid in runs(tmp_path) if what == "start"}
    assert len(ids) == 6
    assert sorted(outcomes(state_dir).values()) == ["CompletionsReached"] * 6
    wait_until(lambda: count(azure_storage, azure_queue) == 0, timeout=30)
    assert peek_all(azure_storage, f"{azure_queue}-poison") == []


def test_a_job_running_past_the_visibility_timeout_is_not_delivered_again(
    azure_storage: str, azure_queue: str, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    asyncio.run(send(azure_storage, azure_queue, b64json({"id": "long", "seconds": 12})))
    start(
        dispatchers,
        manifest(tmp_path, azure_queue),
        azure_storage,
        JOBRUNNER_AZURE_QUEUE__VISIBILITY_TIMEOUT_SECONDS="3",
    )
    wait_until(lambda: settled_count(dispatchers) >= 1, timeout=90)
    assert [w for w, _, _ in runs(tmp_path)] == ["start", "end"], runs(tmp_path)
    logs = dispatchers.logs()
    # Four lease periods passed; the message was never handed out again.
    assert "adopted" not in logs, logs
    assert "redelivered" not in logs, logs
    assert "lease lost" not in logs, logs
    assert list(outcomes(state_dir).values()) == ["CompletionsReached"]
    wait_until(lambda: count(azure_storage, azure_queue) == 0, timeout=30)


def test_a_dispatcher_killed_mid_run_restarts_adopts_the_job_and_deletes_once(
    azure_storage: str, azure_queue: str, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    asyncio.run(send(azure_storage, azure_queue, b64json({"id": "crash", "seconds": 6})))
    path = manifest(tmp_path, azure_queue)
    short = {"JOBRUNNER_AZURE_QUEUE__VISIBILITY_TIMEOUT_SECONDS": "3"}
    first = start(dispatchers, path, azure_storage, **short)
    wait_until(lambda: any(w == "start" for w, _, _ in runs(tmp_path)), timeout=60)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert settled_count(dispatchers) == 0
    start(dispatchers, path, azure_storage, **short)
    wait_until(lambda: settled_count(dispatchers) >= 1, timeout=90)
    logs = dispatchers.logs()
    assert "adopted its existing Job" in logs, logs
    assert [w for w, _, _ in runs(tmp_path)] == ["start", "end"]  # one run, one Job
    assert list(outcomes(state_dir).values()) == ["CompletionsReached"]
    assert settled_count(dispatchers) == 1  # one deletion
    wait_until(lambda: count(azure_storage, azure_queue) == 0, timeout=30)
    assert peek_all(azure_storage, f"{azure_queue}-poison") == []


def test_a_failed_job_moves_its_message_to_the_poison_queue_with_the_reason_logged(
    azure_storage: str, azure_queue: str, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    text = b64json({"id": "bad", "exit": 3})
    asyncio.run(send(azure_storage, azure_queue, text))
    start(dispatchers, manifest(tmp_path, azure_queue), azure_storage)
    poison = f"{azure_queue}-poison"
    wait_until(lambda: peek_all(azure_storage, poison) == [text], timeout=90)
    wait_until(lambda: count(azure_storage, azure_queue) == 0, timeout=30)
    logs = dispatchers.logs()
    assert f"moved to {poison}: BackoffLimitExceeded" in logs, logs
    (job,) = outcomes(state_dir)
    events = (state_dir / "jobs" / "default" / job / "events.jsonl").read_text()
    assert "DeadLettered" in events
    assert "BackoffLimitExceeded" in events
    annotations = JobDir(state_dir / "jobs" / "default" / job).job()["metadata"]["annotations"]  # type: ignore[index]
    wait_until(
        lambda: (
            JobDir(state_dir / "jobs" / "default" / job)
            .job()["metadata"][  # type: ignore[index]
                "annotations"
            ]
            .get("jobrunner.dev/settled")
            == "dead-letter"
        ),
        timeout=30,
    )
    assert annotations["jobrunner.dev/message-id"]


def test_an_undecodable_message_is_poisoned_with_the_reason_and_its_neighbours_run(
    azure_storage: str, azure_queue: str, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    garbage = "this is not base64!"
    asyncio.run(
        send(
            azure_storage,
            azure_queue,
            b64json({"id": "before"}),
            garbage,
            b64json({"id": "after"}),
        )
    )
    start(dispatchers, manifest(tmp_path, azure_queue), azure_storage)
    poison = f"{azure_queue}-poison"
    wait_until(lambda: peek_all(azure_storage, poison) == [garbage], timeout=90)
    wait_until(lambda: settled_count(dispatchers) >= 2, timeout=90)
    assert sorted(i for w, i, _ in runs(tmp_path) if w == "start") == ["after", "before"]
    logs = dispatchers.logs()
    assert "InvalidMessage" in logs, logs
    assert "not base64" in logs, logs
    assert len(outcomes(state_dir)) == 2  # no Job for the undecodable one
    wait_until(lambda: count(azure_storage, azure_queue) == 0, timeout=30)


def test_a_missing_azure_queue_is_one_clear_line(
    azure_storage: str, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    missing = f"q-missing-{uuid.uuid4().hex[:8]}"
    start(dispatchers, manifest(tmp_path, missing), azure_storage)
    wait_until(lambda: "does not exist; create it" in dispatchers.logs(), timeout=60)
    assert f"queue {missing!r}" in dispatchers.logs()


def test_poison_messages_are_listed_and_a_replay_runs_as_a_new_job(
    azure_storage: str,
    azure_queue: str,
    state_dir: Path,
    dispatchers: Dispatchers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from jobrunner.cli import main as cli

    text = b64json({"id": "again", "exit": 1})
    asyncio.run(send(azure_storage, azure_queue, text))
    path = manifest(tmp_path, azure_queue)
    start(dispatchers, path, azure_storage)
    poison = f"{azure_queue}-poison"
    wait_until(lambda: peek_all(azure_storage, poison) == [text], timeout=90)
    monkeypatch.setenv("STORAGE_CONNECTION", azure_storage)
    capsys.readouterr()
    assert cli(["dead-letters", "-f", str(path), "--local", "-o", "json"]) == 0
    (letter,) = json.loads(capsys.readouterr().out)
    assert json.loads(letter["body"]) == {"id": "again", "exit": 1}
    assert cli(["dead-letters", "-f", str(path), "--local", "--replay", letter["id"]]) == 0
    assert peek_all(azure_storage, poison) == []
    # Back on its queue as a new message: a new id, so a second Job (which fails again).
    wait_until(lambda: len(outcomes(state_dir)) == 2, timeout=60)
    wait_until(lambda: len(peek_all(azure_storage, poison)) == 1, timeout=90)
