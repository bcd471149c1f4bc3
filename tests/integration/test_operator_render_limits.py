"""A hostile template stalls nobody else (issue #20, item 4), on the real stack: one
`jobrunner operator` replica serves two ScaledJobs; one's template loops forever on every
message. The other keeps turning its messages into Jobs within its usual latency
(measured first, in the same test), the replica's /healthz answers and its member Lease
is renewed throughout, and the hostile messages are dead-lettered TemplateError naming
the time limit."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import drain_queue, jobs_of, publish, queue_depth
from tests.integration.operator_harness import OperatorProcess, ScaledJobs, scaledjob
from tests.integration.test_operator import crs, job_spec, operators, queues

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]
__all__ = ["crs", "operators", "queues"]  # fixtures shared with test_operator

FOREVER = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)
HOSTILE_MESSAGES = 8
"""At the default 2 s per render, about 16 s of hostile rendering: longer than the good
ScaledJob's measurement below."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def member_renewed(kube_api: client.ApiClient, namespace: str, identity: str) -> dt.datetime | None:
    leases = client.CoordinationV1Api(kube_api).list_namespaced_lease(
        namespace, label_selector="jobrunner.dev/lease-role=member"
    )
    for lease in leases.items:
        if lease.spec.holder_identity == identity:
            renewed: dt.datetime | None = lease.spec.renew_time
            return renewed
    return None


class Watchdog:
    """Samples /healthz and the member Lease's age every half second while it runs."""

    def __init__(self, kube_api: client.ApiClient, namespace: str, op: OperatorProcess, port: int):
        self.kube_api, self.namespace, self.op, self.port = kube_api, namespace, op, port
        self.statuses: list[int] = []
        self.lease_ages: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.statuses.append(await asyncio.to_thread(healthz, self.port))
            renewed = await asyncio.to_thread(
                member_renewed, self.kube_api, self.namespace, self.op.identity
            )
            if renewed is not None:
                self.lease_ages.append((dt.datetime.now(dt.UTC) - renewed).total_seconds())
            await asyncio.sleep(0.5)

    def __enter__(self) -> Watchdog:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def latencies(
    kube_api: client.ApiClient, namespace: str, url: str, queue: str, ids: list[str]
) -> list[float]:
    """Publish -> its Job listed, one message at a time."""
    out = []
    for mid in ids:
        start = time.monotonic()
        await publish(url, queue, json.dumps({"task": mid}).encode(), message_id=mid)

        async def created(mid: str = mid) -> bool:
            jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "good")
            return any(j.metadata.annotations.get("jobrunner.dev/message-id") == mid for j in jobs)

        await eventually(created, within=60, interval=0.05)
        out.append(time.monotonic() - start)
    return out


async def test_a_template_that_loops_forever_stalls_no_other_scaledjob_nor_the_replica(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    good_queue, bad_queue = await queues(2)
    port = free_port()
    op = operators(
        env={
            "JOBRUNNER_TELEMETRY__HTTP_PORT": str(port),
            # The hostile ScaledJob waits after each render that ran to the limit (up to
            # 60 s by default, doubling): capped at 2 s here so its 8 messages are all
            # dead-lettered within the test (the pause itself is a unit test's).
            "JOBRUNNER_DISPATCHER__RENDER_COOLDOWN_MAX_SECONDS": "2",
        }
    )
    for name, queue, spec in (
        ("good", good_queue, job_spec()),
        ("bad", bad_queue, job_spec(args=FOREVER)),
    ):
        await crs.apply(
            scaledjob(name, namespace=namespace, queue=queue, url=rabbitmq_url, job_spec=spec)
        )
    for name in ("good", "bad"):
        await crs.wait_condition(name, "Ready", "True", reason="DispatcherReady")

    with Watchdog(kube_api, namespace, op, port) as watchdog:
        # The usual latency, on this machine now: nothing hostile yet.
        await latencies(kube_api, namespace, rabbitmq_url, good_queue, ["warm"])
        baseline = await latencies(
            kube_api, namespace, rabbitmq_url, good_queue, [f"before-{i}" for i in range(5)]
        )
        for i in range(HOSTILE_MESSAGES):
            await publish(rabbitmq_url, bad_queue, b'{"task": "x"}', message_id=f"bad-{i}")
        await asyncio.sleep(1.0)  # the first hostile render is under way
        during = await latencies(
            kube_api, namespace, rabbitmq_url, good_queue, [f"during-{i}" for i in range(5)]
        )
        dead_so_far = (await queue_depth(rabbitmq_url, f"{bad_queue}.dead-letter"))[0]

        async def all_dead() -> bool:
            return (await queue_depth(rabbitmq_url, f"{bad_queue}.dead-letter"))[0] >= (
                HOSTILE_MESSAGES
            )

        await eventually(all_dead, within=HOSTILE_MESSAGES * 2 * 5 + 30, interval=0.5)

    print(
        f"publish -> Job: before {[round(x, 2) for x in baseline]} s, during "
        f"{[round(x, 2) for x in during]} s; lease age max {max(watchdog.lease_ages):.2f} s; "
        f"{len(watchdog.statuses)} /healthz samples {sorted(set(watchdog.statuses))}"
    )
    assert dead_so_far < HOSTILE_MESSAGES, "the good messages were measured during the attack"
    usual = statistics.median(baseline)
    assert statistics.median(during) <= 3 * usual + 1.0, (baseline, during)
    assert max(during) <= 5 * max(baseline) + 3.0, (baseline, during)
    assert len(watchdog.statuses) > 10
    assert set(watchdog.statuses) == {200}, watchdog.statuses
    assert len(watchdog.lease_ages) > 10
    assert max(watchdog.lease_ages) < 4.0, watchdog.lease_ages

    letters = await drain_queue(rabbitmq_url, f"{bad_queue}.dead-letter")
    assert len(letters) == HOSTILE_MESSAGES
    for letter in letters:
        headers = letter.headers
        assert headers["x-jobrunner-reason"] == "TemplateError"
        detail = str(headers["x-jobrunner-detail"])
        assert "JOBRUNNER_DISPATCHER__RENDER_TIMEOUT_SECONDS" in detail
        assert "longer than 2 s" in detail
    assert not await asyncio.to_thread(jobs_of, kube_api, namespace, "bad")
