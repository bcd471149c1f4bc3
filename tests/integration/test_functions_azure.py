"""Function apps end to end on the real Storage emulator (Azurite): imported with
``jobrunner functions import --local``, run by ``jobrunner run --local`` (the local
executor runs the handler as a native sidecar), messages from an Azure queue, outputs to
another, failures to ``<queue>-poison``."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.storage.queue.aio import QueueClient

from jobrunner.cli import main as cli
from jobrunner.local.jobdir import JobDir
from tests.helpers import wait_until
from tests.integration.test_azure_queue import count, outcomes, peek_all, settled_count
from tests.local.conftest import Dispatchers

pytestmark = pytest.mark.azurite

# A custom handler in Python (any language would do): it records each request it gets,
# answers as the order asks (a status and text), or with an output, Logs and a return.
HANDLER = r"""
import http.server, json, os, pathlib, time
port = int(os.environ["FUNCTIONS_CUSTOMHANDLER_PORT"])
seen = pathlib.Path("requests"); seen.mkdir(exist_ok=True)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        (seen / (payload["Metadata"]["Id"] + ".json")).write_text(json.dumps(
            {"path": self.path, "payload": payload,
             "invocation": self.headers.get("X-Azure-Functions-InvocationId")}))
        order = json.loads(payload["Data"]["order"])
        if "status" in order:
            text = order["text"].encode()
            self.send_response(order["status"]); self.end_headers(); self.wfile.write(text)
            return
        answer = {"Outputs": {"receipt": [json.dumps({"order": order["id"]})]},
                  "Logs": [f"processed order {order['id']}"], "ReturnValue": None}
        body = json.dumps(answer).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.end_headers(); self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""
NEVER_LISTENS = "import time; time.sleep(3600)\n"

FUNCTION_JSON = {
    "bindings": [
        {
            "type": "queueTrigger",
            "direction": "in",
            "name": "order",
            "queueName": "%OrdersQueue%",
            "connection": "AzureWebJobsStorage",
        },
        {
            "type": "queue",
            "direction": "out",
            "name": "receipt",
            "queueName": "%ReceiptsQueue%",
            "connection": "Storage",
        },
    ]
}


def custom_handler_app(
    root: Path, connection: str, function_queues: dict[str, str], handler: str = HANDLER
) -> Path:
    app = root / "orders-app"
    (app / "ProcessOrder").mkdir(parents=True)
    (app / "host.json").write_text(
        json.dumps(
            {
                "version": "2.0",
                "customHandler": {
                    "description": {"defaultExecutablePath": "python3", "arguments": ["handler.py"]}
                },
                "extensions": {"queues": {"maxDequeueCount": 1}},
            }
        )
    )
    (app / "handler.py").write_text(handler)
    (app / "ProcessOrder" / "function.json").write_text(json.dumps(FUNCTION_JSON))
    (app / "local.settings.json").write_text(
        json.dumps(
            {
                "Values": {
                    "AzureWebJobsStorage": connection,
                    "Storage": connection,
                    "OrdersQueue": function_queues["orders"],
                    "ReceiptsQueue": function_queues["receipts"],
                }
            }
        )
    )
    return app


def imported(app: Path, out: Path, *extra: str) -> Path:
    assert cli(["functions", "import", str(app), "-o", str(out), "--local", *extra]) == 0
    (manifest,) = [p for p in out.glob("*.yaml")]
    return manifest


def run_env() -> dict[str, str]:
    return {
        "JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5",
        "JOBRUNNER_AZURE_QUEUE__VISIBILITY_TIMEOUT_SECONDS": "4",
    }


def send(connection: str, queue: str, body: bytes) -> Any:
    async def go() -> Any:
        async with QueueClient.from_connection_string(connection, queue) as q:
            return await q.send_message(base64.b64encode(body).decode())

    return asyncio.run(go())


def receipts(connection: str, queue: str) -> list[bytes]:
    return [base64.b64decode(t) for t in peek_all(connection, queue)]


def job_logs(state: Path) -> str:
    return "\n".join(
        p.read_text() for p in sorted((state / "jobs" / "default").glob("*/logs/*.log"))
    )


def test_custom_handler_success_gets_the_host_payload_and_its_output_is_published(
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues)
    manifest = imported(app, tmp_path / "out")
    sent = send(azure_storage, function_queues["orders"], b'{"id": "o-1"}')
    local_dispatchers.start_with(manifest, run_env())
    wait_until(lambda: settled_count(local_dispatchers) >= 1, timeout=90)
    assert receipts(azure_storage, function_queues["receipts"]) == [b'{"order": "o-1"}']
    request = json.loads((app / "requests" / f"{sent.id}.json").read_text())
    assert request["path"] == "/ProcessOrder"
    assert request["invocation"]
    payload = request["payload"]
    assert payload["Data"] == {"order": '{"id": "o-1"}'}
    meta = payload["Metadata"]
    assert meta["Id"] == sent.id
    assert meta["DequeueCount"] == 1
    assert meta["PopReceipt"]
    for key in ("InsertionTime", "ExpirationTime", "NextVisibleTime"):
        assert meta[key], key
    assert meta["InsertionTime"].startswith(sent.inserted_on.isoformat()[:19])
    assert meta["sys"]["MethodName"] == "ProcessOrder"
    assert set(meta["sys"]) == {"MethodName", "UtcNow", "RandGuid"}
    wait_until(lambda: count(azure_storage, function_queues["orders"]) == 0, timeout=30)


def test_custom_handler_logs_go_to_the_job_log(
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues)
    manifest = imported(app, tmp_path / "out")
    send(azure_storage, function_queues["orders"], b'{"id": "o-logs"}')
    local_dispatchers.start_with(manifest, run_env())
    wait_until(lambda: settled_count(local_dispatchers) >= 1, timeout=90)
    (job,) = outcomes(local_dispatchers.state)
    invoker_log = (
        local_dispatchers.state / "jobs/default" / job / "logs/1-invoker.log"
    ).read_text()
    assert "processed order o-logs\n" in invoker_log


def test_custom_handler_non_2xx_dead_letters_with_its_status_and_text(
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues)
    manifest = imported(app, tmp_path / "out")
    body = b'{"id": "o-2", "status": 503, "text": "warehouse closed"}'
    send(azure_storage, function_queues["orders"], body)
    local_dispatchers.start_with(manifest, run_env())
    poison = f"{function_queues['orders']}-poison"
    wait_until(lambda: len(peek_all(azure_storage, poison)) == 1, timeout=90)
    assert base64.b64decode(peek_all(azure_storage, poison)[0]) == body
    logs = local_dispatchers.logs()
    assert (
        "FunctionFailed the custom handler answered 503 Service Unavailable to POST "
        "/ProcessOrder: warehouse closed" in logs
    ), logs
    (job,) = outcomes(local_dispatchers.state)
    events = (local_dispatchers.state / "jobs/default" / job / "events.jsonl").read_text()
    assert "warehouse closed" in events
    assert receipts(azure_storage, function_queues["receipts"]) == []


def test_custom_handler_that_never_listens_fails_with_a_clear_reason(
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues, handler=NEVER_LISTENS)
    manifest = imported(app, tmp_path / "out")
    # The generated probe allows the documented 60 s; a test need not wait that long.
    docs = list(yaml.safe_load_all(manifest.read_text()))
    docs[-1]["spec"]["jobTargetRef"]["template"]["spec"]["initContainers"][0]["startupProbe"][
        "failureThreshold"
    ] = 3
    manifest.write_text(yaml.safe_dump_all(docs))
    send(azure_storage, function_queues["orders"], b'{"id": "o-3"}')
    local_dispatchers.start_with(manifest, run_env())
    poison = f"{function_queues['orders']}-poison"
    wait_until(lambda: len(peek_all(azure_storage, poison)) == 1, timeout=90)
    logs = local_dispatchers.logs()
    assert "sidecar handler: startupProbe failed 3 times" in logs, logs
    assert "tcp 127.0.0.1:" in logs
    assert "Connection refused" in logs


@pytest.mark.parametrize("crash", ["before-settle", "after-outputs-published"])
def test_outputs_are_published_once_across_a_dispatcher_sigkill_after_the_job_finished(
    crash: str,
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues)
    manifest = imported(app, tmp_path / "out")
    send(azure_storage, function_queues["orders"], b'{"id": "o-4"}')
    first = local_dispatchers.start_with(
        manifest, {**run_env(), "JOBRUNNER_DISPATCHER__FAILPOINTS": json.dumps([crash])}
    )
    first.wait(timeout=90)  # the failpoint kills it once the Job has finished
    assert first.returncode == -signal.SIGKILL
    assert list(outcomes(local_dispatchers.state).values()) == ["CompletionsReached"]
    published_before = receipts(azure_storage, function_queues["receipts"])
    assert len(published_before) == (0 if crash == "before-settle" else 1)
    local_dispatchers.start_with(manifest, run_env())
    wait_until(lambda: settled_count(local_dispatchers) >= 1, timeout=90)
    assert receipts(azure_storage, function_queues["receipts"]) == [b'{"order": "o-4"}']
    assert "adopted its existing Job" in local_dispatchers.logs()
    wait_until(lambda: count(azure_storage, function_queues["orders"]) == 0, timeout=30)
    (job,) = outcomes(local_dispatchers.state)
    annotations = JobDir(local_dispatchers.state / "jobs/default" / job).job()["metadata"][  # type: ignore[index]
        "annotations"
    ]
    assert annotations["jobrunner.dev/outputs-published"] == "1"
