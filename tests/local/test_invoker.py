"""The in-Job invoker on its own, as a Job's process runs it: the message from the
environment (text, base64 or a file), a custom handler's answer turned into the result
record, and the record written where the local executor reads it, with its MAC under
the Job's key (the Job's directory holds job.json and the key, as the local executor's
do)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobrunner.functions import invoker

INVOKER = Path(invoker.__file__)


class Handler(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, bytes] = (200, b"{}")
    seen: list[dict[str, Any]] = []  # noqa: RUF012 (one handler per test, reset by the fixture)

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "body": body, "headers": dict(self.headers)})
        status, text = self.answer
        self.send_response(status)
        self.end_headers()
        self.wfile.write(text)


@pytest.fixture
def handler() -> Iterator[tuple[int, type[Handler]]]:
    kind = type("H", (Handler,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), kind)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], kind
    server.shutdown()


KEY = b"k" * 32
UID = "2b1e0f7c-uid"


def as_local_job(job_dir: Path) -> None:
    """What the local executor gives a Job's processes: job.json and the mounted key."""
    (job_dir / "job.json").write_text(
        json.dumps({"metadata": {"name": "fn-1", "namespace": "default", "uid": UID}})
    )
    (job_dir / "key").write_bytes(KEY)


def expected_mac(text: str) -> str:
    message = "\n".join(
        ("jobrunner.dev/mark/v1", "default", "fn-1", UID, invoker.RESULT_ANNOTATION, text)
    )
    return "v1:" + hmac.new(KEY, message.encode(), hashlib.sha256).hexdigest()


def run(job_dir: Path, args: list[str], **env: str) -> tuple[int, str, dict[str, Any] | None]:
    """The invoker as a local Job runs it; the record it left, checked to carry its MAC."""
    if not (job_dir / "job.json").exists():
        as_local_job(job_dir)
    full = {
        "PATH": os.environ["PATH"],
        "JOBRUNNER_LOCAL_JOB_DIR": str(job_dir),
        "JOBRUNNER_FUNCTION_KEY_FILE": str(job_dir / "key"),
        "JOBRUNNER_SOURCE": "azure-queue",
        "JOBRUNNER_MESSAGE_ID": "m-1",
        "JOBRUNNER_MESSAGE_METADATA": json.dumps({"Id": "m-1", "DequeueCount": "2"}),
        **env,
    }
    done = subprocess.run(
        [sys.executable, str(INVOKER), *args], env=full, capture_output=True, text=True, timeout=60
    )
    annotations = job_dir / "job-annotations.json"
    record = None
    if annotations.exists():
        written = json.loads(annotations.read_text())
        text = written[invoker.RESULT_ANNOTATION]
        assert written[invoker.RESULT_ANNOTATION + "-mac"] == expected_mac(text)
        record = json.loads(text)
    return done.returncode, done.stdout + done.stderr, record


def test_a_text_message_reaches_the_handler_as_data_with_the_queue_metadata(
    handler: tuple[int, type[Handler]], tmp_path: Path
) -> None:
    port, kind = handler
    kind.answer = (
        200,
        json.dumps({"Outputs": {"out": ["a", "b"]}, "ReturnValue": {"x": 1}}).encode(),
    )
    code, out, record = run(
        tmp_path,
        [
            "custom-handler",
            "--function",
            "Fn",
            "--port",
            str(port),
            "--binding",
            "item",
            "--outputs",
            "out,$return",
        ],
        JOBRUNNER_MESSAGE="héllo $(HOME)",
        JOBRUNNER_MESSAGE_ENCODING="utf-8",
    )
    assert code == 0, out
    (request,) = kind.seen
    assert request["path"] == "/Fn"
    assert request["body"]["Data"] == {"item": "héllo $(HOME)"}
    assert request["body"]["Metadata"]["Id"] == "m-1"
    assert request["body"]["Metadata"]["DequeueCount"] == 2
    assert request["headers"]["User-Agent"].startswith("Azure-Functions-Host/")
    assert record == {
        "status": "succeeded",
        "outputs": {
            "out": [base64.b64encode(b"a").decode(), base64.b64encode(b"b").decode()],
            "$return": [base64.b64encode(b'{"x": 1}').decode()],
        },
    }


def test_a_binary_message_in_a_file_reaches_the_handler_as_base64(
    handler: tuple[int, type[Handler]], tmp_path: Path
) -> None:
    port, kind = handler
    body = b"\x00\xff\x80binary"
    (tmp_path / "body").write_bytes(body)
    code, out, _ = run(
        tmp_path,
        ["custom-handler", "--function", "Fn", "--port", str(port)],
        JOBRUNNER_MESSAGE_FILE=str(tmp_path / "body"),
        JOBRUNNER_MESSAGE_ENCODING="base64",
    )
    assert code == 0, out
    assert kind.seen[0]["body"]["Data"] == {"msg": base64.b64encode(body).decode()}


def test_a_2xx_answer_that_is_not_a_json_object_fails_the_invocation(
    handler: tuple[int, type[Handler]], tmp_path: Path
) -> None:
    port, kind = handler
    kind.answer = (200, b"ok thanks")
    code, out, record = run(
        tmp_path,
        ["custom-handler", "--function", "Fn", "--port", str(port)],
        JOBRUNNER_MESSAGE="x",
    )
    assert code == 1
    assert record is not None
    assert record["status"] == "failed"
    assert "with a body that is not a JSON object: 'ok thanks'" in record["error"], out


def test_an_output_with_no_binding_is_named_and_dropped(
    handler: tuple[int, type[Handler]], tmp_path: Path
) -> None:
    port, kind = handler
    kind.answer = (200, json.dumps({"Outputs": {"stray": "x"}}).encode())
    code, out, record = run(
        tmp_path,
        ["custom-handler", "--function", "Fn", "--port", str(port)],
        JOBRUNNER_MESSAGE="x",
    )
    assert code == 0
    assert "output 'stray' has no output binding; ignored" in out
    assert record == {"status": "succeeded", "outputs": {}}


def test_install_copies_the_invoker_which_runs_with_no_jobrunner_around(tmp_path: Path) -> None:
    target = tmp_path / "volume"
    code = subprocess.run(
        [sys.executable, "-m", "jobrunner.functions.invoker", "install", str(target)],
        timeout=60,
        check=False,
    ).returncode
    assert code == 0
    # Run from the copy with -I (no site-packages, no cwd on sys.path): standard library only.
    done = subprocess.run(
        [sys.executable, "-I", str(target / "invoker.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "custom-handler" in done.stdout


def test_without_its_key_the_invoker_records_nothing_and_fails(
    handler: tuple[int, type[Handler]], tmp_path: Path
) -> None:
    """An unauthenticated record would be ignored; the success must not stand without one."""
    port, _ = handler
    as_local_job(tmp_path)
    (tmp_path / "key").unlink()
    started = time.monotonic()
    code, out, record = run(
        tmp_path,
        ["custom-handler", "--function", "Fn", "--port", str(port)],
        JOBRUNNER_MESSAGE="x",
    )
    assert code == 1
    assert record is None
    assert "cannot authenticate the result: no key at" in out
    assert time.monotonic() - started >= invoker.KEY_WAIT_SECONDS  # it waited for the mount


def test_a_key_that_appears_late_is_waited_for(
    handler: tuple[int, type[Handler]], tmp_path: Path
) -> None:
    port, _ = handler
    as_local_job(tmp_path)
    (tmp_path / "key").unlink()
    late = threading.Timer(1.0, lambda: (tmp_path / "key").write_bytes(KEY))
    late.start()
    try:
        code, out, record = run(
            tmp_path,
            ["custom-handler", "--function", "Fn", "--port", str(port)],
            JOBRUNNER_MESSAGE="x",
        )
    finally:
        late.cancel()
    assert code == 0, out
    assert record == {"status": "succeeded", "outputs": {}}
