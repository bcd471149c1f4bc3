"""A queue-triggered function's tries as the Functions host makes them, on the embedded
queue with the local executor (``functions import --local --embedded``), for a custom
handler and a Python v2 app:

* host.json ``extensions.queues.maxDequeueCount`` is the number of tries, and
  ``DequeueCount`` (a handler's ``Metadata.DequeueCount``, a ``QueueMessage``'s
  ``dequeue_count``) is 1, 2, 3 ... across them;
* ``functionTimeout`` limits each try, never the tries and their back-off together: a
  function that fails four times and succeeds on its fifth try (maxDequeueCount 5)
  succeeds; one that times out once and then succeeds succeeds, its first try cut at
  the timeout.

Each function appends to a file what it saw, so the test reads every try."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import yaml

from jobrunner.cli import main as cli
from jobrunner.local.jobdir import JobDir
from jobrunner.sources.sqlite import SQLiteQueue
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers

# A custom handler in Python: appends "<DequeueCount>" to tries.txt and fails (500)
# until the try named in the message.
HANDLER = r"""
import http.server, json, os, pathlib
port = int(os.environ["FUNCTIONS_CUSTOMHANDLER_PORT"])
here = pathlib.Path(__file__).parent
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        order = json.loads(payload["Data"]["order"])
        seen = payload["Metadata"]["DequeueCount"]
        with open(here / "tries.txt", "a") as tries:
            tries.write(f"{seen}\n")
        with open(here / "calls.txt", "a") as calls:
            calls.write("x")
        done = len((here / "calls.txt").read_text()) >= order["succeed_on"]
        self.send_response(200 if done else 500); self.end_headers()
        self.wfile.write(b"{}" if done else b"not yet")
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""

# A Python v2 app: appends "<dequeue_count>" to tries.txt; on the tries the message names
# it raises, or sleeps (longer than any functionTimeout here).
PYTHON_APP = r"""
import json, pathlib, time
import azure.functions as func

app = func.FunctionApp()
here = pathlib.Path(__file__).parent


@app.function_name("Work")
@app.queue_trigger(arg_name="msg", queue_name="orders", connection="AzureWebJobsStorage")
def work(msg: func.QueueMessage) -> None:
    order = msg.get_json()
    with open(here / "tries.txt", "a") as tries:
        tries.write(f"{msg.dequeue_count}\n")
    with open(here / "calls.txt", "a") as calls:
        calls.write("x")
    call = len((here / "calls.txt").read_text())
    if call in order.get("hang_on", []):
        time.sleep(120)
    if call < order.get("succeed_on", 1):
        time.sleep(order.get("seconds", 0))
        raise RuntimeError(f"try {call} fails")
"""

SETTINGS = {"Values": {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}}


def custom_handler_app(root: Path, host: dict[str, Any]) -> Path:
    app = root / "shop"
    (app / "Order").mkdir(parents=True)
    (app / "handler.py").write_text(HANDLER)
    handler = {"description": {"defaultExecutablePath": "python3", "arguments": ["handler.py"]}}
    (app / "host.json").write_text(json.dumps({"customHandler": handler, **host}))
    trigger = {
        "type": "queueTrigger",
        "direction": "in",
        "name": "order",
        "queueName": "orders",
        "connection": "AzureWebJobsStorage",
    }
    (app / "Order" / "function.json").write_text(json.dumps({"bindings": [trigger]}))
    (app / "local.settings.json").write_text(json.dumps(SETTINGS))
    return app


def python_app(root: Path, host: dict[str, Any]) -> Path:
    app = root / "worker"
    app.mkdir(parents=True)
    (app / "function_app.py").write_text(PYTHON_APP)
    (app / "host.json").write_text(json.dumps({"version": "2.0", **host}))
    (app / "local.settings.json").write_text(json.dumps(SETTINGS))
    return app


def imported(app: Path, out: Path) -> Path:
    assert cli(["functions", "import", str(app), "-o", str(out), "--local", "--embedded"]) == 0
    [manifest] = [p for p in out.glob("*.yaml") if "ScaledJob" in p.read_text()]
    return manifest


def queue_rows(state: Path, queue: str) -> int:
    async def read() -> int:
        db = await SQLiteQueue.open(state / "queue.db")
        try:
            return len(await db.messages(queue))
        finally:
            await db.close()

    return asyncio.run(read())


def job_reason(state: Path) -> str | None:
    """``Complete``, or the reason the one Job failed; None while it runs."""
    jobs = sorted((state / "jobs" / "default").glob("*"))
    if len(jobs) != 1:
        return None
    conditions = JobDir(jobs[0]).status().get("conditions") or []
    finished = [c for c in conditions if c.get("type") in ("Complete", "Failed")]
    if not finished:
        return None
    return "Complete" if finished[0]["type"] == "Complete" else str(finished[0].get("reason"))


def run_one(
    state: Path, dispatchers: Dispatchers, manifest: Path, body: dict[str, Any]
) -> tuple[str, float]:
    """Publish ``body``, run it to its Job's end: (the Job's reason, seconds taken)."""
    assert cli(["publish", "-f", str(manifest), "--state-dir", str(state), json.dumps(body)]) == 0
    started = time.monotonic()
    dispatchers.start(manifest)
    wait_until(lambda: job_reason(state) is not None, timeout=180)
    reason = job_reason(state)
    assert reason is not None
    # Settled either way: acked, or dead-lettered (the embedded queue's dead letters are a
    # queue of their own), so nothing waits in the trigger's queue.
    wait_until(lambda: queue_rows(state, "orders") == 0, timeout=60)
    return reason, time.monotonic() - started


def tries(app: Path) -> list[str]:
    """The DequeueCount each try saw, in order."""
    return (app / "tries.txt").read_text().split()


def test_a_custom_handler_sees_dequeue_count_grow_and_succeeds_on_its_last_try(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    host = {"functionTimeout": "00:00:06", "extensions": {"queues": {"maxDequeueCount": 5}}}
    app = custom_handler_app(tmp_path, host)
    manifest = imported(app, tmp_path / "out")
    reason, _ = run_one(state_dir, dispatchers, manifest, {"id": "o-1", "succeed_on": 5})
    assert tries(app) == ["1", "2", "3", "4", "5"], dispatchers.logs()
    assert reason == "Complete", dispatchers.logs()
    assert "acked the message" in dispatchers.logs()


def test_a_python_function_sees_dequeue_count_grow_and_is_poisoned_after_max_tries(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    host = {"functionTimeout": "00:00:06", "extensions": {"queues": {"maxDequeueCount": 3}}}
    app = python_app(tmp_path, host)
    manifest = imported(app, tmp_path / "out")
    reason, _ = run_one(state_dir, dispatchers, manifest, {"id": "o-2", "succeed_on": 9})
    assert tries(app) == ["1", "2", "3"], dispatchers.logs()
    assert reason == "BackoffLimitExceeded"
    assert "FunctionFailed" in dispatchers.logs()
    assert "try 3 fails" in dispatchers.logs()


def test_a_python_function_failing_four_times_succeeds_on_its_fifth_try(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    host = {"functionTimeout": "00:00:04", "extensions": {"queues": {"maxDequeueCount": 5}}}
    app = python_app(tmp_path, host)
    manifest = imported(app, tmp_path / "out")
    body = {"id": "o-3", "succeed_on": 5, "seconds": 1.5}
    reason, _ = run_one(state_dir, dispatchers, manifest, body)
    # Four failed tries of 1.5 s each take longer than functionTimeout (4 s): a limit
    # on each try, not on the Job.
    assert reason == "Complete", dispatchers.logs()
    assert len(tries(app)) == 5
    assert tries(app) == ["1", "2", "3", "4", "5"], dispatchers.logs()
    assert "acked the message" in dispatchers.logs()


def test_a_function_timing_out_once_then_succeeding_succeeds(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    host = {"functionTimeout": "00:00:03", "extensions": {"queues": {"maxDequeueCount": 2}}}
    app = python_app(tmp_path, host)
    manifest = imported(app, tmp_path / "out")
    reason, took = run_one(
        state_dir, dispatchers, manifest, {"id": "o-4", "hang_on": [1], "succeed_on": 1}
    )
    assert reason == "Complete", dispatchers.logs()
    assert tries(app) == ["1", "2"], dispatchers.logs()
    # The first try was cut at its 3 s, not left to sleep its 120 s.
    assert took < 100
    [job] = sorted((state_dir / "jobs" / "default").glob("*"))
    logs = "".join(p.read_text() for p in sorted((job / "logs").glob("1-*.log")))
    assert "Timeout value of 00:00:03 exceeded by function Work" in logs


def test_a_function_timing_out_on_its_only_try_is_dead_lettered_with_the_timeout(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    host = {"functionTimeout": "00:00:02", "extensions": {"queues": {"maxDequeueCount": 1}}}
    app = python_app(tmp_path, host)
    manifest = imported(app, tmp_path / "out")
    reason, _ = run_one(state_dir, dispatchers, manifest, {"id": "o-5", "hang_on": [1]})
    assert "Timeout value of 00:00:02 exceeded by function Work" in dispatchers.logs()
    assert reason == "BackoffLimitExceeded"
    assert tries(app) == ["1"]


def test_import_writes_each_try_s_limit_into_the_invoker_and_bounds_the_job_over_all_tries(
    tmp_path: Path,
) -> None:
    host = {"functionTimeout": "00:01:00", "extensions": {"queues": {"maxDequeueCount": 4}}}
    app = python_app(tmp_path, host)
    for local, out in ((True, tmp_path / "local"), (False, tmp_path / "cluster")):
        args = ["functions", "import", str(app), "-o", str(out)] + (["--local"] if local else [])
        assert cli(args) == 0
        [manifest] = [p for p in out.glob("*-work.yaml")]
        job = list(yaml.safe_load_all(manifest.read_text()))[-1]["spec"]["jobTargetRef"]
        command = job["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--timeout") + 1] == "60"
        # Over all tries: never less than four tries of 60 s and the back-off between.
        assert job["activeDeadlineSeconds"] >= 4 * 60 + 10 + 20 + 40
        assert job["backoffLimit"] == 3
