"""`jobrunner operator` on the real stack: ScaledJob resources applied with the API, Jobs
on the cluster, messages through RabbitMQ. One behaviour per test."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import (
    drain_queue,
    finished,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
)
from tests.integration.operator_harness import (
    OperatorProcess,
    ScaledJobs,
    events_of,
    scaledjob,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]


@pytest.fixture
def operators(
    kubeconfig: Path, tmp_path: Path, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(
        identity: str | None = None,
        *,
        namespaces: list[str] | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        config: Path | None = None,
        lease_namespace: str | None = None,
    ) -> OperatorProcess:
        name = identity or f"op-{len(started)}"
        process = OperatorProcess(
            config or kubeconfig,
            tmp_path / f"{name}.log",
            namespaces=namespaces or [namespace],
            lease_namespace=lease_namespace or namespace,
            identity=name,
            env=env,
            args=args,
        ).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for process in started:
            print(f"----- {process.log.name} -----\n{process.logs()[-20000:]}")


@pytest.fixture
async def queues(rabbitmq_url: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[str] = []

    async def make(count: int = 1) -> list[str]:
        names = [f"q-{uuid.uuid4().hex[:10]}" for _ in range(count)]
        async with await aio_pika.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            for name in names:
                await channel.declare_queue(name, durable=True)
        made.extend(names)
        return names

    yield make
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        for name in made:
            await channel.queue_delete(name)
            await channel.queue_delete(f"{name}.dead-letter")


@pytest.fixture
def crs(kube_api: client.ApiClient, namespace: str) -> ScaledJobs:
    return ScaledJobs(kube_api, namespace)


def job_spec(
    args: str = "v1 {{ message.json.task }}", seconds: str = "{{ message.json.get('seconds', 0) }}"
) -> dict[str, Any]:
    return {
        "backoffLimit": 0,
        "template": {
            "metadata": {"annotations": {"kwok.jobrunner.dev/run-duration": f"{seconds}s"}},
            "spec": {"containers": [{"name": "work", "image": "busybox:1.36", "args": [args]}]},
        },
    }


async def send(url: str, queue: str, *tasks: str, seconds: int = 0) -> None:
    for task in tasks:
        await publish(
            url, queue, json.dumps({"task": task, "seconds": seconds}).encode(), message_id=task
        )


def guarded(job: Any) -> bool:
    return "jobrunner.dev/settlement" in (job.metadata.finalizers or [])


async def test_applied_scaledjob_runs_one_job_per_message_and_reports_ready(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    operators()
    await crs.apply(
        scaledjob(
            "work",
            namespace=namespace,
            queue=queue,
            url=rabbitmq_url,
            job_spec=job_spec(),
            maxReplicaCount=4,
        )
    )
    ready = await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    assert queue in ready["message"]
    await send(rabbitmq_url, queue, "a", "b", "c")
    jobs = await wait_for_jobs(kube_api, namespace, "work", 3, state="Complete")
    assert sorted(j.metadata.annotations["jobrunner.dev/message-id"] for j in jobs) == [
        "a",
        "b",
        "c",
    ]

    async def settled() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return (
            not any(guarded(j) for j in jobs) and (await queue_depth(rabbitmq_url, queue))[0] == 0
        )

    await eventually(settled, within=60, interval=0.3)
    status = await crs.status("work")
    assert status["observedGeneration"] == 1
    assert status["triggersTypes"] == "rabbitmq"
    assert status["owner"] == "op-0"
    assert "lastMessageTime" in status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Paused"]["status"] == "False"
    assert set(conditions["Ready"]) == {
        "type",
        "status",
        "observedGeneration",
        "lastTransitionTime",
        "reason",
        "message",
    }
    assert "Started" in await asyncio.to_thread(events_of, kube_api, namespace, "work")


async def test_printer_columns_show_max_active_ready_paused_triggers_age(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    operators()
    await crs.apply(
        scaledjob(
            "work",
            namespace=namespace,
            queue=queue,
            url=rabbitmq_url,
            job_spec=job_spec(),
            maxReplicaCount=7,
        )
    )
    await send(rabbitmq_url, queue, "long", seconds=30)
    await wait_for_jobs(kube_api, namespace, "work", 1)
    await crs.wait_status("work", "activeJobs", 1)

    def table() -> dict[str, Any]:
        # What `kubectl get scaledjobs.jobrunner.dev` prints: the server-side Table.
        method, url, headers, body, _ = kube_api.param_serialize(
            "GET",
            f"/apis/jobrunner.dev/v1alpha1/namespaces/{namespace}/scaledjobs",
            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
            auth_settings=["BearerToken"],
        )
        response = kube_api.call_api(method, url, headers, body)
        response.read()
        return dict(json.loads(response.data))

    found = await asyncio.to_thread(table)
    columns = [c["name"] for c in found["columnDefinitions"]]
    assert columns[:8] == ["Name", "Max", "Active", "Ready", "Paused", "Triggers", "Age", "Reason"]
    cells = dict(zip(columns, found["rows"][0]["cells"], strict=True))
    assert cells["Max"] == 7
    assert cells["Active"] == 1
    assert cells["Ready"] == "True"
    assert cells["Paused"] == "False"
    assert cells["Triggers"] == "rabbitmq"


async def test_spec_change_while_five_jobs_run_leaves_them_untouched_and_new_messages_use_it(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    op = operators()
    body = scaledjob(
        "work",
        namespace=namespace,
        queue=queue,
        url=rabbitmq_url,
        job_spec=job_spec(),
        maxReplicaCount=10,
    )
    await crs.apply(body)
    await send(rabbitmq_url, queue, *[f"t{i}" for i in range(5)], seconds=15)
    running = await wait_for_jobs(kube_api, namespace, "work", 5)
    before = {
        j.metadata.name: (j.metadata.uid, j.spec.template.spec.containers[0].args) for j in running
    }
    # A new template: the dispatcher is replaced; the five Jobs must run on as they are.
    body["spec"]["jobTargetRef"] = job_spec(args="v2 {{ message.json.task }}")
    await crs.apply(body)
    await crs.wait_status("work", "observedGeneration", 2)
    assert "Replacing" in await asyncio.to_thread(events_of, kube_api, namespace, "work")
    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
    assert {
        j.metadata.name: (j.metadata.uid, j.spec.template.spec.containers[0].args) for j in jobs
    } == before
    assert not any(j.metadata.deletion_timestamp for j in jobs)
    done = await wait_for_jobs(kube_api, namespace, "work", 5, state="Complete", within=90)
    assert {j.metadata.name for j in done} == set(before), "the same five Jobs finished"

    async def acked() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return not any(guarded(j) for j in jobs) and await queue_depth(rabbitmq_url, queue) == (
            0,
            1,
        )

    await eventually(acked, within=60, interval=0.3)
    assert op.logs().count("adopted its existing Job") == 5, "redelivered to the new dispatcher"
    await send(rabbitmq_url, queue, "after")
    jobs = await wait_for_jobs(kube_api, namespace, "work", 6)
    (new,) = [j for j in jobs if j.metadata.name not in before]
    assert new.spec.template.spec.containers[0].args == ["v2 after"]


async def test_limits_change_live_without_replacing_the_dispatcher(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    op = operators()
    body = scaledjob(
        "work",
        namespace=namespace,
        queue=queue,
        url=rabbitmq_url,
        job_spec=job_spec(),
        maxReplicaCount=6,
    )
    await crs.apply(body)
    await crs.wait_condition("work", "Ready", "True")
    body["spec"]["maxReplicaCount"] = 2
    await crs.apply(body)
    await crs.wait_status("work", "observedGeneration", 2)
    await send(rabbitmq_url, queue, "a", "b", "c", "d", seconds=8)
    await wait_for_jobs(kube_api, namespace, "work", 2)
    await asyncio.sleep(2)
    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
    assert len([j for j in jobs if not finished(j)]) <= 2
    assert op.dispatching("work") == 1, "the same dispatcher, resized"
    assert "Updated" in await asyncio.to_thread(events_of, kube_api, namespace, "work")


async def test_deleting_the_scaledjob_leaves_running_jobs_and_their_messages_for_the_next_owner(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    op = operators()
    body = scaledjob(
        "work", namespace=namespace, queue=queue, url=rabbitmq_url, job_spec=job_spec()
    )
    await crs.apply(body)
    await send(rabbitmq_url, queue, "a", "b", "c", seconds=8)
    running = await wait_for_jobs(kube_api, namespace, "work", 3)
    assert not any(j.metadata.owner_references for j in running), "no cascade: no owner"
    await crs.delete("work")
    await eventually(lambda: _true("Stopped: dispatcher stopped" in op.logs()), within=30)
    # The Jobs run to their end; their messages went back to the queue (nobody consumes
    # it now) and each Job stays guarded by its finalizer until a dispatcher settles it.
    done = await wait_for_jobs(kube_api, namespace, "work", 3, state="Complete", within=60)
    assert {j.metadata.uid for j in done} == {j.metadata.uid for j in running}
    assert await queue_depth(rabbitmq_url, queue) == (3, 0)
    assert all(guarded(j) for j in done)
    # The next owner — the ScaledJob applied again — adopts the finished Jobs and settles
    # the messages: no second Job for any of them.
    await crs.apply(body)

    async def settled() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return not any(guarded(j) for j in jobs) and await queue_depth(rabbitmq_url, queue) == (
            0,
            1,
        )

    await eventually(settled, within=60, interval=0.3)
    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
    assert {j.metadata.uid for j in jobs} == {j.metadata.uid for j in running}
    assert await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=1) == []


async def test_keda_pause_annotation_pauses_and_unpausing_resumes(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    operators()
    body = scaledjob(
        "work", namespace=namespace, queue=queue, url=rabbitmq_url, job_spec=job_spec()
    )
    await crs.apply(body)
    await crs.wait_condition("work", "Ready", "True")
    body["metadata"]["annotations"] = {"autoscaling.keda.sh/paused": "true"}
    await crs.apply(body)
    paused = await crs.wait_condition("work", "Paused", "True", reason="ScaledJobPaused")
    assert "autoscaling.keda.sh/paused" in paused["message"]
    await send(rabbitmq_url, queue, "while-paused")
    await asyncio.sleep(3)
    assert await asyncio.to_thread(jobs_of, kube_api, namespace, "work") == []
    assert await queue_depth(rabbitmq_url, queue) == (1, 0), "not consumed while paused"
    body["metadata"]["annotations"] = {"autoscaling.keda.sh/paused": "false"}
    await crs.apply(body)
    await crs.wait_condition("work", "Paused", "False", reason="ScaledJobUnpaused")
    await wait_for_jobs(kube_api, namespace, "work", 1)
    reasons = await asyncio.to_thread(events_of, kube_api, namespace, "work")
    assert reasons.count("Paused") == 1
    assert reasons.count("Started") == 2


async def test_jobrunner_pause_annotation_pauses_too(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    operators()
    await crs.apply(
        scaledjob(
            "work",
            namespace=namespace,
            queue=queue,
            url=rabbitmq_url,
            job_spec=job_spec(),
            annotations={"jobrunner.dev/paused": "true"},
        )
    )
    await crs.wait_condition("work", "Paused", "True")
    await send(rabbitmq_url, queue, "x")
    await asyncio.sleep(3)
    assert await asyncio.to_thread(jobs_of, kube_api, namespace, "work") == []


async def test_invalid_spec_reports_ready_false_naming_the_field_and_others_run(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    bad_queue, good_queue = await queues(2)
    operators()
    bad = scaledjob(
        "bad", namespace=namespace, queue=bad_queue, url=rabbitmq_url, job_spec=job_spec()
    )
    bad["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = (
        "Sometimes"
    )
    await crs.apply(bad)
    await crs.apply(
        scaledjob(
            "good", namespace=namespace, queue=good_queue, url=rabbitmq_url, job_spec=job_spec()
        )
    )
    condition = await crs.wait_condition("bad", "Ready", "False", reason="InvalidSpec")
    assert "imagePullPolicy" in condition["message"]
    assert "Sometimes" in condition["message"]
    assert "InvalidSpec" in await asyncio.to_thread(events_of, kube_api, namespace, "bad")
    await crs.wait_condition("good", "Ready", "True")
    await send(rabbitmq_url, good_queue, "fine")
    await wait_for_jobs(kube_api, namespace, "good", 1, state="Complete")


async def test_api_server_refuses_what_the_crd_schema_refuses(
    namespace: str, rabbitmq_url: str, crs: ScaledJobs
) -> None:
    body = scaledjob("neither", namespace=namespace, queue="q", url=rabbitmq_url)
    del body["spec"]["jobTargetRef"]
    with pytest.raises(client.ApiException) as refused:
        await crs.apply(body)
    assert "exactly one of spec.jobTargetRef" in refused.value.body
    body = scaledjob("zero", namespace=namespace, queue="q", url=rabbitmq_url, maxReplicaCount=0)
    with pytest.raises(client.ApiException) as refused:
        await crs.apply(body)
    assert "spec.maxReplicaCount" in refused.value.body


async def test_keda_scaledjob_is_taken_over_when_annotated_and_paused_for_keda(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    operators: Callable[..., OperatorProcess],
    keda_crds: list[str],
) -> None:
    assert "scaledjobs.keda.sh" in keda_crds
    custom = client.CustomObjectsApi(kube_api)
    (queue,) = await queues()
    op = operators(args=("--keda-takeover",))
    body = scaledjob(
        "legacy", namespace=namespace, queue=queue, url=rabbitmq_url, job_spec=job_spec()
    )
    body["apiVersion"] = "keda.sh/v1alpha1"
    body["metadata"]["annotations"] = {
        "jobrunner.dev/takeover": "true",
        "autoscaling.keda.sh/paused": "true",
    }
    await asyncio.to_thread(
        custom.create_namespaced_custom_object, "keda.sh", "v1alpha1", namespace, "scaledjobs", body
    )
    await send(rabbitmq_url, queue, "migrated")
    jobs = await wait_for_jobs(kube_api, namespace, "legacy", 1, state="Complete")
    assert jobs[0].metadata.labels["app.kubernetes.io/managed-by"] == "jobrunner"
    assert op.dispatching("legacy") == 1
    assert "Started" in await asyncio.to_thread(events_of, kube_api, namespace, "legacy")


async def _true(value: bool) -> bool:
    return value
