"""On the cluster stack: a custom-handler app imported for a cluster (the handler a
native sidecar with a startup probe, the invoker the main container, its ServiceAccount
and Role), a message on Azurite, and the dispatcher creating the Job on the real API
server, where KWOK plays the pod and the Job reaches Complete."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from azure.storage.queue.aio import QueueClient
from kubernetes import client, utils

from jobrunner.cli import main as cli
from jobrunner.functions import invoker
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


def test_the_invoker_records_its_result_on_its_own_job_with_the_pods_service_account(
    kube_api: client.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    """The in-cluster path of the invoker, against the real API server: the service
    account's token, the CA and the namespace as a pod has them, and only the Role the
    importer writes (get and patch on jobs)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "host.json").write_text(
        '{"customHandler": {"description": {"defaultExecutablePath": "h"}}}'
    )
    (app / "Fn").mkdir()
    (app / "Fn" / "function.json").write_text(
        '{"bindings": [{"type": "queueTrigger", "direction": "in", "name": "m", "queueName": "q"}]}'
    )
    out = tmp_path / "out"
    assert cli(["functions", "import", str(app), "-o", str(out), "-n", namespace]) == 0
    for doc in yaml.safe_load_all((out / "app-rbac.yaml").read_text()):
        utils.create_from_dict(kube_api, doc, namespace=namespace)
    batch = client.BatchV1Api(kube_api)
    batch.create_namespaced_job(
        namespace,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "invoked"},
            "spec": {
                "template": {
                    "metadata": {"annotations": {"kwok.jobrunner.dev/run-duration": "60s"}},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "busybox"}],
                    },
                }
            },
        },
    )
    token = client.CoreV1Api(kube_api).create_namespaced_service_account_token(
        "app-invoker", namespace, {"spec": {"audiences": [], "expirationSeconds": 600}}
    )
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(token.status.token)
    (sa / "namespace").write_text(namespace)
    ca = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"][
        "certificate-authority-data"
    ]
    (sa / "ca.crt").write_bytes(base64.b64decode(ca))
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    # A handler that answers with one output; the invoker runs as the pod's main container.
    handler = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import http.server, json\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def log_message(self, *a): pass\n"
            "    def do_GET(self): self.send_response(200); self.end_headers()\n"
            "    def do_POST(self):\n"
            "        self.rfile.read(int(self.headers['Content-Length']))\n"
            "        self.send_response(200); self.end_headers()\n"
            "        self.wfile.write(json.dumps({'Outputs': {'out': 'hello'}}).encode())\n"
            "s = http.server.HTTPServer(('127.0.0.1', 0), H)\n"
            "print(s.server_address[1], flush=True)\n"
            "s.serve_forever()\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert handler.stdout is not None
        handler_port = int(handler.stdout.readline())
        invoked = subprocess.run(
            [
                sys.executable,
                "-I",
                str(Path(invoker.__file__)),
                "custom-handler",
                "--function",
                "Fn",
                "--port",
                str(handler_port),
                "--outputs",
                "out",
            ],
            env={
                "PATH": os.environ["PATH"],
                "KUBERNETES_SERVICE_HOST": host,
                "KUBERNETES_SERVICE_PORT": port,
                "JOBRUNNER_SERVICE_ACCOUNT_DIR": str(sa),
                "JOBRUNNER_JOB_NAME": "invoked",
                "JOBRUNNER_MESSAGE": "m",
                "JOBRUNNER_SOURCE": "azure-queue",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert invoked.returncode == 0, invoked.stdout + invoked.stderr
    finally:
        handler.kill()
        handler.wait()
    job = batch.read_namespaced_job("invoked", namespace)
    record = json.loads(job.metadata.annotations[invoker.RESULT_ANNOTATION])
    assert record == {"status": "succeeded", "outputs": {"out": ["aGVsbG8="]}}
