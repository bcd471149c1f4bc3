"""On the cluster stack: a custom-handler app imported for a cluster (the handler a
native sidecar with a startup probe, the invoker the main container, its ServiceAccount
and Role), a message on Azurite, and the dispatcher creating the Job on the real API
server, where KWOK plays the pod and the Job reaches Complete."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from azure.storage.queue.aio import QueueClient
from kubernetes import client, utils

from jobrunner.cli import main as cli
from tests.integration.harness import Dispatcher, finished, jobs_of
from tests.integration.test_azure_queue import count
from tests.integration.test_functions_azure import custom_handler_app

pytestmark = [pytest.mark.azurite, pytest.mark.kube]


async def test_an_imported_custom_handler_job_with_its_native_sidecar_reaches_complete(
    azure_storage: str,
    function_queues: dict[str, str],
    kube_api: client.ApiClient,
    namespace: str,
    dispatchers: Callable[..., Dispatcher],
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues)
    out = tmp_path / "out"
    assert (
        cli(
            [
                "functions",
                "import",
                str(app),
                "-o",
                str(out),
                "-n",
                namespace,
                "--image",
                "registry.example/orders:1",
                "--jobrunner-image",
                "registry.example/jobrunner:1",
            ]
        )
        == 0
    )
    (manifest,) = out.glob("*-processorder.yaml")
    # What kubectl apply would create beside the dispatcher: the Secret and the
    # invoker's ServiceAccount, Role and RoleBinding.
    for path in (out / "orders-app-rbac.yaml", manifest):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in ("Secret", "ServiceAccount", "Role", "RoleBinding"):
                utils.create_from_dict(kube_api, doc, namespace=namespace)
    async with QueueClient.from_connection_string(azure_storage, function_queues["orders"]) as q:
        await q.send_message(base64.b64encode(b'{"id": "on-the-cluster"}').decode())
    dispatcher = dispatchers(manifest, {"JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5"})
    await dispatcher.settled("ack", 1, within=120)
    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "orders-app-processorder")
    assert [finished(j) for j in jobs] == ["Complete"], dispatcher.logs()
    (job,) = jobs
    pod = job.spec.template.spec
    (sidecar,) = pod.init_containers
    assert sidecar.restart_policy == "Always"
    assert sidecar.startup_probe.tcp_socket.port == "handler"
    assert sidecar.image == "registry.example/orders:1"
    assert [c.name for c in pod.containers] == ["invoker"]
    assert pod.service_account_name == "orders-app-invoker"
    # The message reached only the invoker; the Job was settled and the message deleted.
    assert any(e.name == "JOBRUNNER_MESSAGE" for e in pod.containers[0].env)
    assert not any(e.name == "JOBRUNNER_MESSAGE" for e in sidecar.env or [])
    assert "acked the message (Job " in dispatcher.logs()
    for _ in range(60):
        if await asyncio.to_thread(count, azure_storage, function_queues["orders"]) == 0:
            break
        await asyncio.sleep(0.5)
    assert await asyncio.to_thread(count, azure_storage, function_queues["orders"]) == 0
