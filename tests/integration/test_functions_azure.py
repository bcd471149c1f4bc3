"""Function apps end to end on the real Storage emulator (Azurite): imported with
``jobrunner functions import --local``, run by ``jobrunner run --local`` (the local
executor runs the handler as a native sidecar), messages from an Azure queue, outputs to
another, failures to ``<queue>-poison``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import uuid
from collections.abc import Iterator
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


@pytest.fixture
def queues(azure_storage: str) -> Iterator[dict[str, str]]:
    run = uuid.uuid4().hex[:10]
    names = {"orders": f"orders-{run}", "receipts": f"receipts-{run}"}

    async def create() -> None:
        async with QueueClient.from_connection_string(azure_storage, names["orders"]) as q:
            await q.create_queue()

    asyncio.run(create())
    yield names

    async def delete() -> None:
        for name in [*names.values(), f"{names['orders']}-poison"]:
            async with QueueClient.from_connection_string(azure_storage, name) as q:
                with contextlib.suppress(Exception):  # never created
                    await q.delete_queue()

    asyncio.run(delete())


@pytest.fixture
def dispatchers(tmp_path: Path) -> Iterator[Dispatchers]:
    state = tmp_path / "state"
    state.mkdir()
    d = Dispatchers(state, tmp_path)
    yield d
    for proc in d.started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    from jobrunner.local.client import LocalJobClient

    client = LocalJobClient(state, controller=False)

    async def delete_all() -> None:
        base = state / "jobs" / "default"
        for job in base.iterdir() if base.is_dir() else []:
            await client.delete_job("default", job.name)

    asyncio.run(delete_all())


def custom_handler_app(
    root: Path, connection: str, queues: dict[str, str], handler: str = HANDLER
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
                    "OrdersQueue": queues["orders"],
                    "ReceiptsQueue": queues["receipts"],
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
    azure_storage: str, queues: dict[str, str], dispatchers: Dispatchers, tmp_path: Path
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, queues)
    manifest = imported(app, tmp_path / "out")
    sent = send(azure_storage, queues["orders"], b'{"id": "o-1"}')
    dispatchers.start_with(manifest, run_env())
    wait_until(lambda: settled_count(dispatchers) >= 1, timeout=90)
    assert receipts(azure_storage, queues["receipts"]) == [b'{"order": "o-1"}']
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
    wait_until(lambda: count(azure_storage, queues["orders"]) == 0, timeout=30)


def test_custom_handler_logs_go_to_the_job_log(
    azure_storage: str, queues: dict[str, str], dispatchers: Dispatchers, tmp_path: Path
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, queues)
    manifest = imported(app, tmp_path / "out")
    send(azure_storage, queues["orders"], b'{"id": "o-logs"}')
    dispatchers.start_with(manifest, run_env())
    wait_until(lambda: settled_count(dispatchers) >= 1, timeout=90)
    (job,) = outcomes(dispatchers.state)
    invoker_log = (dispatchers.state / "jobs/default" / job / "logs/1-invoker.log").read_text()
    assert "processed order o-logs\n" in invoker_log


def test_custom_handler_non_2xx_dead_letters_with_its_status_and_text(
    azure_storage: str, queues: dict[str, str], dispatchers: Dispatchers, tmp_path: Path
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, queues)
    manifest = imported(app, tmp_path / "out")
    body = b'{"id": "o-2", "status": 503, "text": "warehouse closed"}'
    send(azure_storage, queues["orders"], body)
    dispatchers.start_with(manifest, run_env())
    poison = f"{queues['orders']}-poison"
    wait_until(lambda: len(peek_all(azure_storage, poison)) == 1, timeout=90)
    assert base64.b64decode(peek_all(azure_storage, poison)[0]) == body
    logs = dispatchers.logs()
    assert (
        "FunctionFailed the custom handler answered 503 Service Unavailable to POST "
        "/ProcessOrder: warehouse closed" in logs
    ), logs
    (job,) = outcomes(dispatchers.state)
    events = (dispatchers.state / "jobs/default" / job / "events.jsonl").read_text()
    assert "warehouse closed" in events
    assert receipts(azure_storage, queues["receipts"]) == []


def test_custom_handler_that_never_listens_fails_with_a_clear_reason(
    azure_storage: str, queues: dict[str, str], dispatchers: Dispatchers, tmp_path: Path
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, queues, handler=NEVER_LISTENS)
    manifest = imported(app, tmp_path / "out")
    # The generated probe allows the documented 60 s; a test need not wait that long.
    docs = list(yaml.safe_load_all(manifest.read_text()))
    docs[-1]["spec"]["jobTargetRef"]["template"]["spec"]["initContainers"][0]["startupProbe"][
        "failureThreshold"
    ] = 3
    manifest.write_text(yaml.safe_dump_all(docs))
    send(azure_storage, queues["orders"], b'{"id": "o-3"}')
    dispatchers.start_with(manifest, run_env())
    poison = f"{queues['orders']}-poison"
    wait_until(lambda: len(peek_all(azure_storage, poison)) == 1, timeout=90)
    logs = dispatchers.logs()
    assert "sidecar handler: startupProbe failed 3 times" in logs, logs
    assert "tcp 127.0.0.1:" in logs
    assert "Connection refused" in logs


@pytest.mark.parametrize("crash", ["before-settle", "after-outputs-published"])
def test_outputs_are_published_once_across_a_dispatcher_sigkill_after_the_job_finished(
    crash: str,
    azure_storage: str,
    queues: dict[str, str],
    dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, queues)
    manifest = imported(app, tmp_path / "out")
    send(azure_storage, queues["orders"], b'{"id": "o-4"}')
    first = dispatchers.start_with(
        manifest, {**run_env(), "JOBRUNNER_DISPATCHER__FAILPOINTS": json.dumps([crash])}
    )
    first.wait(timeout=90)  # the failpoint kills it once the Job has finished
    assert first.returncode == -signal.SIGKILL
    assert list(outcomes(dispatchers.state).values()) == ["CompletionsReached"]
    published_before = receipts(azure_storage, queues["receipts"])
    assert len(published_before) == (0 if crash == "before-settle" else 1)
    dispatchers.start_with(manifest, run_env())
    wait_until(lambda: settled_count(dispatchers) >= 1, timeout=90)
    assert receipts(azure_storage, queues["receipts"]) == [b'{"order": "o-4"}']
    assert "adopted its existing Job" in dispatchers.logs()
    wait_until(lambda: count(azure_storage, queues["orders"]) == 0, timeout=30)
    (job,) = outcomes(dispatchers.state)
    annotations = JobDir(dispatchers.state / "jobs/default" / job).job()["metadata"][  # type: ignore[index]
        "annotations"
    ]
    assert annotations["jobrunner.dev/outputs-published"] == "1"
