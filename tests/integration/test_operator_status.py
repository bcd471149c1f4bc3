"""What a ScaledJob's status and Events say in operator mode, and what the operator does
on its own when the world changes under a running dispatcher: issue #21 §7 (a Secret
corrected, repeated refusals of the API server, status that must not lie, Warning
Events, Leases left behind). On the real stack, one behaviour per test."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import jobs_of, publish
from tests.integration.operator_harness import OperatorProcess, ScaledJobs, active, scaledjob
from tests.integration.test_observability import free_port, get
from tests.integration.test_operator import crs, job_spec, operators, queues, send
from tests.integration.test_operator_rbac import Release, release, service_account_kubeconfig

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]
__all__ = ["crs", "operators", "queues", "release"]  # fixtures shared with other tests


def with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def put_secret(
    kube_api: client.ApiClient, namespace: str, name: str, values: dict[str, str]
) -> None:
    core = client.CoreV1Api(kube_api)
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        data={k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    )
    try:
        core.create_namespaced_secret(namespace, body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_secret(name, namespace, body)


def create_authentication(kube_api: client.ApiClient, namespace: str, secret: str) -> None:
    client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "jobrunner.dev",
        "v1alpha1",
        namespace,
        "triggerauthentications",
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "rabbit", "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "host", "name": secret, "key": "host"}]},
        },
    )


async def test_a_corrected_secret_is_picked_up_without_touching_the_trigger_authentication(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """A wrong password in the Secret, then fixed: consuming again within the bound the
    README states (a dispatcher that cannot connect re-reads its Secrets every 5 s; its
    reconnect backoff is then reset by the rebuild), with no change to the
    TriggerAuthentication or the ScaledJob."""
    (queue,) = await queues()
    put_secret(kube_api, namespace, "rabbit", {"host": with_password(rabbitmq_url, "wrong-pw")})
    create_authentication(kube_api, namespace, "rabbit")
    operators()
    body = scaledjob("work", namespace=namespace, queue=queue, url="", job_spec=job_spec())
    body["spec"]["triggers"][0]["metadata"].pop("host")
    body["spec"]["triggers"][0]["authenticationRef"] = {"name": "rabbit"}
    await crs.apply(body)
    refused = await crs.wait_condition("work", "Ready", "False", reason="SourceUnavailable")
    assert "refused the credentials" in refused["message"]
    assert "wrong-pw" not in json.dumps(await crs.status("work"))

    put_secret(kube_api, namespace, "rabbit", {"host": rabbitmq_url})
    fixed = time.monotonic()
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady", within=60)
    took = time.monotonic() - fixed
    print(f"corrected Secret in use after {took:.1f}s")
    # 5 s between reads of a failing dispatcher's Secrets, the rebuild, the connection
    # and a status write (1 s loop): 20 s is a generous bound on a busy machine.
    assert took < 20, f"the corrected Secret took {took:.1f}s to be used"
    await publish(rabbitmq_url, queue, json.dumps({"task": "a"}).encode(), message_id="a")

    async def one_job() -> bool:
        return len(jobs_of(kube_api, namespace, "work")) == 1

    await eventually(one_job, within=60)


async def test_jobs_only_the_api_server_refuses_make_the_scaledjob_not_ready_with_its_reason(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """A container named ``Report_1`` passes the batch/v1 schema and is refused by the
    API server (422): every message is dead-lettered. The ScaledJob must say so —
    Ready=False JobsRejected naming the field and the reason in jobrunner's words, not
    the server's text, kept in lastError — and the Warning Events go on the ScaledJob,
    a few for many refusals."""
    (queue,) = await queues()
    operators()
    spec = job_spec()
    spec["template"]["spec"]["containers"][0]["name"] = "Report_1"
    await crs.apply(
        scaledjob("work", namespace=namespace, queue=queue, url=rabbitmq_url, job_spec=spec)
    )
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    for i in range(8):
        body = json.dumps({"task": f"t{i}"}).encode()
        await publish(rabbitmq_url, queue, body, message_id=f"m{i}")
    ready = await crs.wait_condition("work", "Ready", "False", reason="JobsRejected", within=60)
    assert "422 Invalid" in ready["message"], ready
    assert "spec.template.spec.containers[0].name (FieldValueInvalid)" in ready["message"]
    status = await crs.status("work")
    assert status["lastError"]["message"] == ready["message"]
    # Nothing of the API server's own text (it quotes the value and the rule).
    assert "RFC 1123" not in json.dumps(status)
    assert "Report_1" not in json.dumps(status)

    async def told() -> list[str] | None:
        items = (
            client.CoreV1Api(kube_api)
            .list_namespaced_event(
                namespace, field_selector="involvedObject.kind=ScaledJob,involvedObject.name=work"
            )
            .items
        )
        found = [e.message for e in items if e.reason == "JobsRejected"]
        return found or None

    messages = await eventually(told, within=30)
    assert len(messages) <= 2, messages  # aggregated: not one per refusal
    assert all("RFC 1123" not in m for m in messages)


def running(kube_api: client.ApiClient, namespace: str, name: str) -> int:
    return sum(1 for j in jobs_of(kube_api, namespace, name) if active(j))


async def test_paused_with_jobs_running_shows_them_active(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """Pausing stops consuming, not the running Jobs: ACTIVE and ``Active`` go on
    counting them (from the Job watch, as no dispatcher runs)."""
    (queue,) = await queues()
    operators()
    body = scaledjob(
        "work",
        namespace=namespace,
        queue=queue,
        url=rabbitmq_url,
        job_spec=job_spec(),
        maxReplicaCount=5,
    )
    await crs.apply(body)
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    await send(rabbitmq_url, queue, *[f"long-{i}" for i in range(5)], seconds=300)

    async def five() -> bool:
        return running(kube_api, namespace, "work") == 5

    await eventually(five, within=60)
    body["metadata"]["annotations"] = {"jobrunner.dev/paused": "true"}
    await crs.apply(body)
    await crs.wait_condition("work", "Paused", "True", reason="ScaledJobPaused")
    await crs.wait_condition("work", "Active", "True", reason="JobsActive", within=30)
    await crs.wait_status("work", "activeJobs", 5, within=30)
    assert running(kube_api, namespace, "work") == 5


async def test_a_routine_start_or_restart_is_no_last_error(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """lastError is the latest problem, kept after recovery: a ScaledJob that never
    erred has none after a start and after the operator's restart, and a real one
    survives the restart."""
    (queue,) = await queues()
    first = operators("op-a")
    await crs.apply(scaledjob("work", namespace=namespace, queue=queue, url=rabbitmq_url))
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    assert "lastError" not in await crs.status("work")
    first.terminate()
    operators("op-b")
    await crs.wait_status("work", "owner", "op-b", within=60)
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    assert "lastError" not in await crs.status("work")


async def test_a_clean_stop_leaves_no_ready_and_no_owner_behind(
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """After the last replica stops (``helm uninstall``), nothing serves the ScaledJob:
    it must not go on saying Ready=True DispatcherReady with the old owner."""
    (queue,) = await queues()
    op = operators("op-a")
    await crs.apply(scaledjob("work", namespace=namespace, queue=queue, url=rabbitmq_url))
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    assert op.terminate() == 0
    status = await crs.status("work")
    ready = await crs.condition("work", "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "NoOperator"), status
    assert "op-a" in ready["message"]
    assert "owner" not in status


async def test_a_scaledjob_no_replica_watches_says_so(
    kube_api: client.ApiClient, namespace: str, crs: ScaledJobs
) -> None:
    """No replica watches this namespace (or none runs): the API server's default
    condition says so, in the READY column and in the reason."""
    await crs.apply(scaledjob("lonely", namespace=namespace, queue="q", url="amqp://x/"))
    ready = await crs.condition("lonely", "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "NoOperator")
    assert "watches its namespace" in ready["message"]


SLOW_LEASES = {
    "JOBRUNNER_OPERATOR__LEASE_DURATION_SECONDS": "20",
    "JOBRUNNER_OPERATOR__RENEW_SECONDS": "1",
    "JOBRUNNER_OPERATOR__RENEW_DEADLINE_SECONDS": "6",
}
"""A window between the renew deadline (6 s) and the takeover (20 s) wide enough to see
on a busy machine."""


async def test_a_killed_owner_is_not_shown_ready_until_the_takeover(
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """SIGKILL the replica serving a ScaledJob: once it has missed its renew deadline
    (when it would have stopped serving anyway), the survivor shows Ready=Unknown
    OwnerGone naming it; at the takeover, Ready=True with the survivor as owner."""
    (queue,) = await queues()
    replicas = {name: operators(name, env=SLOW_LEASES) for name in ("op-a", "op-b")}
    for replica in replicas.values():
        await replica.started_serving()
    await crs.apply(scaledjob("work", namespace=namespace, queue=queue, url=rabbitmq_url))
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")

    async def settled_owner() -> str | None:
        # Both replicas joined and took their share: the owner no longer moves.
        first = (await crs.status("work")).get("owner")
        await asyncio.sleep(3)
        again = await crs.status("work")
        ready = await crs.condition("work", "Ready")
        if first and first == again.get("owner") and ready.get("status") == "True":
            return str(first)
        return None

    owner = await eventually(settled_owner, within=60)
    survivor = next(n for n in replicas if n != owner)
    replicas[owner].kill()
    killed = time.monotonic()
    gone = await crs.wait_condition("work", "Ready", "Unknown", reason="OwnerGone", within=20)
    assert owner in gone["message"]
    shown = time.monotonic() - killed
    assert shown < 20, "shown before the takeover"
    print(f"OwnerGone shown {shown:.1f}s after the SIGKILL (renew deadline 6 s, lease 20 s)")
    await crs.wait_status("work", "owner", survivor, within=60)
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")


async def test_a_missing_queue_gives_one_warning_event_and_no_depth(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """The broker side failing (here: the queue does not exist) is a Warning Event on
    the ScaledJob in jobrunner's words (as KEDA's KEDAScalerFailed), once for a while of
    retries, and the depth gauge has no value for it — not 0, which reads as an empty
    queue. Once the queue exists: consuming, and its depth is 0."""
    queue = f"q-missing-{uuid.uuid4().hex[:8]}"
    port = free_port()
    operators(
        env={
            "JOBRUNNER_TELEMETRY__HTTP_PORT": str(port),
            "JOBRUNNER_TELEMETRY__QUEUE_DEPTH_INTERVAL_SECONDS": "1",
        }
    )
    await crs.apply(scaledjob("work", namespace=namespace, queue=queue, url=rabbitmq_url))
    await crs.wait_condition("work", "Ready", "False", reason="SourceUnavailable")

    def warnings() -> list[Any]:
        items = (
            client.CoreV1Api(kube_api)
            .list_namespaced_event(
                namespace, field_selector="involvedObject.kind=ScaledJob,involvedObject.name=work"
            )
            .items
        )
        return [e for e in items if e.reason == "SourceFailed"]

    async def told() -> list[Any] | None:
        return warnings() or None

    (event,) = await eventually(told, within=30)
    assert event.type == "Warning"
    assert queue in event.message
    assert "does not exist" in event.message
    await asyncio.sleep(8)  # several reconnects (0.5 s doubling) and status passes
    assert len(warnings()) == 1, "bounded: not one per retry"
    text = (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics"))[1]
    depth = [
        line
        for line in text.splitlines()
        if line.startswith("jobrunner_queue_depth_messages{") and queue in line
    ]
    assert depth == [], depth

    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
    try:
        await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady", within=90)

        async def sampled() -> list[str] | None:
            text = (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics"))[1]
            found = [
                line
                for line in text.splitlines()
                if line.startswith("jobrunner_queue_depth_messages{") and queue in line
            ]
            return found or None

        (line,) = await eventually(sampled, within=30)
        assert line.endswith(" 0.0"), line
    finally:
        async with await aio_pika.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)


def leases_in(kube_api: client.ApiClient, namespace: str) -> list[Any]:
    return list(client.CoordinationV1Api(kube_api).list_namespaced_lease(namespace).items)


async def test_a_clean_stop_leaves_no_lease_behind(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """SIGTERM of the last replica: its member Lease and the 16 bucket Leases it held
    are deleted, and its log says so."""
    (queue,) = await queues()
    op = operators("op-a")
    await crs.apply(scaledjob("work", namespace=namespace, queue=queue, url=rabbitmq_url))
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    assert len(leases_in(kube_api, namespace)) == 17
    assert op.terminate() == 0
    assert [lease.metadata.name for lease in leases_in(kube_api, namespace)] == []
    assert "member Lease and 16 bucket Lease(s) removed" in op.logs()


async def test_survivors_remove_the_member_lease_of_a_killed_replica(
    kube_api: client.ApiClient, namespace: str, operators: Callable[..., OperatorProcess]
) -> None:
    """Identities carry a random suffix, so each crash would leave a member Lease for
    good: a survivor deletes one not renewed for 4 lease durations (24 s here)."""
    survivor, doomed = operators("op-a"), operators("op-b")
    for replica in (survivor, doomed):
        await replica.started_serving()

    def members() -> list[str]:
        return sorted(
            lease.spec.holder_identity
            for lease in leases_in(kube_api, namespace)
            if (lease.metadata.labels or {}).get("jobrunner.dev/lease-role") == "member"
        )

    async def both() -> bool:
        return members() == ["op-a", "op-b"]

    await eventually(both, within=30)
    doomed.kill()
    killed = time.monotonic()

    async def cleaned() -> bool:
        return members() == ["op-a"]

    await eventually(cleaned, within=90)
    took = time.monotonic() - killed
    assert took >= 24 - 1, f"removed after {took:.0f}s: before it was stale"
    assert "removed the member Lease of op-b" in survivor.logs()


async def test_a_403_on_its_own_leases_is_said_as_that_and_not_as_a_clean_exit(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    release: Release,
    operators: Callable[..., OperatorProcess],
) -> None:
    """The chart's ServiceAccount has Lease rights in the release namespace only: run
    with another lease namespace, every renewal is refused 403, and the exit cannot
    remove its Leases either. The log says what it is, and never 'left lease group'."""
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    op = operators("chart-sa", config=config, lease_namespace=namespace)

    async def denied() -> bool:
        return "403 Forbidden" in op.logs()

    await eventually(denied, within=60)
    op.terminate()
    logs = op.logs()
    assert f"forbids this replica its Leases in namespace {namespace} (403)" in logs
    assert "could not all be removed" in logs, logs[-3000:]
    assert "left lease group" not in logs
