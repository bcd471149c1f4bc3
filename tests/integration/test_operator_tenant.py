"""The tenant model on the real API server: a ScaledJob author cannot read the operator's
own environment, by a `*FromEnv` key or a TriggerAuthentication `env` entry; what they
get is `Ready=False InvalidSpec` saying what to do, and the value is nowhere they (or the
operator's log) can see. A variable the operator's owner allow-lists works."""

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
from tests.integration.operator_harness import (
    GROUP,
    VERSION,
    OperatorProcess,
    ScaledJobs,
    events_of,
    scaledjob,
)

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]


@pytest.fixture
def operator(
    kubeconfig: Path, tmp_path: Path, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Callable[[dict[str, str]], OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(env: dict[str, str]) -> OperatorProcess:
        process = OperatorProcess(
            kubeconfig,
            tmp_path / "op.log",
            namespaces=[namespace],
            lease_namespace=namespace,
            identity="op-tenant",
            env=env,
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
async def queue(rabbitmq_url: str) -> AsyncIterator[str]:
    name = f"q-{uuid.uuid4().hex[:10]}"
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)
    yield name
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


def create_trigger_authentication(
    api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]
) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "triggerauthentications",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TriggerAuthentication",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        },
    )


def what_the_tenant_can_read(api: client.ApiClient, namespace: str) -> str:
    """Everything of the namespace a ScaledJob author reads back: the ScaledJobs (status
    included), the Events, the Jobs."""
    custom = client.CustomObjectsApi(api)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    scaledjobs = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "scaledjobs")
    events = core.list_namespaced_event(namespace).to_dict()
    jobs = batch.list_namespaced_job(namespace).to_dict()
    return json.dumps([scaledjobs, events, jobs], default=str)


async def test_a_scaledjob_cannot_read_the_operators_environment_and_is_told_what_to_do(
    kube_api: client.ApiClient,
    namespace: str,
    rabbitmq_url: str,
    queue: str,
    operator: Callable[[dict[str, str]], OperatorProcess],
) -> None:
    marker = f"operator-secret-{uuid.uuid4().hex}"
    process = operator(
        {
            # The operator's own credentials, as a chart's `env` would give them.
            "JR_OPERATOR_BROKER_URL": f"amqp://operator:{marker}@127.0.0.1:1/",
            "JR_OPERATOR_TOKEN": marker,
            # One variable the owner lends to every tenant.
            "JR_SHARED_BROKER_URL": rabbitmq_url,
            "JOBRUNNER_OPERATOR__TENANT_ENV_ALLOW_LIST": "JR_SHARED_BROKER_URL",
        }
    )
    crs = ScaledJobs(kube_api, namespace)
    from_env = scaledjob("from-env", namespace=namespace, queue=queue, url="")
    from_env["spec"]["triggers"][0]["metadata"] = {
        "queueName": queue,
        "hostFromEnv": "JR_OPERATOR_BROKER_URL",
    }
    await asyncio.to_thread(
        create_trigger_authentication,
        kube_api,
        namespace,
        "leaky",
        {"env": [{"parameter": "queueName", "name": "JR_OPERATOR_TOKEN"}]},
    )
    auth_env = scaledjob("auth-env", namespace=namespace, queue=queue, url=rabbitmq_url)
    auth_env["spec"]["triggers"][0]["authenticationRef"] = {"name": "leaky"}
    allowed = scaledjob("allowed", namespace=namespace, queue=queue, url="")
    allowed["spec"]["triggers"][0]["metadata"] = {
        "queueName": queue,
        "hostFromEnv": "JR_SHARED_BROKER_URL",
    }
    for body in (from_env, auth_env, allowed):
        await crs.apply(body)

    refused = await crs.wait_condition("from-env", "Ready", "False", reason="InvalidSpec")
    message = refused["message"]
    assert "field spec.triggers[0].metadata.hostFromEnv" in message
    assert "$JR_OPERATOR_BROKER_URL would be read from the operator's own environment" in message
    assert f"a Secret of namespace {namespace}" in message
    assert "tenantEnvAllowList" in message
    refused = await crs.wait_condition("auth-env", "Ready", "False", reason="InvalidSpec")
    assert "TriggerAuthentication leaky spec.env[0]" in refused["message"]
    assert "$JR_OPERATOR_TOKEN" in refused["message"]
    await crs.wait_condition("allowed", "Ready", "True", within=90)

    async def both_told() -> bool:
        for name in ("from-env", "auth-env"):
            if "InvalidSpec" not in await asyncio.to_thread(events_of, kube_api, namespace, name):
                return False
        return True

    await eventually(both_told, within=30, interval=0.3)
    readable = await asyncio.to_thread(what_the_tenant_can_read, kube_api, namespace)
    assert "JR_OPERATOR_TOKEN" in readable, "the search covers the status and Events"
    assert marker not in readable
    assert marker not in process.logs()
    assert process.dispatching("from-env") == 0
    assert process.dispatching("auth-env") == 0
