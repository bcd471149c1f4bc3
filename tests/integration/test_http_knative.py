"""The HTTP trigger as the sink of a Knative Broker Trigger: events sent as Knative's
dispatcher sends them (the real ``cloudevents`` SDK's binary and structured encodings,
canonical header casing such as ``Ce-Id``) by a sender that retries as Knative delivery
does (5xx, 429 honouring ``Retry-After``, 408 and a refused connection are retried; any
other 4xx is final). What a sink owes such a sender:

* a retry after a 429 succeeds and makes exactly one Job;
* a 5xx (or a refused connection) while the dispatcher restarts, then the retry, makes
  exactly one Job;
* the structured and the binary encoding of one event (same ``source`` + ``id``) are one
  Job.

With the local executor (``--local``, marker ``local``) and on the stack's API server with
KWOK nodes (marker ``kube``). Waits follow what the dispatcher answers (a GET on the
Location says ``pending``); every bound is generous (the suite passes beside busy loops).
"""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent

from jobrunner.core.naming import job_name
from jobrunner.sources.http.binding import location
from tests.helpers import eventually
from tests.integration.harness import Dispatcher, jobs_of
from tests.local.conftest import Dispatchers

SOURCE = "/knative/broker/default"
TOKEN = "knative-sink-token-" + "0" * 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def canonical(headers: dict[str, str]) -> dict[str, str]:
    """Header names as Go's net/http writes them (Knative's dispatcher is Go):
    ``ce-id`` -> ``Ce-Id``, ``content-type`` -> ``Content-Type``."""
    return {"-".join(p.capitalize() for p in k.split("-")): v for k, v in headers.items()}


def event(event_id: str, data: Any = None, **attributes: str) -> CloudEvent:
    return CloudEvent(
        {
            "type": "dev.knative.test",
            "source": SOURCE,
            "id": event_id,
            # Knative's broker sets it (a body without a Content-Type is
            # application/octet-stream to an HTTP client).
            "datacontenttype": "application/json",
            **attributes,
        },
        data if data is not None else {"n": 1},
    )


def binary(ce: CloudEvent) -> tuple[dict[str, str], bytes]:
    headers, body = to_binary(ce)
    return canonical(headers), body


def structured(ce: CloudEvent) -> tuple[dict[str, str], bytes]:
    headers, body = to_structured(ce)
    return canonical(headers), body


RETRIED = {408, 429}


@dataclass
class KnativeSender:
    """Delivers one event as Knative delivery does: retries on 5xx, 429 (after its
    ``Retry-After``), 408 and a failed connection, with a bounded exponential backoff
    otherwise; stops at 2xx or any other 4xx. ``attempts`` bounds it."""

    url: str
    auth: dict[str, str] = field(default_factory=dict)
    attempts: int = 40
    backoff: float = 0.2
    statuses: list[int | str] = field(default_factory=list)

    async def send(self, headers: dict[str, str], body: bytes) -> aiohttp.ClientResponse:
        delay = self.backoff
        async with aiohttp.ClientSession() as session:
            for _ in range(self.attempts):
                try:
                    async with session.post(
                        self.url, data=body, headers={**headers, **self.auth}
                    ) as response:
                        await response.read()
                except aiohttp.ClientConnectionError as exc:
                    self.statuses.append(type(exc).__name__)
                else:
                    self.statuses.append(response.status)
                    if response.status < 400 or (
                        response.status < 500 and response.status not in RETRIED
                    ):
                        return response
                    if "Retry-After" in response.headers:
                        await asyncio.sleep(float(response.headers["Retry-After"]))
                        continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError(f"not delivered after {self.attempts} attempts: {self.statuses}")


async def status_of(url: str, location: str, auth: dict[str, str]) -> tuple[int, dict[str, Any]]:
    base = url.split("/events")[0]
    async with aiohttp.ClientSession() as session, session.get(base + location, headers=auth) as r:
        return r.status, await r.json()


def scaledjob(
    *, namespace: str | None, port: int, command: str, max_pending: int, auth: bool
) -> list[dict[str, Any]]:
    trigger: dict[str, Any] = {
        "type": "http",
        "metadata": {
            "path": "/events",
            "listenAddress": f"127.0.0.1:{port}",
            "maxPendingRequests": str(max_pending),
            "retryAfterSeconds": "1",
        },
    }
    meta: dict[str, Any] = {"name": "sink"}
    docs: list[dict[str, Any]] = []
    if namespace is not None:
        meta["namespace"] = namespace
    if auth:
        trigger["authenticationRef"] = {"name": "sink-token"}
        docs += [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "sink-token",
                    **({"namespace": namespace} if namespace else {}),
                },
                "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
            },
            {
                "apiVersion": "jobrunner.dev/v1alpha1",
                "kind": "TriggerAuthentication",
                "metadata": {
                    "name": "sink-token",
                    **({"namespace": namespace} if namespace else {}),
                },
                "spec": {
                    "secretTargetRef": [
                        {"parameter": "token", "name": "sink-token", "key": "token"}
                    ]
                },
            },
        ]
    docs.append(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": meta,
            "spec": {
                "maxReplicaCount": 1,
                "messageDelivery": {"mode": "env"},
                "jobTargetRef": {
                    "backoffLimit": 0,
                    "template": {
                        "metadata": {
                            "annotations": {
                                # On KWOK a Job runs as long as its event says.
                                "kwok.jobrunner.dev/run-duration": (
                                    "{{ message.json.get('seconds', 1) }}s"
                                )
                            }
                        },
                        "spec": {
                            "containers": [
                                {
                                    "name": "work",
                                    "image": "busybox:1.36",
                                    "command": ["sh", "-c", command],
                                }
                            ]
                        },
                    },
                },
                "triggers": [trigger],
            },
        }
    )
    return docs


@dataclass
class Sink:
    """A dispatcher serving the ScaledJob ``sink`` on ``url``, and how to count its Jobs."""

    url: str
    auth: dict[str, str]
    start: Callable[[], Any]
    signal_stop: Callable[[], Callable[[], int]]
    job_names: Callable[[], list[str]]
    logs: Callable[[], str]

    def sender(self) -> KnativeSender:
        return KnativeSender(self.url, auth=self.auth)

    async def serving(self) -> None:
        """Until the listener answers (404 for an event it never saw)."""
        await eventually(self._answers, within=90, interval=0.2)

    async def _answers(self) -> bool:
        try:
            status, _ = await status_of(self.url, "/events/nothing", self.auth)
        except aiohttp.ClientConnectionError:
            return False
        return status == 404

    async def pending(self, location: str) -> None:
        async def waits() -> bool:
            status, body = await status_of(self.url, location, self.auth)
            return status == 202 and body.get("status") == "pending"

        await eventually(waits, within=90, interval=0.1)


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.local),
        pytest.param("kube", marks=pytest.mark.kube),
    ]
)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_sink(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Sink]:
    """``make_sink(command=...)``: a Sink whose Jobs run ``command`` (local executor) or
    run on KWOK for the ``seconds`` their event says (default 1)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/events"

    def make(command: str = "true", max_pending: int = 32) -> Sink:
        path = tmp_path / "sink.yaml"
        if mode == "local":
            local: Dispatchers = request.getfixturevalue("local_dispatchers")
            docs = scaledjob(
                namespace=None, port=port, command=command, max_pending=max_pending, auth=False
            )
            path.write_text(yaml.safe_dump_all(docs))
            procs: list[Any] = []

            def start() -> Any:
                procs.append(local.start(path))
                return procs[-1]

            def stop() -> Callable[[], int]:
                procs[-1].send_signal(signal.SIGTERM)
                return lambda: int(procs[-1].wait(90))

            def names() -> list[str]:
                base = local.state / "jobs" / "default"
                return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

            return Sink(url, {}, start, stop, names, local.logs)
        namespace = request.getfixturevalue("namespace")
        kube_api = request.getfixturevalue("kube_api")
        request.getfixturevalue("jobrunner_crds")
        started: Callable[..., Dispatcher] = request.getfixturevalue("dispatchers")
        docs = scaledjob(
            namespace=namespace, port=port, command=command, max_pending=max_pending, auth=True
        )
        path.write_text(yaml.safe_dump_all(docs))
        ds: list[Dispatcher] = []

        def kstart() -> Any:
            ds.append(started(path))
            return ds[-1]

        def kstop() -> Callable[[], int]:
            assert ds[-1].process is not None
            ds[-1].process.send_signal(signal.SIGTERM)
            return lambda: int(ds[-1].process.wait(90))  # type: ignore[union-attr]

        def knames() -> list[str]:
            return sorted(j.metadata.name for j in jobs_of(kube_api, namespace, "sink"))

        def klogs() -> str:
            return "\n".join(d.logs() for d in ds)

        return Sink(url, {"Authorization": f"Bearer {TOKEN}"}, kstart, kstop, knames, klogs)

    return make


def name_of(event_id: str) -> str:
    return job_name("sink", f"{SOURCE}#{event_id}")


async def test_each_mode_redelivered_is_one_job_and_the_body_stays_as_sent(
    make_sink: Callable[..., Sink],
) -> None:
    """Knative redelivers in the mode it first used: the same event twice in binary
    mode, and twice in structured mode, is one Job each (bytes data is the same body in both
    modes: tests/unit/test_http_binding_sdk.py). JSON data is the body as sent
    (binary: the sender's bytes, which a Job may check a signature over), so the
    same event re-sent in the other mode with its JSON written differently is another
    body under the same id: refused ``409 MessageIdReused``, never a second Job."""
    sink = make_sink()
    sink.start()
    await sink.serving()
    run = uuid.uuid4().hex[:8]
    as_binary = event(f"bin-{run}", {"order": 7})
    as_structured = event(f"str-{run}", {"order": 8})
    for ce, encode in ((as_binary, binary), (as_structured, structured)):
        first = await sink.sender().send(*encode(ce))
        second = await sink.sender().send(*encode(ce))
        assert first.status == 202
        assert second.status == 202
        assert first.headers["Location"] == second.headers["Location"]
    mixed = await sink.sender().send(*structured(as_binary))
    assert mixed.status == 409  # Knative does not retry a 4xx other than 408/429
    assert sorted(sink.job_names()) == sorted(
        name_of(ce["id"]) for ce in (as_binary, as_structured)
    )


async def test_a_retry_after_429_is_accepted_and_makes_one_job(
    make_sink: Callable[..., Sink], tmp_path: Path
) -> None:
    release = tmp_path / "release"
    # One slot (maxReplicaCount 1), one pending request: the blocker's Job takes the
    # slot (locally until the test releases it, on KWOK for 20 s), the second event waits
    # for it, the third is answered 429 until the slot frees.
    sink = make_sink(command=f"while [ ! -e {release} ]; do sleep 0.1; done", max_pending=1)
    sink.start()
    await sink.serving()
    run = uuid.uuid4().hex[:8]
    blocker = await sink.sender().send(*binary(event(f"blocker-{run}", {"seconds": 20})))
    assert blocker.status == 202
    waiting_ce = event(f"waiting-{run}")
    waiting = asyncio.create_task(sink.sender().send(*binary(waiting_ce)))
    await sink.pending(location("/events", f"{SOURCE}#{waiting_ce['id']}"))
    third = sink.sender()
    retried_ce = event(f"retried-{run}")
    sent = asyncio.create_task(third.send(*binary(retried_ce)))
    await eventually(lambda: _true(429 in third.statuses), within=60)
    release.touch()
    answer = await asyncio.wait_for(sent, 120)
    assert (await asyncio.wait_for(waiting, 120)).status == 202
    assert third.statuses[0] == 429, third.statuses
    assert answer.status == 202, third.statuses
    assert sink.job_names().count(name_of(retried_ce["id"])) == 1
    assert sorted(sink.job_names()) == sorted(
        name_of(f"{kind}-{run}") for kind in ("blocker", "waiting", "retried")
    )


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("mode", [pytest.param("local", marks=pytest.mark.local)])
async def test_a_5xx_during_a_restart_then_the_retry_makes_one_job(
    make_sink: Callable[..., Sink], tmp_path: Path
) -> None:
    release = tmp_path / "release"
    sink = make_sink(command=f"while [ ! -e {release} ]; do sleep 0.1; done")
    sink.start()
    await sink.serving()
    run = uuid.uuid4().hex[:8]
    assert (await sink.sender().send(*binary(event(f"blocker-{run}")))).status == 202
    ce = event(f"restart-{run}")
    sender = sink.sender()
    sent = asyncio.create_task(sender.send(*structured(ce)))
    await sink.pending(location("/events", f"{SOURCE}#{ce['id']}"))
    # The dispatcher stops with the event waiting for the slot: it is answered 503 with
    # Retry-After (then the connection is refused while no dispatcher runs); the sender
    # retries until the next dispatcher takes it.
    stopping = sink.signal_stop()
    await eventually(lambda: _true(bool(sender.statuses)), within=60)
    assert sender.statuses[0] == 503, sender.statuses
    assert stopping() is not None
    release.touch()
    sink.start()
    answer = await asyncio.wait_for(sent, 120)
    assert answer.status == 202, sender.statuses
    assert 503 in sender.statuses, sender.statuses
    assert sink.job_names().count(name_of(ce["id"])) == 1
