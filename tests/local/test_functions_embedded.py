"""A function app on the embedded queue (``import --local --embedded``): outputs land on
the embedded queue exactly once even when the dispatcher dies between publishing an
output and recording it (the embedded queue keeps one message per output id)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import yaml

from jobrunner.cli import main as cli
from jobrunner.local.jobdir import JobDir
from jobrunner.sources.sqlite import SQLiteQueue, StoredMessage
from tests import services
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node() -> None:
    """The example custom handler is a Node program; the stack's install-system.sh
    installs Node (Azurite needs it), so with CI=true its absence fails the run."""
    if shutil.which("node") is None:
        services.missing("Node", "no node on PATH (deploy/local/install-system.sh installs it)")


def rows(state: Path, queue: str) -> list[tuple[str | None, bytes]]:
    async def read() -> list[tuple[str | None, bytes]]:
        db = await SQLiteQueue.open(state / "queue.db")
        try:
            return [(m.message_id, m.body) for m in await db.messages(queue)]
        finally:
            await db.close()

    return asyncio.run(read())


def dead_letters(state: Path, queue: str) -> list[StoredMessage]:
    async def read() -> list[StoredMessage]:
        db = await SQLiteQueue.open(state / "queue.db")
        try:
            return await db.messages(queue)
        finally:
            await db.close()

    return asyncio.run(read())


@pytest.mark.usefixtures("node")
def test_an_output_is_published_once_across_a_crash_between_publishing_and_recording_it(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    app = ROOT / "examples/functions/custom-handler"
    assert cli(["functions", "import", str(app), "-o", str(out), "--local", "--embedded"]) == 0
    manifest = out / "custom-handler-processorder.yaml"
    body = json.dumps({"id": "o-9", "qty": 2})
    assert cli(["publish", "-f", str(manifest), "--state-dir", str(state_dir), body]) == 0
    first = dispatchers.start_with(
        manifest, {"JOBRUNNER_DISPATCHER__FAILPOINTS": '["after-output-sent"]'}
    )
    first.wait(timeout=90)
    assert len(rows(state_dir, "receipts")) == 1  # sent, not recorded on the Job
    dispatchers.start(manifest)
    wait_until(lambda: rows(state_dir, "orders") == [], timeout=90)
    receipts = rows(state_dir, "receipts")
    assert [b for _, b in receipts] == [b'{"order":"o-9","total":19}'], dispatchers.logs()
    assert receipts[0][0] is not None
    assert receipts[0][0].endswith("/receipt/0")


@pytest.mark.usefixtures("node")
def test_outputs_of_a_job_that_keeps_its_message_are_published_when_it_succeeds(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    """Ack policy onJobCreation: the message is acked once the Job exists; the outputs
    go out when the Job succeeds, before the Job is released."""
    out = tmp_path / "out"
    app = ROOT / "examples/functions/custom-handler"
    assert cli(["functions", "import", str(app), "-o", str(out), "--local", "--embedded"]) == 0
    manifest = out / "custom-handler-processorder.yaml"
    docs = list(yaml.safe_load_all(manifest.read_text()))
    docs[-1]["spec"]["ackPolicy"] = "onJobCreation"
    manifest.write_text(yaml.safe_dump_all(docs))
    body = json.dumps({"id": "o-10", "qty": 1, "seconds": 1})
    assert cli(["publish", "-f", str(manifest), "--state-dir", str(state_dir), body]) == 0
    dispatchers.start(manifest)
    wait_until(lambda: rows(state_dir, "receipts"), timeout=90)
    assert [b for _, b in rows(state_dir, "receipts")] == [b'{"order":"o-10","total":9.5}']
    assert rows(state_dir, "orders") == []
    assert "published 1 output message(s)" in dispatchers.logs()


# A custom handler in Python: each order waits for the file "go" (so a test can hold
# both Jobs running), then answers with a receipt naming the order.
HOLDING_HANDLER = r"""
import http.server, json, os, pathlib, time
port = int(os.environ["FUNCTIONS_CUSTOMHANDLER_PORT"])
here = pathlib.Path(__file__).parent
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        order = json.loads(payload["Data"]["order"])
        (here / f"seen-{order['id']}").touch()
        while not (here / "go").exists():
            time.sleep(0.05)
        body = json.dumps({"Outputs": {"receipt": [f"receipt {order['id']}"]}}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def holding_app(root: Path) -> Path:
    app = root / "shop"
    (app / "Order").mkdir(parents=True)
    (app / "handler.py").write_text(HOLDING_HANDLER)
    (app / "host.json").write_text(
        json.dumps(
            {
                "customHandler": {
                    "description": {"defaultExecutablePath": "python3", "arguments": ["handler.py"]}
                },
                "extensions": {"queues": {"maxDequeueCount": 1}},
            }
        )
    )
    common = {"connection": "AzureWebJobsStorage"}
    trigger = {"type": "queueTrigger", "direction": "in", "name": "order", "queueName": "orders"}
    output = {"type": "queue", "direction": "out", "name": "receipt", "queueName": "receipts"}
    bindings = [{**trigger, **common}, {**output, **common}]
    (app / "Order" / "function.json").write_text(json.dumps({"bindings": bindings}))
    (app / "local.settings.json").write_text(
        json.dumps({"Values": {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}})
    )
    return app


def job_dirs(state: Path) -> dict[str, JobDir]:
    """Job directories by the order their message carries."""
    out = {}
    for path in sorted((state / "jobs" / "default").glob("*")):
        job = JobDir(path).job() or {}
        identity = (
            (job.get("metadata") or {}).get("annotations", {}).get("jobrunner.dev/message-id")
        )
        if identity:
            out[identity] = JobDir(path)
    return out


def test_a_jobs_process_cannot_forge_another_local_jobs_result_or_settlement(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    """The local executor's path: a Job's processes write job-annotations.json in their
    Job's directory. A's (genuine, signed) record copied into B's directory, with a
    settled mark, is not taken for B's: B's message is dead-lettered
    FunctionResultUnverified, and only A's receipt is published."""
    app = holding_app(tmp_path)
    out = tmp_path / "out"
    assert cli(["functions", "import", str(app), "-o", str(out), "--local", "--embedded"]) == 0
    manifest = out / "shop-order.yaml"
    for order in ("a", "b"):
        body = json.dumps({"id": order})
        publish = [
            "publish",
            "-f",
            str(manifest),
            "--state-dir",
            str(state_dir),
            "--message-id",
            order,
        ]
        assert cli([*publish, body]) == 0
    first = dispatchers.start_with(
        manifest, {"JOBRUNNER_DISPATCHER__FAILPOINTS": '["before-settle"]'}
    )
    wait_until(lambda: (app / "seen-a").exists() and (app / "seen-b").exists(), timeout=90)
    (app / "go").touch()
    first.wait(timeout=90)  # killed when the first Job finished, before settling it
    jobs = job_dirs(state_dir)

    def complete(order: str) -> bool:
        conditions = jobs[order].status().get("conditions") or []
        return any(c.get("type") == "Complete" for c in conditions)

    wait_until(lambda: complete("a") and complete("b"), timeout=90)
    # What A's process can do to B's directory: put A's record there, and a settlement.
    forged = json.loads((jobs["a"].path / "job-annotations.json").read_text())
    forged["jobrunner.dev/settled"] = "ack"
    (jobs["b"].path / "job-annotations.json").write_text(json.dumps(forged))
    dispatchers.start(manifest)
    wait_until(lambda: rows(state_dir, "orders") == [], timeout=90)
    wait_until(lambda: rows(state_dir, "orders.dead-letter"), timeout=30)
    assert [b for _, b in rows(state_dir, "receipts")] == [b"receipt a"], dispatchers.logs()
    (dead,) = dead_letters(state_dir, "orders.dead-letter")
    assert dead.message_id == "b"
    assert dead.headers["x-jobrunner-reason"] == "FunctionResultUnverified"
    assert "UnverifiedMark" in (jobs["b"].path / "events.jsonl").read_text()
