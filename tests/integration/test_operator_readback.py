"""`jobrunner operator` on the real stack, used as a ScaledJob author would use it to probe
the operator's network: each trigger type points at an internal service (a server the
test starts on 127.0.0.1, answering a recognisable marker whatever is asked), and
nothing of that answer, and no credential, may come back in anything the author — or
anyone who reaches the operator's port — can read: the ScaledJob's status and Events,
/readyz, and the operator's own log. Issue #20, item 3 and part of 9."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.internal_service import internal_service
from tests.integration.operator_harness import OperatorProcess, ScaledJobs, scaledjob
from tests.integration.test_observability import free_port, get
from tests.integration.test_operator import crs, operators

__all__ = ["crs", "operators"]  # the fixtures, shared with the other operator tests

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("jobrunner_crds")]

MARKER = "INTERNAL-ANSWER-5c1e"
PASSWORD = "pw-9d2f-never-logged"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def triggers(address: str) -> dict[str, dict[str, Any]]:
    """One ScaledJob trigger per type, each aimed at ``address`` (host:port); secrets come
    from the TriggerAuthentication ``internal``."""
    auth = {"authenticationRef": {"name": "internal"}}
    return {
        "azure": {"type": "azure-queue", "metadata": {"queueName": "jobs"}, **auth},
        "redis": {
            "type": "redis-streams",
            "metadata": {"address": address, "stream": "s", "consumerGroup": "g"},
            **auth,
        },
        "nats": {
            "type": "nats-jetstream",
            "metadata": {
                "natsServer": f"nats://probe:{PASSWORD}@{address}",
                "stream": "s",
                "consumer": "c",
            },
        },
        "sqs": {
            "type": "aws-sqs-queue",
            "metadata": {
                "queueURL": f"http://{address}/000000000000/jobs",
                "awsRegion": "eu-west-1",
                "awsEndpoint": f"http://{address}",
            },
            **auth,
        },
        "rabbit": {
            "type": "rabbitmq",
            "metadata": {"queueName": "jobs", "host": f"amqp://probe:{PASSWORD}@{address}/"},
        },
        "kafka": {
            "type": "kafka",
            "metadata": {"bootstrapServers": address, "consumerGroup": "g", "topic": "t"},
        },
        "mqtt": {"type": "mqtt", "metadata": {"host": f"mqtt://{address}", "topic": "t"}},
    }


def create_authentication(kube_api: client.ApiClient, namespace: str, address: str) -> None:
    values = {
        "connection": (
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};"
            f"QueueEndpoint=http://{address}/devstoreaccount1?sv=2024&sig={PASSWORD};"
        ),
        "username": "probe",
        "password": PASSWORD,
        "awsAccessKeyID": "AKIAPROBE",
        "awsSecretAccessKey": PASSWORD,
    }
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="internal"),
            data={k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
        ),
    )
    client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "jobrunner.dev",
        "v1alpha1",
        namespace,
        "triggerauthentications",
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "internal", "namespace": namespace},
            "spec": {
                "secretTargetRef": [
                    {"parameter": key, "name": "internal", "key": key} for key in values
                ]
            },
        },
    )


def event_messages(kube_api: client.ApiClient, namespace: str) -> list[str]:
    items = client.CoreV1Api(kube_api).list_namespaced_event(namespace).items
    return [f"{e.reason}: {e.message}" for e in items]


@pytest.mark.parametrize("status", [400, 200])
async def test_an_internal_services_answer_reaches_no_status_event_readyz_or_log(
    kube_api: client.ApiClient,
    namespace: str,
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
    status: int,
) -> None:
    with internal_service(MARKER, status=status) as service:
        create_authentication(kube_api, namespace, service.address)
        port = free_port()
        op = operators(env={"JOBRUNNER_TELEMETRY__HTTP_PORT": str(port)})
        names = list(triggers(service.address))
        for name, trigger in triggers(service.address).items():
            body = scaledjob(name, namespace=namespace, queue="unused", url="")
            body["spec"]["triggers"] = [trigger]
            await crs.apply(body)

        async def all_reported() -> bool:
            statuses = [await crs.status(n) for n in names]
            return all(
                any(c.get("type") == "Ready" and c.get("status") == "False"
                    for c in s.get("conditions") or [])
                and s.get("lastError")
                for s in statuses
            )  # fmt: skip

        await eventually(all_reported, within=90, interval=0.5)

        async def retried() -> bool:
            # The clients met the service again after their first try (retries are where
            # a different text could come back), counted together: connections cannot
            # be told apart by client.
            return service.connections >= 2 * len(names)

        await eventually(retried, within=90, interval=0.5)
        # Not a wait for anything: one more status interval (2 s here) so that what a
        # retry says is written before the status is read.
        await asyncio.sleep(3)
        readyz = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/readyz")
        readable = {
            "status": json.dumps({n: await crs.status(n) for n in names}),
            "events": "\n".join(await asyncio.to_thread(event_messages, kube_api, namespace)),
            "/readyz": readyz[1],
            "log": op.logs(),
        }
    for where, text in readable.items():
        for secret in (MARKER, "hunter2", PASSWORD, ACCOUNT_KEY[:16]):
            assert secret not in text, f"{secret!r} in the {where}:\n{text[-4000:]}"
    # Each ScaledJob's own status still says, in jobrunner's words, where and what.
    azure = json.dumps(await crs.status("azure"))
    assert f"http://{service.address}" in azure
    redis = json.dumps(await crs.status("redis"))
    assert f"Redis at {service.address}" in redis
    # /readyz names no ScaledJob, namespace or broker: counts only.
    for private in (*names, namespace, service.address, "127.0.0.1"):
        assert private not in readyz[1], readyz[1]
    assert "dispatching" in readyz[1], readyz[1]
