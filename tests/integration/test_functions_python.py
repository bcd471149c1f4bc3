"""Python function apps (the v1 folder model and the v2 decorator model) called in their
own interpreter by the in-Job invoker, with no Functions host: messages from an Azure
queue on Azurite, each function gets ``azure.functions.QueueMessage`` with the body and
the queue's metadata exactly, and an exception fails the Job with its message."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.integration.test_azure_queue import count, outcomes, peek_all, settled_count
from tests.integration.test_functions_azure import imported, receipts, run_env, send
from tests.local.conftest import Dispatchers

pytestmark = pytest.mark.azurite

BODY = """
def handle(msg, out, here):
    import json, pathlib
    body = msg.get_body()
    if body.startswith(b'{"raise"'):
        raise ValueError(json.loads(body)["raise"])
    try:
        parsed = msg.get_json()
    except ValueError:
        parsed = None
    def when(t):
        return t.isoformat() if t is not None else None
    captures = pathlib.Path(here) / "captures"
    captures.mkdir(exist_ok=True)
    (captures / (msg.id + ".json")).write_text(json.dumps({
        "type": type(msg).__module__ + "." + type(msg).__name__,
        "body": body.hex(), "json": parsed, "id": msg.id,
        "dequeue_count": msg.dequeue_count, "insertion_time": when(msg.insertion_time),
        "expiration_time": when(msg.expiration_time),
        "time_next_visible": when(msg.time_next_visible), "pop_receipt": msg.pop_receipt,
    }))
    out.set("done " + msg.id)
"""

V2_APP = (
    "import azure.functions as func\nimport pathlib\n"
    + BODY
    + """
app = func.FunctionApp()

@app.function_name("Work")
@app.queue_trigger(arg_name="msg", queue_name="%OrdersQueue%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="%ReceiptsQueue%", connection="AzureWebJobsStorage")
def work(msg: func.QueueMessage, out: func.Out[str]) -> None:
    handle(msg, out, pathlib.Path(__file__).parent)
"""
)

V1_INIT = (
    "import azure.functions as func\nimport pathlib\n"
    + BODY
    + """
def main(msg: func.QueueMessage, out: func.Out[str]) -> None:
    handle(msg, out, pathlib.Path(__file__).parent.parent)
"""
)

V1_FUNCTION = {
    "scriptFile": "__init__.py",
    "bindings": [
        {
            "type": "queueTrigger",
            "direction": "in",
            "name": "msg",
            "queueName": "%OrdersQueue%",
            "connection": "AzureWebJobsStorage",
        },
        {
            "type": "queue",
            "direction": "out",
            "name": "out",
            "queueName": "%ReceiptsQueue%",
            "connection": "AzureWebJobsStorage",
        },
    ],
}


def python_app(root: Path, model: str, connection: str, function_queues: dict[str, str]) -> Path:
    app = root / f"py-{model}"
    app.mkdir()
    (app / "host.json").write_text(
        json.dumps({"version": "2.0", "extensions": {"queues": {"maxDequeueCount": 1}}})
    )
    (app / "local.settings.json").write_text(
        json.dumps(
            {
                "Values": {
                    "FUNCTIONS_WORKER_RUNTIME": "python",
                    "AzureWebJobsStorage": connection,
                    "OrdersQueue": function_queues["orders"],
                    "ReceiptsQueue": function_queues["receipts"],
                }
            }
        )
    )
    if model == "v2":
        (app / "function_app.py").write_text(V2_APP)
    else:
        (app / "Work").mkdir()
        (app / "Work" / "__init__.py").write_text(V1_INIT)
        (app / "Work" / "function.json").write_text(json.dumps(V1_FUNCTION))
    return app


BODIES = {
    "bytes": b"\x00\xff\xfe raw \x80 bytes",
    "unicode": "héllo ✓ 日本語 $(HOME) {{ x }}".encode(),
    "json": json.dumps({"order": 7, "items": ["ü", None, 1.5]}).encode(),
}


@pytest.mark.parametrize("model", ["v1", "v2"])
def test_python_function_receives_the_body_and_metadata_exactly(
    model: str,
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = python_app(tmp_path, model, azure_storage, function_queues)
    manifest = imported(app, tmp_path / "out")
    sent = {
        kind: send(azure_storage, function_queues["orders"], body) for kind, body in BODIES.items()
    }
    local_dispatchers.start_with(manifest, run_env())
    wait_until(lambda: settled_count(local_dispatchers) >= 3, timeout=120)
    for kind, message in sent.items():
        seen: dict[str, Any] = json.loads((app / "captures" / f"{message.id}.json").read_text())
        assert seen["type"] == "azure.functions.queue.QueueMessage"
        assert bytes.fromhex(seen["body"]) == BODIES[kind], kind
        assert seen["id"] == message.id
        assert seen["dequeue_count"] == 1
        assert seen["insertion_time"] == message.inserted_on.isoformat()
        assert seen["expiration_time"] == message.expires_on.isoformat()
        assert seen["time_next_visible"]
        assert seen["pop_receipt"]
    assert json.loads((app / "captures" / f"{sent['json'].id}.json").read_text())["json"] == {
        "order": 7,
        "items": ["ü", None, 1.5],
    }
    assert sorted(receipts(azure_storage, function_queues["receipts"])) == sorted(
        f"done {m.id}".encode() for m in sent.values()
    )
    wait_until(lambda: count(azure_storage, function_queues["orders"]) == 0, timeout=30)


@pytest.mark.parametrize("model", ["v1", "v2"])
def test_python_function_exception_fails_the_job_with_its_message(
    model: str,
    azure_storage: str,
    function_queues: dict[str, str],
    local_dispatchers: Dispatchers,
    tmp_path: Path,
) -> None:
    app = python_app(tmp_path, model, azure_storage, function_queues)
    manifest = imported(app, tmp_path / "out")
    body = json.dumps({"raise": "image 42 is corrupt"}).encode()
    send(azure_storage, function_queues["orders"], body)
    local_dispatchers.start_with(manifest, run_env())
    poison = f"{function_queues['orders']}-poison"
    wait_until(lambda: len(peek_all(azure_storage, poison)) == 1, timeout=90)
    assert base64.b64decode(peek_all(azure_storage, poison)[0]) == body
    logs = local_dispatchers.logs()
    assert "FunctionFailed function Work raised ValueError: image 42 is corrupt" in logs, logs
    assert list(outcomes(local_dispatchers.state).values()) == ["BackoffLimitExceeded"]
    (job,) = outcomes(local_dispatchers.state)
    log = (local_dispatchers.state / "jobs/default" / job / "logs/1-function.log").read_text()
    assert "Traceback" in log  # the traceback is in the Job's log
    assert receipts(azure_storage, function_queues["receipts"]) == []
