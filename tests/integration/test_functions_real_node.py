"""A Functions app on the real node: imported with ``jobrunner functions import`` for a
cluster and run for real (kubelet, containerd, runc on jobrunner-node-0), where
tests/integration/test_functions_cluster.py plays the invoker's part under KWOK.

The app's handler is the native sidecar the import lays out (``restartPolicy: Always``,
its ``startupProbe`` on the handler port), the invoker the main container, in the
project's image; the message comes from Azurite through the dispatcher (on the host, the
only one that talks to Azurite: the pod needs no storage account), the invoker calls the
handler on localhost inside the pod and records its result on its own Job through the
API server, with the ServiceAccount the import made; the Job reaches ``Complete`` and
the dispatcher publishes the output to the receipts queue.

The app's files reach the handler's container in a ConfigMap mounted where the import
points its ``workingDir`` (``/home/site/wwwroot``), standing in for the app's own image.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from azure.storage.queue.aio import QueueClient
from kubernetes import client

from jobrunner.cli import main as cli
from tests.integration.harness import Dispatcher, finished, jobs_of
from tests.integration.realnode import MAX_REPLICAS, RealNode, pod_log, pods_of_job
from tests.integration.test_functions_azure import custom_handler_app
from tests.integration.test_functions_cluster import apply, received

pytestmark = [pytest.mark.azurite, pytest.mark.kube, pytest.mark.real_node]

WWWROOT = "/home/site/wwwroot"

HANDLER = r"""
import http.server, json, os, sys
port = int(os.environ["FUNCTIONS_CUSTOMHANDLER_PORT"])
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        order = json.loads(payload["Data"]["order"])
        print(f"handler got order {order['id']} on {self.path}", flush=True)
        answer = {"Outputs": {"receipt": [json.dumps({"order": order["id"], "by": "handler"})]},
                  "Logs": [f"processed order {order['id']}"], "ReturnValue": None}
        body = json.dumps(answer).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.end_headers(); self.wfile.write(body)
print(f"handler listening on {port}", flush=True)
http.server.ThreadingHTTPServer(("", port), H).serve_forever()
"""
"""The custom handler. It listens on every address of the pod: the kubelet's tcpSocket
startup probe (the import's) connects to the pod's IP, so a handler on 127.0.0.1 only is
never started on a cluster (restarted after each 60 failed probes) where the local
executor, probing 127.0.0.1, passes it (compat.KUBELET_DIFFERENCES, "probe address")."""


def _import(
    app: Path,
    out: Path,
    *,
    namespace: str,
    name: str,
    node: RealNode,
    image: str = "python",
    function: str = "processorder",
    app_container: str = "handler",
) -> Path:
    """``functions import`` for a cluster with the stack's images, then placed on the real
    node: the taint tolerated, images never pulled, the app's files mounted into the
    container that runs the app (``app_container``)."""
    args = ["functions", "import", str(app), "-o", str(out), "-n", namespace, "--name", name]
    args += ["--image", node.images[image], "--jobrunner-image", node.images["jobrunner"]]
    assert cli(args) == 0
    (manifest,) = out.glob(f"{name}-{function}.yaml")
    docs = list(yaml.safe_load_all(manifest.read_text()))
    scaledjob = docs[-1]
    scaledjob["spec"]["maxReplicaCount"] = min(MAX_REPLICAS, 2)
    job = scaledjob["spec"]["jobTargetRef"]
    job["activeDeadlineSeconds"] = 240
    pod = job["template"]["spec"]
    pod["nodeSelector"] = {node.taint: "true"}
    pod["tolerations"] = [{"key": node.taint, "operator": "Exists", "effect": "NoSchedule"}]
    pod["terminationGracePeriodSeconds"] = 5
    pod.setdefault("volumes", []).append({"name": "app", "configMap": {"name": f"{name}-files"}})
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        container["imagePullPolicy"] = "Never"
    (handler,) = [
        c
        for c in [*pod.get("initContainers", []), *pod["containers"]]
        if c["name"] == app_container
    ]
    handler.setdefault("volumeMounts", []).append(
        {"name": "app", "mountPath": WWWROOT, "readOnly": True}
    )
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return manifest


async def _what_the_pods_did(kube_api: client.ApiClient, namespace: str) -> str:
    """Each pod's phase, container states and logs, for a failure's message."""
    core = client.CoreV1Api(kube_api)
    lines = []
    for pod in (await asyncio.to_thread(core.list_namespaced_pod, namespace)).items:
        lines.append(f"pod {pod.metadata.name} {pod.status.phase} on {pod.spec.node_name}")
        every = [
            *(pod.status.init_container_statuses or []),
            *(pod.status.container_statuses or []),
        ]
        for status in every:
            lines.append(f"  {status.name}: {status.state}")
            try:
                lines.append(await pod_log(kube_api, namespace, pod.metadata.name, status.name))
            except client.ApiException as exc:
                lines.append(f"  (no log: {exc.status})")
    return "\n".join(lines)


async def _send(connection: str, queue: str, body: bytes) -> None:
    async with QueueClient.from_connection_string(connection, queue) as q:
        await q.send_message(base64.b64encode(body).decode())


async def test_an_imported_custom_handler_app_runs_for_real_with_its_native_sidecar(
    azure_storage: str,
    function_queues: dict[str, str],
    kube_api: client.ApiClient,
    namespace: str,
    real_node: RealNode,
    dispatchers: Callable[..., Dispatcher],
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues, handler=HANDLER)
    out = tmp_path / "out"
    manifest = _import(app, out, namespace=namespace, name="orders-app", node=real_node)
    apply(
        kube_api, namespace, out / "orders-app-rbac.yaml", manifest,
        kinds=("Secret", "ServiceAccount", "Role", "RoleBinding"),
    )  # fmt: skip
    files = {"handler.py": HANDLER, "host.json": (app / "host.json").read_text()}
    await asyncio.to_thread(
        client.CoreV1Api(kube_api).create_namespaced_config_map,
        namespace,
        {"metadata": {"name": "orders-app-files"}, "data": files},
    )
    await _send(azure_storage, function_queues["orders"], b'{"id": "on-a-real-node"}')
    dispatcher = dispatchers(manifest, {"JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5"})
    try:
        await dispatcher.settled("ack", 1, within=240)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await _what_the_pods_did(kube_api, namespace)}") from None

    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "orders-app-processorder")
    assert [finished(j) for j in jobs] == ["Complete"], dispatcher.logs()[-4000:]
    (job,) = jobs
    (pod,) = await asyncio.to_thread(pods_of_job, kube_api, namespace, job.metadata.name)
    assert pod.spec.node_name == real_node.name
    assert pod.status.phase == "Succeeded"
    # The handler: a native sidecar the kubelet started, probed, and stopped after the
    # invoker ended; the invoker: exit 0.
    (sidecar,) = pod.spec.init_containers
    assert sidecar.restart_policy == "Always"
    assert sidecar.startup_probe.tcp_socket.port == "handler"
    (handler_status,) = pod.status.init_container_statuses
    assert handler_status.started is True or handler_status.state.terminated is not None
    (invoker_status,) = pod.status.container_statuses
    assert invoker_status.state.terminated.exit_code == 0, invoker_status
    handler_log = await pod_log(kube_api, namespace, pod.metadata.name, "handler")
    assert "handler listening on 8080" in handler_log
    assert "handler got order on-a-real-node on /ProcessOrder" in handler_log, handler_log
    # The result the invoker recorded on its Job, and the output the dispatcher published.
    result = json.loads(job.metadata.annotations["jobrunner.dev/function-result"])
    assert result["status"] == "succeeded", result
    got = await received(azure_storage, function_queues["receipts"])
    assert [json.loads(m) for m in got] == [{"order": "on-a-real-node", "by": "handler"}]
    assert "acked the message (Job " in dispatcher.logs()


PYTHON_APP = """
import json
import azure.functions as func

app = func.FunctionApp()

@app.function_name("Work")
@app.queue_trigger(arg_name="msg", queue_name="%OrdersQueue%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="%ReceiptsQueue%", connection="AzureWebJobsStorage")
def work(msg: func.QueueMessage, out: func.Out[str]) -> None:
    order = msg.get_json()
    print(f"function got order {order['id']} (try {msg.dequeue_count})", flush=True)
    out.set(json.dumps({"order": order["id"], "by": "python"}))
"""
"""A v2 Python app; it runs in the project's image, which has ``azure-functions`` (the
stack's plain Python image has not)."""


async def test_an_imported_python_app_runs_for_real_in_its_own_container(
    azure_storage: str,
    function_queues: dict[str, str],
    kube_api: client.ApiClient,
    namespace: str,
    real_node: RealNode,
    dispatchers: Callable[..., Dispatcher],
    tmp_path: Path,
) -> None:
    app = tmp_path / "py-app"
    app.mkdir()
    settings = {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "AzureWebJobsStorage": azure_storage,
        "OrdersQueue": function_queues["orders"],
        "ReceiptsQueue": function_queues["receipts"],
    }
    host = json.dumps({"version": "2.0", "extensions": {"queues": {"maxDequeueCount": 1}}})
    (app / "host.json").write_text(host)
    (app / "local.settings.json").write_text(json.dumps({"Values": settings}))
    (app / "function_app.py").write_text(PYTHON_APP)
    out = tmp_path / "out"
    manifest = _import(
        app, out, namespace=namespace, name="py-app", node=real_node,
        image="jobrunner", function="work", app_container="function",
    )  # fmt: skip
    apply(
        kube_api, namespace, out / "py-app-rbac.yaml", manifest,
        kinds=("Secret", "ServiceAccount", "Role", "RoleBinding"),
    )  # fmt: skip
    files = {"function_app.py": PYTHON_APP, "host.json": host}
    await asyncio.to_thread(
        client.CoreV1Api(kube_api).create_namespaced_config_map,
        namespace,
        {"metadata": {"name": "py-app-files"}, "data": files},
    )
    await _send(azure_storage, function_queues["orders"], b'{"id": "python-on-a-real-node"}')
    dispatcher = dispatchers(manifest, {"JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5"})
    try:
        await dispatcher.settled("ack", 1, within=240)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await _what_the_pods_did(kube_api, namespace)}") from None

    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "py-app-work")
    assert [finished(j) for j in jobs] == ["Complete"], dispatcher.logs()[-4000:]
    (job,) = jobs
    (pod,) = await asyncio.to_thread(pods_of_job, kube_api, namespace, job.metadata.name)
    assert pod.spec.node_name == real_node.name
    assert pod.status.phase == "Succeeded"
    codes = {
        s.name: s.state.terminated.exit_code
        for s in [*pod.status.init_container_statuses, *pod.status.container_statuses]
    }
    assert set(codes.values()) == {0}, codes
    log = await pod_log(kube_api, namespace, pod.metadata.name, "function")
    assert "function got order python-on-a-real-node (try 1)" in log, log
    result = json.loads(job.metadata.annotations["jobrunner.dev/function-result"])
    assert result["status"] == "succeeded", result
    got = await received(azure_storage, function_queues["receipts"])
    assert [json.loads(m) for m in got] == [{"order": "python-on-a-real-node", "by": "python"}]
