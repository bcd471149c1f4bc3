"""The HTTP trigger in the embedded mode, end to end: ``jobrunner run --local`` serves a
path, a POST becomes one local Job and is answered 202 only once the Job exists, the
Location answers the Job's outcome, and the bounds (413, 429, auth, a restart) hold.
Real processes and a real HTTP server on loopback; nothing is mocked."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.helpers import eventually
from tests.local.conftest import Dispatchers, ManifestFactory

TOKEN = "local-test-token-0123456789"
WAIT = 60.0  # generous bound: every wait below ends on an event well before it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_manifest(
    manifest: ManifestFactory,
    script: str,
    *,
    port: int,
    metadata: dict[str, str] | None = None,
    spec: dict[str, Any] | None = None,
    max_replicas: int = 4,
    auth: bool = False,
    container: dict[str, Any] | None = None,
) -> Path:
    trigger: dict[str, Any] = {
        "type": "http",
        "metadata": {"path": "/events", "listenAddress": f"127.0.0.1:{port}", **(metadata or {})},
    }
    if auth:
        trigger["authenticationRef"] = {"name": "hook-auth"}
    path = manifest(
        script,
        name="hooks",
        max_replicas=max_replicas,
        spec={"triggers": [trigger], **(spec or {})},
        container=container,
    )
    if auth:
        docs = [yaml.safe_load(path.read_text())]
        docs.append(
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "TriggerAuthentication",
                "metadata": {"name": "hook-auth"},
                "spec": {
                    "secretTargetRef": [{"parameter": "token", "name": "hook", "key": "token"}]
                },
            }
        )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "hook"},
                "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
            }
        )
        path.write_text(yaml.safe_dump_all(docs))
    return path


def ce_headers(event_id: str, **extra: str) -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/tests/local",
        "ce-type": "dev.jobrunner.test",
        "Content-Type": "application/json",
        **extra,
    }


async def serving(base: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the dispatcher answers on its port (a 404 for a path nobody serves)."""

    async def up() -> bool:
        assert proc.poll() is None, "the dispatcher exited"
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/nothing-here") as r:
                return r.status == 404
        except aiohttp.ClientError:
            return False

    await eventually(up, within=WAIT)


async def outcome(
    session: aiohttp.ClientSession, url: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    """The Location's answer once the Job has ended (200 or 400)."""

    async def ended() -> tuple[int, dict[str, Any]] | None:
        async with session.get(url, **kw) as r:
            body = await r.json()
            return (r.status, body) if r.status in (200, 400) else None

    found: tuple[int, dict[str, Any]] = await eventually(ended, within=WAIT, interval=0.2)
    return found


def job_dirs(state: Path) -> list[Path]:
    jobs = state / "jobs" / "default"
    return sorted(jobs.iterdir()) if jobs.is_dir() else []


WORKER = """
import os, sys
body = os.environ["JOBRUNNER_MESSAGE"]
with open(os.environ["RUNS_FILE"], "a") as f:
    f.write(os.environ["JOBRUNNER_MESSAGE_ID"] + " " + body + "\\n")
if "fail" in body:
    sys.exit(3)
"""


async def test_a_post_is_one_job_and_its_location_answers_the_outcome(
    manifest: ManifestFactory, dispatchers: Dispatchers, state_dir: Path, tmp_path: Path
) -> None:
    sink_got: list[dict[str, Any]] = []

    async def sink(request: web.Request) -> web.Response:
        sink_got.append(json.loads(await request.read()))
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/dead", sink)
    runner = web.AppRunner(app)
    await runner.setup()
    sink_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", sink_port).start()
    port = free_port()
    path = http_manifest(
        manifest,
        WORKER,
        port=port,
        spec={"deadLetter": {"url": f"http://127.0.0.1:{sink_port}/dead"}},
    )
    proc = dispatchers.start(path)
    base = f"http://127.0.0.1:{port}"
    try:
        await serving(base, proc)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/events", data=b'{"n": 1}', headers=ce_headers("ok-1")) as r:
                assert r.status == 202, await r.text()
                where = r.headers["Location"]
                accepted = await r.json()
            assert where == "/events/%2Ftests%2Flocal%23ok-1"
            # 202 means the Job exists already: it is on disk before any wait.
            assert [d.name for d in job_dirs(state_dir)] == [accepted["job"]]
            status, body = await outcome(s, base + where)
            assert (status, body["status"]) == (200, "succeeded"), body
            assert (tmp_path / "runs.txt").read_text() == 'ok-1 {"n": 1}\n'

            async with s.post(f"{base}/events", data=b'"fail"', headers=ce_headers("bad-1")) as r:
                assert r.status == 202
                failed_at = r.headers["Location"]
            status, body = await outcome(s, base + failed_at)
            assert status == 400
            assert body["status"] == "failed"
            assert body["reason"] == "BackoffLimitExceeded"
            assert body["result"]["exitCode"] == 3
            assert "message" not in body  # the log's last lines stay in the dead letter
            await eventually(lambda: _truthy(sink_got), within=WAIT)
            dead = sink_got[0]
            assert dead["jobrunnerreason"] == "BackoffLimitExceeded"
            assert dead["jobrunnereventid"] == "bad-1"
            assert base64.b64decode(dead["data_base64"]) == b'"fail"'

            async with s.get(f"{base}/events/never-sent") as r:
                assert r.status == 404
            async with s.put(f"{base}/events", data=b"x") as r:
                assert r.status == 405
        status_out = (
            await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "jobrunner.cli",
                    "status",
                    "--local",
                    "--state-dir",
                    str(state_dir),
                    "-f",
                    str(path),
                ],
                capture_output=True,
                text=True,
                timeout=WAIT,
                check=True,
            )
        ).stdout
        assert "finished 2 (1 succeeded, 1 failed)" in status_out, status_out
    finally:
        await runner.cleanup()


async def _truthy(value: Any) -> Any:
    return value


async def test_concurrent_posts_of_the_same_events_are_one_job_each(
    manifest: ManifestFactory, dispatchers: Dispatchers, state_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    path = http_manifest(
        manifest, WORKER, port=port, max_replicas=20, metadata={"maxPendingRequests": "100"}
    )
    proc = dispatchers.start(path)
    base = f"http://127.0.0.1:{port}"
    await serving(base, proc)
    ids = [f"event-{i}" for i in range(20)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def post(event_id: str) -> tuple[int, str]:
            body = json.dumps({"id": event_id}).encode()
            async with s.post(f"{base}/events", data=body, headers=ce_headers(event_id)) as r:
                return r.status, (await r.json()).get("job", "")

        answers = await asyncio.gather(*(post(i) for i in ids * 5))
        assert {a[0] for a in answers} == {202}, answers
        by_event: dict[str, set[str]] = {}
        for event_id, (_, job) in zip(ids * 5, answers, strict=True):
            by_event.setdefault(event_id, set()).add(job)
        assert all(len(jobs) == 1 for jobs in by_event.values()), by_event
        assert len(job_dirs(state_dir)) == 20
        for event_id in ids:
            await outcome(s, f"{base}/events/%2Ftests%2Flocal%23{event_id}")
    runs = (tmp_path / "runs.txt").read_text().splitlines()
    assert sorted(line.split()[0] for line in runs) == sorted(ids)  # each ran once


GATED = """
import os, time
gate = os.environ["RUNS_FILE"] + ".open"
with open(os.environ["RUNS_FILE"], "a") as f:
    f.write(os.environ["JOBRUNNER_MESSAGE_ID"] + "\\n")
while not os.path.exists(gate):
    time.sleep(0.05)
"""


async def test_bounds_413_429_and_who_gets_in(
    manifest: ManifestFactory, dispatchers: Dispatchers, state_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    path = http_manifest(
        manifest,
        GATED,
        port=port,
        max_replicas=1,
        auth=True,
        metadata={"maxPendingRequests": "1", "retryAfterSeconds": "7"},
        spec={"messageDelivery": {"maxMessageBytes": 1024}},
    )
    proc = dispatchers.start(path)
    base = f"http://127.0.0.1:{port}"
    await serving(base, proc)
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s:
        for auth in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789"},
            {"Authorization": TOKEN},
        ):
            async with s.post(
                f"{base}/events", data=b"{}", headers={**ce_headers("a"), **auth}
            ) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"] == "Bearer"
            async with s.get(f"{base}/events/x", headers=auth) as r:
                assert r.status == 401
        assert job_dirs(state_dir) == []
        big = b"x" * 2048
        async with s.post(f"{base}/events", data=big, headers={**ce_headers("big"), **good}) as r:
            assert r.status == 413
        assert job_dirs(state_dir) == []

        async with s.post(f"{base}/events", data=b"{}", headers={**ce_headers("one"), **good}) as r:
            assert r.status == 202  # the one slot
        # The second waits for that slot (pending), the third finds the backlog full.
        second = asyncio.ensure_future(
            s.post(f"{base}/events", data=b"{}", headers={**ce_headers("two"), **good})
        )

        async def pending() -> bool:
            async with s.get(f"{base}/events/%2Ftests%2Flocal%23two", headers=good) as r:
                return r.status == 202 and (await r.json())["status"] == "pending"

        await eventually(pending, within=WAIT)
        async with s.post(
            f"{base}/events", data=b"{}", headers={**ce_headers("three"), **good}
        ) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "7"
        assert len(job_dirs(state_dir)) == 1
        (tmp_path / "runs.txt.open").touch()  # the first Job ends: its slot frees
        answer = await second
        assert answer.status == 202
        answer.release()
        await outcome(s, f"{base}/events/%2Ftests%2Flocal%23two", headers=good)
    assert len(job_dirs(state_dir)) == 2


async def test_a_restart_answers_202_only_for_what_is_durable(
    manifest: ManifestFactory, dispatchers: Dispatchers, state_dir: Path, tmp_path: Path
) -> None:
    """A POST that waits for a slot when the dispatcher stops is answered 503 (nothing
    durable exists for it); one in flight when it is SIGKILLed gets no answer. Retried
    after the restart, each makes one Job, and the Job that existed is not made again."""
    port = free_port()
    path = http_manifest(manifest, GATED, port=port, max_replicas=1)
    proc = dispatchers.start(path)
    base = f"http://127.0.0.1:{port}"
    await serving(base, proc)
    async with aiohttp.ClientSession() as s:

        async def post(event_id: str) -> int:
            async with s.post(f"{base}/events", data=b"{}", headers=ce_headers(event_id)) as r:
                return r.status

        assert await post("first") == 202
        waiting = asyncio.ensure_future(post("second"))

        async def second_pending() -> bool:
            async with s.get(f"{base}/events/%2Ftests%2Flocal%23second") as r:
                return r.status == 202

        await eventually(second_pending, within=WAIT)
        proc.send_signal(signal.SIGTERM)
        assert await waiting == 503
        assert proc.wait(timeout=WAIT) == 0
        assert len(job_dirs(state_dir)) == 1

        proc = dispatchers.start(path)
        await serving(base, proc)
        killed = asyncio.ensure_future(post("third"))

        async def third_pending() -> bool:
            async with s.get(f"{base}/events/%2Ftests%2Flocal%23third") as r:
                return r.status == 202

        await eventually(third_pending, within=WAIT)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT)
        with pytest.raises(aiohttp.ClientError):
            await killed

        proc = dispatchers.start(path)
        await serving(base, proc)
        assert await post("first") == 202  # adopted: the Job it has
        (tmp_path / "runs.txt.open").touch()
        assert await post("second") == 202
        assert await post("third") == 202
        for event_id in ("first", "second", "third"):
            await outcome(s, f"{base}/events/%2Ftests%2Flocal%23{event_id}")
    assert len(job_dirs(state_dir)) == 3
    runs = (tmp_path / "runs.txt").read_text().split()
    assert sorted(runs) == ["first", "second", "third"]  # each ran once


VERIFY = """
import hashlib, hmac, json, os, sys
body = os.environ["JOBRUNNER_MESSAGE"].encode()
sent = json.loads(os.environ["JOBRUNNER_MESSAGE_HEADERS"])["x-hub-signature-256"]
mine = "sha256=" + hmac.new(b"webhook-secret", body, hashlib.sha256).hexdigest()
sys.exit(0 if hmac.compare_digest(sent, mine) else 9)
"""


async def test_a_webhook_signature_verifies_in_the_job(
    manifest: ManifestFactory, dispatchers: Dispatchers
) -> None:
    """GitHub-style: the Job gets the body byte for byte and the forwarded signature
    header, so it can check the HMAC itself; a forged signature fails the Job."""
    import hashlib
    import hmac

    port = free_port()
    path = http_manifest(
        manifest, VERIFY, port=port, metadata={"forwardHeaders": "X-Hub-Signature-256"}
    )
    proc = dispatchers.start(path)
    base = f"http://127.0.0.1:{port}"
    await serving(base, proc)
    body = b'{"action":  "opened",\n "number": 7}'  # odd spacing: bytes, not a value
    good = "sha256=" + hmac.new(b"webhook-secret", body, hashlib.sha256).hexdigest()
    async with aiohttp.ClientSession() as s:
        outcomes = []
        for key, signature in (("d-1", good), ("d-2", "sha256=" + "0" * 64)):
            headers = {"Idempotency-Key": key, "X-Hub-Signature-256": signature}
            async with s.post(f"{base}/events", data=body, headers=headers) as r:
                assert r.status == 202
                where = r.headers["Location"]
            outcomes.append((await outcome(s, base + where))[0])
    assert outcomes == [200, 400]


RESULT = """
import json, os
order = json.loads(os.environ["JOBRUNNER_MESSAGE"])
with open(os.environ["RESULT"], "w") as f:
    f.write(json.dumps({"thumbnail": order["image"] + ".small"}))
"""


async def test_the_location_answers_the_jobs_result(
    manifest: ManifestFactory, dispatchers: Dispatchers
) -> None:
    """What the Job wrote to its termination message (terminationMessagePath, as the
    kubelet keeps it) is the GET's result, with its exit code and duration."""
    port = free_port()
    path = http_manifest(
        manifest,
        RESULT,
        port=port,
        container={"env": [{"name": "RESULT", "value": "/dev/termination-log"}]},
    )
    proc = dispatchers.start(path)
    base = f"http://127.0.0.1:{port}"
    await serving(base, proc)
    async with aiohttp.ClientSession() as s:
        body = b'{"image": "cat.png"}'
        async with s.post(f"{base}/events", data=body, headers=ce_headers("r-1")) as r:
            assert r.status == 202
            where = r.headers["Location"]
        status, answer = await outcome(s, base + where)
    assert status == 200
    result = answer["result"]
    assert json.loads(result["payload"]) == {"thumbnail": "cat.png.small"}
    assert result["exitCode"] == 0
    assert result["durationSeconds"] >= 0


async def test_bodies_being_received_count_against_the_pending_bound(
    manifest: ManifestFactory, dispatchers: Dispatchers, state_dir: Path
) -> None:
    """Connections that trickle their bodies hold memory as surely as events waiting
    for a slot: past maxPendingRequests of either, a POST is refused 429 before its
    body is read, so the memory held stays bounded by maxPendingRequests bodies."""
    port = free_port()
    path = http_manifest(manifest, WORKER, port=port, metadata={"maxPendingRequests": "2"})
    proc = dispatchers.start(path)
    base = f"http://127.0.0.1:{port}"
    await serving(base, proc)
    request = (
        b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: slow\r\nContent-Length: 100\r\n\r\n{"
    )
    slow = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        slow.append((reader, writer))
    async with aiohttp.ClientSession() as s:

        async def refused() -> bool:
            async with s.post(f"{base}/events", data=b"{}", headers=ce_headers("fast")) as r:
                return r.status == 429

        await eventually(refused, within=WAIT)
        for _, writer in slow:
            writer.close()
        assert job_dirs(state_dir) == []

        async def accepted() -> bool:
            async with s.post(f"{base}/events", data=b"{}", headers=ce_headers("fast")) as r:
                return r.status == 202

        await eventually(accepted, within=WAIT)  # the bound frees with the connections
