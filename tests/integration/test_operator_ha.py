"""High availability with every replica working: several `jobrunner operator` processes
share the ScaledJobs through Leases on the real API server. Lease timings are the tests'
(FAST_LEASES: a silent replica is gone after 6 s)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import drain_queue, jobs_of, publish, queue_depth
from tests.integration.operator_harness import (
    FAST_LEASES,
    OperatorProcess,
    ScaledJobs,
    active,
    scaledjob,
)
from tests.integration.test_operator import crs, guarded, job_spec, operators, queues

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]
__all__ = ["crs", "operators", "queues"]  # fixtures shared with test_operator

LEASE_SECONDS = float(FAST_LEASES["JOBRUNNER_OPERATOR__LEASE_DURATION_SECONDS"])
BUCKETS = 16


def holders(kube_api: client.ApiClient, namespace: str) -> dict[str, str]:
    leases = client.CoordinationV1Api(kube_api).list_namespaced_lease(
        namespace, label_selector="jobrunner.dev/lease-role=bucket"
    )
    return {lease.metadata.name: lease.spec.holder_identity or "" for lease in leases.items}


async def balanced(kube_api: client.ApiClient, namespace: str, names: list[str]) -> None:
    """Every bucket held, by a live replica, none over its fair share: the split has
    settled."""

    async def check() -> bool:
        held = await asyncio.to_thread(holders, kube_api, namespace)
        counts = Counter(held.values())
        return (
            len(held) == BUCKETS
            and set(counts) == set(names)
            and max(counts.values()) <= math.ceil(BUCKETS / len(names))
        )

    await eventually(check, within=90, interval=0.5)


async def all_settled(
    kube_api: client.ApiClient, namespace: str, url: str, queue: str, name: str, count: int
) -> list[Any]:
    """Every one of ``count`` messages became exactly one Job, succeeded, and was acked."""

    async def check() -> list[Any] | None:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, name)
        if len(jobs) < count or any(active(j) or guarded(j) for j in jobs):
            return None
        if (await queue_depth(url, queue))[0] != 0:
            return None
        return jobs

    jobs: list[Any] = await eventually(check, within=150, interval=0.5)
    ids = Counter(j.metadata.annotations["jobrunner.dev/message-id"] for j in jobs)
    assert len(ids) == count
    assert all(n == 1 for n in ids.values()), "one Job per message"
    assert await drain_queue(url, f"{queue}.dead-letter", wait=1) == []
    return jobs


@pytest.mark.parametrize("replicas", [2, 3])
async def test_replicas_serve_each_scaledjob_once_and_max_replica_count_holds_cluster_wide(
    replicas: int,
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    names = [f"sj{i}" for i in range(6)]
    queue_names = await queues(len(names))
    procs = [operators(f"r{i}") for i in range(replicas)]
    await balanced(kube_api, namespace, [p.identity for p in procs])
    for name, queue in zip(names, queue_names, strict=True):
        await crs.apply(
            scaledjob(
                name,
                namespace=namespace,
                queue=queue,
                url=rabbitmq_url,
                job_spec=job_spec(),
                maxReplicaCount=2,
            )
        )
    for name in names:
        await crs.wait_condition(name, "Ready", "True")
    for queue in queue_names:
        for i in range(6):
            await publish(
                rabbitmq_url,
                queue,
                json.dumps({"task": f"m{i}", "seconds": 2}).encode(),
                message_id=f"m{i}",
            )
    peak: Counter[str] = Counter()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = await asyncio.to_thread(client.BatchV1Api(kube_api).list_namespaced_job, namespace)
        running = Counter(
            j.metadata.labels["jobrunner.dev/scaledjob"] for j in jobs.items if active(j)
        )
        for name, count in running.items():
            peak[name] = max(peak[name], count)
        assert all(count <= 2 for count in running.values()), running
        if len(jobs.items) == 36 and not running:
            break
        await asyncio.sleep(0.25)
    assert set(peak) == set(names)
    for name, queue in zip(names, queue_names, strict=True):
        await all_settled(kube_api, namespace, rabbitmq_url, queue, name, 6)
        servers = [p.identity for p in procs if p.dispatching(name)]
        assert len(servers) == 1, (name, servers)
        assert sum(p.dispatching(name) for p in procs) == 1
        assert (await crs.status(name))["owner"] == servers[0]
    workers = {p.identity for p in procs if any(p.dispatching(n) for n in names)}
    held = Counter((await asyncio.to_thread(holders, kube_api, namespace)).values())
    assert set(held) == {p.identity for p in procs}, "every replica holds buckets"
    assert workers, "ScaledJobs served"


async def _busy_owner(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queue: str,
    crs: ScaledJobs,
    procs: list[OperatorProcess],
    count: int,
) -> tuple[OperatorProcess, OperatorProcess]:
    await balanced(kube_api, namespace, [p.identity for p in procs])
    await crs.apply(
        scaledjob(
            "busy",
            namespace=namespace,
            queue=queue,
            url=rabbitmq_url,
            job_spec=job_spec(),
            maxReplicaCount=3,
        )
    )
    await crs.wait_condition("busy", "Ready", "True")
    owner_name = (await crs.status("busy"))["owner"]
    owner = next(p for p in procs if p.identity == owner_name)
    other = next(p for p in procs if p is not owner)
    for i in range(count):
        await publish(
            rabbitmq_url,
            queue,
            json.dumps({"task": f"m{i}", "seconds": 2}).encode(),
            message_id=f"m{i}",
        )

    async def busy() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "busy")
        return len(jobs) >= 4

    await eventually(busy, within=60, interval=0.2)
    return owner, other


async def _takeover(other: OperatorProcess, since: float, within: float) -> float:
    async def serving() -> bool:
        return other.dispatching("busy") > 0

    await eventually(serving, within=within, interval=0.05)
    return time.monotonic() - since


async def test_sigkill_of_the_owner_of_a_busy_scaledjob_hands_it_over_within_the_lease_time(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    procs = [operators("a"), operators("b")]
    owner, other = await _busy_owner(kube_api, namespace, rabbitmq_url, queue, crs, procs, 15)
    killed = time.monotonic()
    owner.kill()
    took = await _takeover(other, killed, within=LEASE_SECONDS + 20)
    print(f"takeover after SIGKILL: {took:.1f}s (lease {LEASE_SECONDS:.0f}s)")
    assert took >= LEASE_SECONDS - 1, "not before the dead replica's lease could expire"
    assert took <= LEASE_SECONDS + 6
    await all_settled(kube_api, namespace, rabbitmq_url, queue, "busy", 15)
    await crs.wait_status("busy", "owner", other.identity)


async def test_sigterm_of_the_owner_hands_its_scaledjobs_over_within_seconds(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    procs = [operators("a"), operators("b")]
    owner, other = await _busy_owner(kube_api, namespace, rabbitmq_url, queue, crs, procs, 15)
    asked = time.monotonic()
    owner.process.send_signal(15)  # type: ignore[union-attr]
    took = await _takeover(other, asked, within=LEASE_SECONDS)
    print(f"takeover after SIGTERM: {took:.1f}s")
    assert took < 3.0
    assert owner.process.wait(30) == 0  # type: ignore[union-attr]
    assert "left lease group" in owner.logs()
    await all_settled(kube_api, namespace, rabbitmq_url, queue, "busy", 15)
