"""The commands a newcomer and an operator type, and what they print, with no cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobrunner.cli import main
from jobrunner.core.deadletters import REASON
from jobrunner.core.naming import job_name
from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from jobrunner.sources.sqlite import SQLiteQueue
from tests.helpers import wait_until
from tests.local.conftest import ROOT, Dispatchers, ManifestFactory
from tests.local.test_local_executor import render

JOB = (
    "import json, os, sys, time; m = json.loads(os.environ['JOBRUNNER_MESSAGE']);"
    "print('working on', m['id']); time.sleep(m.get('seconds', 0)); sys.exit(m.get('exit', 0))"
)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_jobs_and_logs_show_a_batch_from_start_to_end(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(manifest(JOB, max_replicas=2))
    local = ["--local", "--state-dir", str(state_dir)]
    messages = ['{"id": "slow-1", "seconds": 4}', '{"id": "slow-2", "seconds": 4}']
    code, out, _ = cli(capsys, "publish", "-f", path, "--state-dir", str(state_dir), *messages)
    assert code == 0
    assert "published 2 message(s) to queue work" in out
    code, out, _ = cli(
        capsys, "publish", "-f", path, "--state-dir", str(state_dir), '{"id": "bad", "exit": 2}'
    )
    assert code == 0

    code, out, _ = cli(capsys, "status", "-f", path, *local)
    assert code == 0
    assert "queue work: 3 waiting, 0 in hand, 0 dead-lettered" in out
    assert "no Job in flight" in out

    dispatchers.start(Path(path))

    def two_running() -> str | None:
        _, text, _ = cli(capsys, "status", "-f", path, *local, "-o", "json")
        (status,) = json.loads(text)
        running = [j for j in status["inFlight"] if j["state"] == "running"]
        return text if len(running) == 2 else None

    wait_until(two_running, timeout=20)
    _, out, _ = cli(capsys, "status", "-f", path, *local)
    assert "in flight 2/2" in out
    assert "1 waiting, 2 in hand" in out
    assert re.search(r"dispatcher: running \(pid \d+\)", out), out

    def all_finished() -> list[dict[str, object]] | None:
        _, text, _ = cli(capsys, "jobs", "-f", path, *local, "-o", "json")
        jobs: list[dict[str, object]] = json.loads(text)
        return jobs if len(jobs) == 3 and any(j["deadLettered"] for j in jobs) else None

    jobs = wait_until(all_finished, timeout=30)
    assert sorted(str(j["state"]) for j in jobs) == ["failed", "succeeded", "succeeded"]
    (failed,) = [j for j in jobs if j["state"] == "failed"]
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["deadLettered"] is True
    assert "main exited 2" in str(failed["detail"])
    code, out, _ = cli(capsys, "jobs", "-f", path, *local)
    assert out.count("succeeded") == 2
    assert re.search(r"failed +BackoffLimitExceeded +yes", out), out

    code, out, _ = cli(capsys, "logs", str(failed["job"]), *local)
    assert code == 0
    assert "==> attempt 1, container main: exit 2 (Error) <==" in out
    assert "working on bad" in out
    assert "==> Job failed: BackoffLimitExceeded" in out


def test_the_logs_hint_of_jobs_names_the_manifests_namespace(
    manifest: ManifestFactory, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`logs` looks in -n (else default): the hint `jobs` prints must say the namespace of
    the manifest's ScaledJob, or following it answers "no Job default/..."."""
    path = manifest("print('hello')")
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["namespace"] = "media"
    path.write_text(yaml.safe_dump(doc))
    job, secret = render(path, b"{}")
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    asyncio.run(client.create_job(job, secret))

    def done() -> bool:
        current = asyncio.run(client.get_job("media", job["metadata"]["name"])) or {}
        return bool((current.get("status") or {}).get("succeeded"))

    wait_until(done, timeout=20)
    local = ["--local", "--state-dir", str(state_dir)]
    code, out, _ = cli(capsys, "jobs", "-f", str(path), *local)
    assert code == 0
    (hint,) = [line for line in out.splitlines() if line.startswith("logs of a Job:")]
    command = shlex.split(hint.removeprefix("logs of a Job:").removesuffix(" JOB"))
    assert command[command.index("-n") : command.index("-n") + 2] == ["-n", "media"], hint
    code, out, _ = cli(capsys, *command[1:], job["metadata"]["name"])
    assert code == 0
    assert "hello" in out


def test_a_typo_in_a_manifest_names_file_line_field_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "deploy/examples/scaledjob-local.yaml")
        .read_text()
        .replace("maxReplicaCount:", "maxReplicaCont:")
    )
    code, _, err = cli(capsys, "validate", "-f", str(bad))
    assert code == 2
    assert str(bad) in err
    line = next(
        i for i, text in enumerate(bad.read_text().splitlines(), 1) if "maxReplicaCont" in text
    )
    assert (
        f"line {line}, field spec.maxReplicaCont: unknown field; did you mean 'maxReplicaCount'?"
        in err
    )


def test_an_unknown_trigger_type_lists_the_supported_ones(
    manifest: ManifestFactory, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest(JOB, spec={"triggers": [{"type": "redis", "metadata": {"listName": "x"}}]})
    code, _, err = cli(capsys, "run", "--local", "--state-dir", str(state_dir), "-f", str(path))
    assert code == 2
    assert "field spec.triggers[0].type: 'redis' is not supported" in err
    assert (
        "use one of apache-kafka, aws-sqs-queue, azure-queue, http, kafka, mqtt, nats-jetstream, "
        "rabbitmq, redis-streams, sqlite" in err
    )


def test_publish_to_a_broker_trigger_says_to_use_the_broker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    example = str(ROOT / "deploy/examples/scaledjob-rabbitmq.yaml")
    code, _, err = cli(capsys, "publish", "-f", example, "--state-dir", str(tmp_path), "{}")
    assert code == 2
    assert "reads from a rabbitmq trigger" in err
    assert "broker's own tools" in err


def test_run_without_a_cluster_suggests_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    example = str(ROOT / "deploy/examples/scaledjob-local.yaml")
    code, _, err = cli(capsys, "status", "-f", example)
    assert code == 2
    assert "no Kubernetes configuration" in err
    assert "add --local" in err


def test_logs_of_an_unknown_job_says_how_to_list_them(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "logs", "nope", "--local", "--state-dir", str(state_dir))
    assert code == 2
    assert "jobrunner jobs --local" in err


def test_make_demo_runs_the_batch_and_prints_the_summary(tmp_path: Path) -> None:
    """`make demo` is the README's first command: no cluster, no broker, exit 0."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "160"}
    # The demo dumps its threads and exits by itself if it hangs (after 120 s).
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/local/demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "11/11" in out, out
    assert "what became of each message" in out, out
    assert out.count("succeeded") == 8, out
    assert "dead-lettered (BackoffLimitExceeded)" in out, out
    assert "dead-lettered (DeadlineExceeded)" in out, out
    assert "dead-lettered (InvalidMessage)" in out, out
    assert "demo: every message ended as expected" in out, out
    # The demo leaves its state for a look around, and no Job process behind.
    (state,) = tmp_path.glob("jobrunner-demo-*")
    jobs = [JobDir(p) for p in (state / "jobs" / "default").iterdir()]
    assert len(jobs) == 10
    assert not any(job.supervised() for job in jobs)


def test_status_watch_keeps_printing_fresh_views_when_piped(
    manifest: ManifestFactory, state_dir: Path
) -> None:
    path = str(manifest(JOB))
    assert main(["publish", "-f", path, "--state-dir", str(state_dir), '{"id": "w"}']) == 0
    command = [sys.executable, "-m", "jobrunner.cli", "status", "--watch", "--interval", "0.3"]
    watcher = subprocess.Popen(
        [*command, "--local", "--state-dir", str(state_dir), "-f", path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        lines = []
        while sum("queue work:" in line for line in lines) < 3:
            line = watcher.stdout.readline()
            assert line, "the watch ended"
            lines.append(line)
    finally:
        watcher.kill()
        watcher.wait()
    assert sum(line.startswith("-- ") for line in lines) >= 3
    assert "queue work: 1 waiting, 0 in hand, 0 dead-lettered" in "".join(lines)


def test_dead_letters_are_listed_and_a_replay_runs_as_a_new_job(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The template reads message.json: a body that is not JSON is dead-lettered InvalidMessage.
    reads_json = {"env": [{"name": "ID", "value": "{{ message.json.id }}"}]}
    path = str(manifest(JOB, container=reads_json))
    local = ["--local", "--state-dir", str(state_dir)]
    publish = ["publish", "-f", path, "--state-dir", str(state_dir)]
    assert cli(capsys, *publish, "--message-id", "fail-1", '{"id": "fail-1", "exit": 3}')[0] == 0
    assert cli(capsys, *publish, "--force", "--message-id", "garbage-1", "not json")[0] == 0
    dispatchers.start(Path(path))

    def two_dead() -> list[dict[str, object]] | None:
        _, text, _ = cli(capsys, "dead-letters", "-f", path, *local, "-o", "json")
        letters: list[dict[str, object]] = json.loads(text)
        return letters if len(letters) == 2 else None

    letters = {str(d["messageId"]): d for d in wait_until(two_dead, timeout=30)}
    failed = letters["fail-1"]
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "main exited 3" in str(failed["detail"])
    assert "working on fail-1" in str(failed["detail"])  # the log's last lines
    assert failed["job"] == job_name("work", "fail-1")
    assert failed["body"] == '{"id": "fail-1", "exit": 3}'
    assert letters["garbage-1"]["reason"] == "InvalidMessage"

    code, out, _ = cli(capsys, "dead-letters", "-f", path, *local)
    assert code == 0
    assert re.search(r"fail-1 +BackoffLimitExceeded +work-", out), out
    assert "body: not json" in out
    assert "--replay [ID ...]" in out
    assert f"--state-dir {state_dir}" in out  # the hint keeps the user's state directory

    code, out, err = cli(
        capsys, "dead-letters", "-f", path, *local, "--reason", "BackoffLimitExceeded", "--replay"
    )
    assert code == 0, err
    assert "replayed 1 dead letter(s) to queue work as new work" in out

    def replayed_and_failed_again() -> list[dict[str, object]] | None:
        _, text, _ = cli(capsys, "jobs", "-f", path, *local, "-o", "json")
        jobs: list[dict[str, object]] = json.loads(text)
        again = [j for j in jobs if "#replay-" in str(j["message"]) and j["deadLettered"]]
        return jobs if again else None

    jobs = wait_until(replayed_and_failed_again, timeout=30)
    assert len({j["job"] for j in jobs}) == 2  # a Job of its own, not the first one adopted
    (letter,) = [d for d in wait_until(two_dead, timeout=10) if d["messageId"] == "fail-1"]
    assert letter["reason"] == "BackoffLimitExceeded"  # ran again; not DuplicateMessage
    assert str(letter["headers"]["x-jobrunner-replay"])  # type: ignore[index]
    code, out, _ = cli(capsys, "jobs", "-f", path, *local)
    assert "fail-1 (replay)" in out


def test_status_tells_a_live_dispatcher_from_a_stale_lock(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = str(manifest(JOB))
    local = ["--local", "--state-dir", str(state_dir)]
    assert cli(capsys, "publish", "-f", path, "--state-dir", str(state_dir), '{"id": "a"}')[0] == 0
    _, out, _ = cli(capsys, "status", "-f", path, *local)
    assert "dispatcher: none has consumed this queue yet; 1 message(s) wait for one" in out
    assert f"jobrunner run --local --state-dir {state_dir} -f {path}" in out

    proc = dispatchers.start(Path(path))

    def alive() -> dict[str, object] | None:
        _, text, _ = cli(capsys, "status", "-f", path, *local, "-o", "json")
        dispatcher: dict[str, object] = json.loads(text)[0]["dispatcher"]
        return dispatcher if dispatcher["alive"] else None

    assert f"pid {proc.pid}" in str(wait_until(alive, timeout=20)["detail"])
    proc.kill()
    proc.wait(timeout=10)
    _, out, _ = cli(capsys, "status", "-f", path, *local)
    assert f"dispatcher: not running (the last one, pid {proc.pid}, is gone" in out


def test_a_paused_dispatcher_is_shown_paused_and_the_queue_stays_its_own(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A running dispatcher whose ScaledJob is paused consumes nothing, but it serves the
    queue: status, publish and a replay say it is paused (its pid, the annotation), not
    that it is gone naming the last pid that consumed the queue, and a second dispatcher
    is refused as while it consumes (i21, F7)."""
    path = manifest(JOB)
    local = ["--local", "--state-dir", str(state_dir)]
    # An earlier dispatcher consumed the queue and stopped: its pid stays in the lock.
    earlier = dispatchers.start(path)
    wait_until(lambda: "dispatching work from" in dispatchers.logs(), timeout=30)
    earlier.kill()
    earlier.wait(timeout=10)
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["annotations"] = {"jobrunner.dev/paused": "true"}
    path.write_text(yaml.safe_dump(doc))
    paused = dispatchers.start(path)
    wait_until(lambda: "Paused" in dispatchers.logs(), timeout=30)

    _, out, _ = cli(capsys, "status", "-f", str(path), *local)
    assert f"dispatcher: paused (pid {paused.pid}, annotation jobrunner.dev/paused)" in out
    assert "is gone" not in out
    code, _, err = cli(capsys, "publish", "-f", str(path), "--state-dir", str(state_dir), "{}")
    assert code == 0
    assert f"the dispatcher that serves it is paused (pid {paused.pid}" in err
    assert "no dispatcher consumes it" not in err
    # Following publish's old advice: a second dispatcher of the queue (not paused).
    second = subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", "run", *local, "-f", str(unpaused(path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1, second.stderr
    assert f"served by another dispatcher (pid {paused.pid}), paused by the annotation" in (
        second.stderr
    )
    # Resumed, it consumes again (its own mark is no obstacle): status says so.
    path.write_text(unpaused(path).read_text())
    paused.send_signal(signal.SIGHUP)

    def running() -> str | None:
        _, text, _ = cli(capsys, "status", "-f", str(path), *local)
        return text if f"dispatcher: running (pid {paused.pid})" in text else None

    wait_until(running, timeout=30)


def unpaused(path: Path) -> Path:
    """The same ScaledJob without its pause annotation, beside ``path``."""
    doc = yaml.safe_load(path.read_text())
    doc["metadata"].pop("annotations", None)
    out = path.with_name(f"unpaused-{path.name}")
    out.write_text(yaml.safe_dump(doc))
    return out


def test_a_second_dispatcher_on_one_embedded_queue_is_one_line_naming_the_first(
    manifest: ManifestFactory,
    state_dir: Path,
    dispatchers: Dispatchers,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    path = manifest(JOB)
    local = ["--local", "--state-dir", str(state_dir)]
    first = dispatchers.start(path)

    def alive() -> bool:
        _, text, _ = cli(capsys, "status", "-f", str(path), *local, "-o", "json")
        return bool(json.loads(text)[0]["dispatcher"]["alive"])

    wait_until(alive, timeout=30)
    run = [sys.executable, "-m", "jobrunner.cli", "run", *local]
    second = subprocess.run([*run, "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"is consumed by another dispatcher (pid {first.pid}); stop it first" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    # It stops (exit 1): no log line promises a retry it will not make (i21, N2).
    assert "trying again" not in second.stderr + second.stdout
    # Two ScaledJobs of one file on one queue: the second is told it is its own sibling.
    doc = path.read_text()
    twins = tmp_path / "twins.yaml"
    twins.write_text(doc + "\n---\n" + doc.replace("name: work", "name: twin", 1))
    own = subprocess.run(
        [*run, "--state-dir", str(tmp_path / "other"), "-f", str(twins)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "consumed by another ScaledJob of this same dispatcher" in own.stderr
    assert "Traceback" not in own.stderr + own.stdout


def test_views_warn_when_no_state_is_where_they_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    example = str(ROOT / "deploy/examples/scaledjob-local.yaml")
    code, _, err = cli(capsys, "status", "--local", "-f", example)
    assert code == 0
    assert "warning: no .jobrunner here" in err
    assert "pass --state-dir DIR" in err
    code, _, err = cli(capsys, "jobs", "--local", "--state-dir", "elsewhere", "-f", example)
    assert code == 0
    assert "warning: --state-dir elsewhere does not exist" in err


LOGS_MANIFEST = """
apiVersion: jobrunner.dev/v1alpha1
kind: ScaledJob
metadata: {name: logs}
spec:
  triggers: [{type: sqlite, metadata: {queueName: logs}}]
  jobTargetRef:
    backoffLimit: 1
    template:
      spec:
        initContainers:
        - {name: fetch, image: x, command: [python3, -c, "print('init 1 done')"]}
        - {name: unpack, image: x, command: [python3, -c, "print('init 2 done')"]}
        containers:
        - name: work
          image: x
          command:
          - python3
          - -c
          - |
            import os, sys, time
            for i in range(3):
                print("tick", i, flush=True)
                time.sleep(0.4)
            sys.exit(4)
"""


def test_logs_follow_a_job_attempt_by_attempt_with_exit_codes(
    tmp_path: Path, state_dir: Path, dispatchers: Dispatchers, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "logs.yaml"
    path.write_text(LOGS_MANIFEST)
    local = ["--local", "--state-dir", str(state_dir)]
    assert cli(capsys, "publish", "-f", str(path), *local[1:], "--message-id", "l-1", "{}")[0] == 0
    dispatchers.start(path)
    name = job_name("logs", "l-1")
    wait_until(lambda: (state_dir / "jobs" / "default" / name).is_dir(), timeout=20)
    follow = subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", "logs", name, *local, "-f"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert follow.returncode == 0, follow.stderr
    out = follow.stdout
    # Each part's end is said once, in order (a part that still ran when `logs -f`
    # reached it was announced as running first).
    headers = [line for line in out.splitlines() if ": exit " in line or "Job failed" in line]
    assert headers == [
        "==> attempt 1, init container fetch: exit 0 (Completed) <==",
        "==> attempt 1, init container unpack: exit 0 (Completed) <==",
        "==> attempt 1, container work: exit 4 (Error) <==",
        "==> attempt 2, init container fetch: exit 0 (Completed) <==",
        "==> attempt 2, init container unpack: exit 0 (Completed) <==",
        "==> attempt 2, container work: exit 4 (Error) <==",
        headers[-1],
    ], out
    assert headers[-1].startswith("==> Job failed: BackoffLimitExceeded")
    assert out.count("tick 2\n") == 2
    # Afterwards, and one container only.
    code, out, _ = cli(capsys, "logs", name, *local, "-c", "unpack")
    assert code == 0
    assert "init 2 done" in out
    assert "tick 0\n" not in out
    assert "init 1 done" not in out


def test_make_demo_functions_runs_both_example_apps_and_prints_the_summary(
    tmp_path: Path,
) -> None:
    """`make demo-functions`: the two example function apps, no cluster, no Azure."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "160"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/local/demo_functions.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "what became of each message" in out, out
    assert out.count("succeeded") == 8, out
    assert out.count("dead-lettered (FunctionFailed)") == 2, out
    assert '{"order":"order-1","total":19}' in out, out
    assert "demo-functions: every message ended as expected" in out, out
    (work,) = tmp_path.glob("jobrunner-demo-*-functions-*")
    jobs = [JobDir(p) for p in (work / "state" / "jobs" / "default").iterdir()]
    assert len(jobs) == 10
    assert not any(job.supervised() for job in jobs)


def test_the_replay_line_under_a_filtered_listing_replays_only_what_it_listed(
    filled: tuple[Path, str], state_dir: Path
) -> None:
    """``dead-letters --reason R`` ends with the line to replay them: copied as it is,
    it replays those listed, not every dead letter (i21, N10: the line had no
    ``--reason``, so it replayed the others too)."""
    path, _ = filled

    async def another() -> None:
        queue = await SQLiteQueue.open(state_dir / "queue.db")
        try:
            await queue.publish(
                "work.dead-letter", [b'{"image": "slow.png"}'], headers={REASON: "DeadlineExceeded"}
            )
        finally:
            await queue.close()

    asyncio.run(another())
    local = ["--local", "--state-dir", str(state_dir), "-f", str(path)]
    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobrunner.cli",
            "dead-letters",
            *local,
            "--reason",
            "deadlineexceeded",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    (line,) = [row for row in listed.stdout.splitlines() if row.startswith("replay them")]
    words = shlex.split(line.partition(": ")[2].replace(" [ID ...]", ""))
    assert words[0] == "jobrunner"
    replayed = subprocess.run(
        [sys.executable, "-m", "jobrunner.cli", *words[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 dead letter(s)" in replayed.stdout, replayed.stdout
