"""The embedded mode end to end: `jobrunner publish`, then `jobrunner run --local` as a
user runs it, with the same guarantees as on a cluster."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

from jobrunner.cli import main
from jobrunner.local.jobdir import JobDir
from jobrunner.sources.sqlite import SQLiteQueue
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers, ManifestFactory

# Each Job notes its start and end (O_APPEND lines are atomic) so a test can tell how
# often a message ran and how many ran at once.
RECORDING_JOB = """
import json, os, time
message = json.loads(os.environ["JOBRUNNER_MESSAGE"])
def note(what):
    with open(os.environ["RUNS_FILE"], "a") as runs:
        runs.write(f"{what} {message['id']} {time.time()}\\n")
note("start")
# What the Job was told (README "Provenance: what the Job is told"), one JSON line each.
told = {k: v for k, v in os.environ.items() if k.startswith("JOBRUNNER_") or k == "TRACEPARENT"}
told.pop("JOBRUNNER_MESSAGE", None)
with open(os.environ["RUNS_FILE"] + ".told", "a") as out:
    out.write(json.dumps({"id": message["id"], **told}) + "\\n")
time.sleep(message.get("seconds", 0.5))
gate = message.get("until")  # a file the test creates when the Job may end (bounded)
deadline = time.time() + 120
while gate and not os.path.exists(gate) and time.time() < deadline:
    time.sleep(0.05)
note("end")
raise SystemExit(message.get("exit", 0))
"""


def publish(manifest: Path, state: Path, *bodies: object) -> None:
    texts = [b if isinstance(b, str) else json.dumps(b) for b in bodies]
    # --force: these tests hand the dispatcher the messages publish would refuse too.
    args = ["publish", "-f", str(manifest), "--state-dir", str(state), "--force", *texts]
    assert main(args) == 0


def queue_state(state: Path, queue: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        q = await SQLiteQueue.open(state / "queue.db")
        try:
            counts = await q.counts(queue, f"{queue}.dead-letter")
        finally:
            await q.close()
        return {"ready": counts.ready, "in_hand": counts.in_hand, "dead": counts.dead_letter}

    return asyncio.run(read())


def dead_letters(state: Path, queue: str) -> list[tuple[bytes, dict[str, str]]]:
    async def read() -> list[tuple[bytes, dict[str, str]]]:
        q = await SQLiteQueue.open(state / "queue.db")
        try:
            return [(m.body, m.headers) for m in await q.messages(f"{queue}.dead-letter")]
        finally:
            await q.close()

    return asyncio.run(read())


def runs(tmp_path: Path) -> list[tuple[str, str, float]]:
    path = tmp_path / "runs.txt"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, ident, when = line.split()
        out.append((what, ident, float(when)))
    return out


def told(tmp_path: Path) -> dict[str, dict[str, str]]:
    """What each Job's process saw in its environment, by message id."""
    path = tmp_path / "runs.txt.told"
    lines = path.read_text().splitlines() if path.exists() else []
    return {entry.pop("id"): entry for entry in map(json.loads, lines)}


def job_outcomes(state: Path) -> list[str]:
    out = []
    for path in sorted((state / "jobs" / "default").iterdir()):
        conditions = JobDir(path).status().get("conditions") or [{}]
        out.append(conditions[0].get("reason", "running"))
    return out


def settled(state: Path, queue: str) -> bool:
    counts = queue_state(state, queue)
    return counts["ready"] == 0 and counts["in_hand"] == 0


def test_each_message_runs_once_within_the_concurrency_cap(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(RECORDING_JOB, max_replicas=3, deadline=300)
    publish(path, state_dir, *({"id": f"m{i}", "seconds": 0.6} for i in range(10)))
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    events = runs(tmp_path)
    starts = sorted(ident for what, ident, _ in events if what == "start")
    assert starts == sorted(f"m{i}" for i in range(10))  # each exactly once
    active = peak = 0
    for what, _, _ in sorted(events, key=lambda e: (e[2], e[0] == "start")):
        active += 1 if what == "start" else -1
        peak = max(peak, active)
    assert peak == 3, dispatchers.logs()
    assert job_outcomes(state_dir) == ["CompletionsReached"] * 10
    assert queue_state(state_dir, "work")["dead"] == 0
    # Each process was told what made its Job, as the process sees it (the local
    # executor expands env as the kubelet does).
    seen = told(tmp_path)
    assert sorted(seen) == sorted(f"m{i}" for i in range(10))
    ids = set()
    for env in seen.values():
        assert env["JOBRUNNER_SOURCE"] == "sqlite"
        assert env["JOBRUNNER_TRIGGER_TYPE"] == "sqlite"
        assert env["JOBRUNNER_TRIGGER_SOURCE"] == "work"
        assert env["JOBRUNNER_TRIGGER_SOURCE_KIND"] == "queue"
        assert env["JOBRUNNER_DELIVERY_COUNT"] == "1"
        assert env["JOBRUNNER_REDELIVERED"] == "false"
        assert env["JOBRUNNER_ACTIVE_DEADLINE_SECONDS"] == "300"
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", env["TRACEPARENT"]), env
        assert "JOBRUNNER_TRIGGER_NAME" not in env  # the trigger has no name
        ids.add(env["JOBRUNNER_MESSAGE_ID"])
    assert len(ids) == 10


def test_a_restart_in_the_middle_of_a_batch_loses_and_repeats_nothing(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(RECORDING_JOB, max_replicas=2)
    ids = [f"m{i}" for i in range(8)]
    publish(path, state_dir, *({"id": i, "seconds": 1.5} for i in ids))
    first = dispatchers.start(path)
    # Kill it once a Job of the second wave has started: some messages are settled,
    # some are in hand with running Jobs, the rest wait.
    wait_until(lambda: sum(what == "start" for what, _, _ in runs(tmp_path)) >= 3, timeout=30)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    before = queue_state(state_dir, "work")
    assert before["in_hand"] >= 1, before
    assert before["ready"] >= 1, before
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    events = runs(tmp_path)
    started = sorted(ident for what, ident, _ in events if what == "start")
    ended = sorted(ident for what, ident, _ in events if what == "end")
    assert started == sorted(ids), "a message ran twice or never"
    assert ended == sorted(ids)
    assert job_outcomes(state_dir) == ["CompletionsReached"] * 8
    assert queue_state(state_dir, "work") == {"ready": 0, "in_hand": 0, "dead": 0}
    assert "adopted its existing Job" in dispatchers.logs()


def test_failures_and_unusable_messages_are_dead_lettered_with_the_reason(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers
) -> None:
    path = manifest(
        RECORDING_JOB,
        backoff_limit=1,
        container={"env": [{"name": "KIND", "value": "{{ message.json.id }}"}]},
        delivery={"maxMessageBytes": 200},
    )
    publish(
        path,
        state_dir,
        {"id": "ok", "seconds": 0.1},
        {"id": "broken", "seconds": 0.1, "exit": 4},
        "not JSON at all",
        {"id": "big", "padding": "x" * 300},
    )
    dispatchers.start(path)
    wait_until(lambda: settled(state_dir, "work"), timeout=60)
    reasons = {
        body[:16]: (headers["x-jobrunner-reason"], headers["x-jobrunner-detail"])
        for body, headers in dead_letters(state_dir, "work")
    }
    assert reasons[b'{"id": "broken",'][0] == "BackoffLimitExceeded"
    assert reasons[b"not JSON at all"][0] == "InvalidMessage"
    assert "not JSON" in reasons[b"not JSON at all"][1]
    assert reasons[b'{"id": "big", "p'][0] == "MessageTooLarge"
    assert len(reasons) == 3
    assert sorted(job_outcomes(state_dir)) == ["BackoffLimitExceeded", "CompletionsReached"]


def test_sigterm_leaves_the_job_running_and_the_next_dispatcher_settles_it(
    manifest: ManifestFactory, state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    path = manifest(RECORDING_JOB)
    # The Job runs until the test lets it end, however long the dispatcher's shutdown
    # takes on a busy machine (a fixed 3 s was sometimes shorter).
    gate = tmp_path / "may-end"
    publish(path, state_dir, {"id": "long", "seconds": 0, "until": str(gate)})
    first = dispatchers.start(path)
    wait_until(lambda: runs(tmp_path), timeout=30)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert not any(what == "end" for what, _, _ in runs(tmp_path)), "the Job was stopped"
    assert queue_state(state_dir, "work")["ready"] == 1  # back on the queue, not lost
    dispatchers.start(path)
    # Long work shows progress (the fixture's dispatchers log it every 0.5 s): the second
    # dispatcher adopted the running Job; now let it end.
    wait_until(lambda: "1 Job(s) running" in dispatchers.logs(), timeout=60)
    gate.touch()
    wait_until(lambda: settled(state_dir, "work"), timeout=30)
    assert [what for what, _, _ in runs(tmp_path)] == ["start", "end"]
    assert job_outcomes(state_dir) == ["CompletionsReached"]
    # Long work shows progress: the dispatchers said what was running while it ran.
    assert "work: 1 Job(s) running (the longest, work-" in dispatchers.logs()
