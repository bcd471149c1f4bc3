"""On the cluster stack: a custom-handler app imported for a cluster (the handler a
native sidecar with a startup probe, the invoker the main container, its ServiceAccount,
Role and admission policy), a message on Azurite, and the dispatcher creating the Job on
the real API server, where KWOK plays the pod and the Job reaches Complete.

KWOK runs no container, so the tests play the invoker's part: with a ServiceAccount token
bound to the Job's KWOK pod (TokenRequest, boundObjectRef), the key the kubelet would
mount from the Job's message Secret, and the invoker's own code. As an attacker they do
what a compromised function's pod can: patch other Jobs with that token and that key."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.storage.queue.aio import QueueClient
from kubernetes import client, utils

from jobrunner.cli import main as cli
from jobrunner.functions import invoker
from tests.helm import CHART, helm
from tests.helpers import eventually
from tests.integration.harness import Dispatcher, finished, jobs_of
from tests.integration.test_azure_queue import count, peek_all
from tests.integration.test_functions_azure import custom_handler_app

pytestmark = [pytest.mark.azurite, pytest.mark.kube]

RESULT = "jobrunner.dev/function-result"
RUN_FOR = "kwok.jobrunner.dev/run-duration"


def mac(key: bytes, namespace: str, name: str, uid: str, annotation: str, value: str) -> str:
    """A mark's MAC, as anyone holding ``key`` computes it (jobrunner.core.marks' format)."""
    message = "\n".join(("jobrunner.dev/mark/v1", namespace, name, uid, annotation, value))
    return "v1:" + hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def import_app(app: Path, out: Path, namespace: str, name: str, **spec: Any) -> Path:
    """``functions import`` for a cluster; the ScaledJob's pods stay Running 30 s under
    KWOK (time for a test to play their part); ``spec`` is merged into the ScaledJob."""
    args = ["functions", "import", str(app), "-o", str(out), "-n", namespace, "--name", name]
    images = ["--image", "registry.example/orders:1"]
    images += ["--jobrunner-image", "registry.example/jobrunner:1"]
    assert cli([*args, *images]) == 0
    (manifest,) = out.glob(f"{name}-processorder.yaml")
    docs = list(yaml.safe_load_all(manifest.read_text()))
    scaledjob = docs[-1]
    template = scaledjob["spec"]["jobTargetRef"]["template"]
    template.setdefault("metadata", {}).setdefault("annotations", {})[RUN_FOR] = "30s"
    scaledjob["spec"].update(spec)
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return manifest


def apply(kube_api: client.ApiClient, namespace: str, *paths: Path, kinds: tuple[str, ...]) -> None:
    """What ``kubectl apply`` of the imported files would create beside the dispatcher."""
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in kinds:
                utils.create_from_dict(kube_api, doc, namespace=namespace)


class Pod:
    """The view from inside a Job's (KWOK) pod: its ServiceAccount token bound to it, the
    CA, its namespace and the key mounted from the Job's Secret."""

    def __init__(
        self,
        kube_api: client.ApiClient,
        kubeconfig: Path,
        namespace: str,
        job: str,
        home: Path,
        pod_name: str | None = None,
    ) -> None:
        core = client.CoreV1Api(kube_api)
        self.namespace, self.job = namespace, job
        pod = next(
            p
            for p in core.list_namespaced_pod(
                namespace, label_selector=f"batch.kubernetes.io/job-name={job}"
            ).items
            if p.spec.node_name and pod_name in (None, p.metadata.name)
        )
        self.name = pod.metadata.name
        self.uid = pod.metadata.labels["batch.kubernetes.io/controller-uid"]
        token = core.create_namespaced_service_account_token(
            pod.spec.service_account_name,
            namespace,
            {
                "spec": {
                    "audiences": [],
                    "expirationSeconds": 3600,
                    "boundObjectRef": {
                        "kind": "Pod",
                        "apiVersion": "v1",
                        "name": pod.metadata.name,
                        "uid": pod.metadata.uid,
                    },
                }
            },
        ).status.token
        cluster = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]
        self.sa = home / f"{self.name}-serviceaccount"
        self.sa.mkdir()
        (self.sa / "token").write_text(token)
        (self.sa / "namespace").write_text(namespace)
        (self.sa / "ca.crt").write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
        data = core.read_namespaced_secret(f"{job}-message", namespace).data or {}
        self.key = base64.b64decode(data["function-key"]) if "function-key" in data else b""
        (self.sa / "function-key").write_bytes(self.key)
        self.server = cluster["server"]
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.sa / "ca.crt")
        configuration.api_key = {"authorization": f"Bearer {token}"}
        self.batch = client.BatchV1Api(client.ApiClient(configuration))

    def env(self) -> dict[str, str]:
        """The invoker's environment in this pod, as jobrunner renders it."""
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        return {
            "PATH": os.environ["PATH"],
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "JOBRUNNER_SERVICE_ACCOUNT_DIR": str(self.sa),
            "JOBRUNNER_JOB_NAME": self.job,
            "JOBRUNNER_JOB_UID": self.uid,
            "JOBRUNNER_FUNCTION_KEY_FILE": str(self.sa / "function-key"),
        }

    def patch(self, job: str, body: dict[str, Any], *, dry_run: bool = False) -> int:
        """Patch ``job`` with this pod's token: 200, or the API server's refusal."""
        try:
            self.batch.patch_namespaced_job(
                job, self.namespace, body, **({"dry_run": "All"} if dry_run else {})
            )
        except client.ApiException as exc:
            return int(exc.status)
        return 200


async def job_with_pod(kube_api: client.ApiClient, namespace: str, scaledjob: str) -> str:
    """The name of ``scaledjob``'s Job once its pod is scheduled and its Secret exists."""
    core = client.CoreV1Api(kube_api)

    async def ready() -> str | None:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, scaledjob)
        if not jobs:
            return None
        name = str(jobs[0].metadata.name)
        pods = await asyncio.to_thread(
            core.list_namespaced_pod,
            namespace,
            label_selector=f"batch.kubernetes.io/job-name={name}",
        )
        try:
            await asyncio.to_thread(core.read_namespaced_secret, f"{name}-message", namespace)
        except client.ApiException:
            return None
        return name if any(p.spec.node_name for p in pods.items) else None

    return await eventually(ready, within=60, interval=0.2)


async def send(connection: str, queue: str, body: bytes) -> None:
    async with QueueClient.from_connection_string(connection, queue) as q:
        await q.send_message(base64.b64encode(body).decode())


@pytest.fixture
def second_queues(azure_storage: str) -> Iterator[dict[str, str]]:
    """Another orders/receipts pair, for a second function app."""
    run = uuid.uuid4().hex[:10]
    names = {"orders": f"orders-b-{run}", "receipts": f"receipts-b-{run}"}

    async def create() -> None:
        async with QueueClient.from_connection_string(azure_storage, names["orders"]) as q:
            await q.create_queue()

    asyncio.run(create())
    yield names

    async def delete() -> None:
        for name in [*names.values(), f"{names['orders']}-poison"]:
            async with QueueClient.from_connection_string(azure_storage, name) as q:
                with contextlib.suppress(Exception):
                    await q.delete_queue()

    asyncio.run(delete())


HANDLER = (
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
    "s.serve_forever()\n"
)
"""A custom handler answering every invocation with one output."""


def invoke_with_handler(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The invoker file run alone (``-I``: standard library only) as a Job's main
    container, beside HANDLER; binding ``out``."""
    handler = subprocess.Popen([sys.executable, "-c", HANDLER], stdout=subprocess.PIPE, text=True)
    try:
        assert handler.stdout is not None
        port = handler.stdout.readline().strip()
        return subprocess.run(
            [sys.executable, "-I", str(Path(invoker.__file__)), "custom-handler",
             "--function", "Fn", "--port", port, "--outputs", "out"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        handler.kill()
        handler.wait()


def receipt(text: str) -> dict[str, Any]:
    return {
        "status": "succeeded",
        "outputs": {"receipt": [base64.b64encode(text.encode()).decode()]},
    }


async def received(connection: str, queue: str) -> list[bytes]:
    peeked = await asyncio.to_thread(peek_all, connection, queue)
    return [base64.b64decode(m) for m in peeked]


async def test_an_imported_custom_handler_job_with_its_native_sidecar_reaches_complete(
    azure_storage: str,
    function_queues: dict[str, str],
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    dispatchers: Callable[..., Dispatcher],
    tmp_path: Path,
) -> None:
    app = custom_handler_app(tmp_path, azure_storage, function_queues)
    out = tmp_path / "out"
    manifest = import_app(app, out, namespace, "orders-app")
    apply(
        kube_api, namespace, out / "orders-app-rbac.yaml", manifest,
        kinds=("Secret", "ServiceAccount", "Role", "RoleBinding"),
    )  # fmt: skip
    await send(azure_storage, function_queues["orders"], b'{"id": "on-the-cluster"}')
    dispatcher = dispatchers(manifest, {"JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5"})
    name = await job_with_pod(kube_api, namespace, "orders-app-processorder")
    # The invoker's part: its record, on its own Job, with the pod's token and key.
    pod = Pod(kube_api, kubeconfig, namespace, name, tmp_path)
    await asyncio.to_thread(invoker.record_result, receipt("receipt on-the-cluster"), pod.env())
    await dispatcher.settled("ack", 1, within=120)
    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "orders-app-processorder")
    assert [finished(j) for j in jobs] == ["Complete"], dispatcher.logs()
    (job,) = jobs
    spec = job.spec.template.spec
    (sidecar,) = spec.init_containers
    assert sidecar.restart_policy == "Always"
    assert sidecar.startup_probe.tcp_socket.port == "handler"
    assert sidecar.image == "registry.example/orders:1"
    assert [c.name for c in spec.containers] == ["invoker"]
    assert spec.service_account_name == "orders-app-invoker"
    # The message and the key reached only the invoker; the Job was settled, the output
    # published and the message deleted.
    main_env = {e.name: e for e in spec.containers[0].env}
    assert "JOBRUNNER_MESSAGE" in main_env
    assert main_env["JOBRUNNER_JOB_UID"].value_from.field_ref.field_path == (
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
    assert not any(e.name.startswith("JOBRUNNER_") for e in sidecar.env or [])
    assert not sidecar.volume_mounts
    assert "acked the message (Job " in dispatcher.logs()
    assert await received(azure_storage, function_queues["receipts"]) == [b"receipt on-the-cluster"]
    await eventually(
        lambda: asyncio.to_thread(lambda: count(azure_storage, function_queues["orders"]) == 0),
        within=30,
    )


async def test_a_functions_pod_cannot_forge_another_jobs_outcome(
    azure_storage: str,
    function_queues: dict[str, str],
    second_queues: dict[str, str],
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    dispatchers: Callable[..., Dispatcher],
    tmp_path: Path,
) -> None:
    """Two function apps, A and B, in one namespace, without the admission policy. A's
    pod, with its token (patch on every Job, as RBAC grants it) and its key, writes a
    result for B's Job (outputs of its choosing, MAC'd with A's key for B's name and
    uid) and marks it settled. B keeps its message (acked when its Job was created), so
    on today's code B's message was silently dropped (settled) or its outputs forged.
    Now: B's message is dead-lettered from its own copy as FunctionResultUnverified,
    nothing reaches B's destination, B gets Warning Events; A is served as usual."""
    env = {"JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5"}
    app_a = custom_handler_app(tmp_path / "a", azure_storage, function_queues)
    app_b = custom_handler_app(tmp_path / "b", azure_storage, second_queues)
    out = tmp_path / "out"
    manifest_a = import_app(app_a, out, namespace, "app-a")
    manifest_b = import_app(app_b, out, namespace, "app-b", ackPolicy="onJobCreation")
    for name, manifest in (("app-a", manifest_a), ("app-b", manifest_b)):
        kinds = ("Secret", "ServiceAccount", "Role", "RoleBinding")
        apply(kube_api, namespace, out / f"{name}-rbac.yaml", manifest, kinds=kinds)
    await send(azure_storage, function_queues["orders"], b'{"id": "a-1"}')
    await send(azure_storage, second_queues["orders"], b'{"id": "b-1"}')
    dispatcher_a = dispatchers(manifest_a, env)
    dispatcher_b = dispatchers(manifest_b, env)
    job_a = await job_with_pod(kube_api, namespace, "app-a-processorder")
    job_b = await job_with_pod(kube_api, namespace, "app-b-processorder")
    pod_a = Pod(kube_api, kubeconfig, namespace, job_a, tmp_path)
    uid_b = (
        await asyncio.to_thread(client.BatchV1Api(kube_api).read_namespaced_job, job_b, namespace)
    ).metadata.uid
    forged = json.dumps(receipt("forged by A"), sort_keys=True)
    assert (
        pod_a.patch(
            job_b,
            {
                "metadata": {
                    "annotations": {
                        RESULT: forged,
                        RESULT + "-mac": mac(pod_a.key, namespace, job_b, uid_b, RESULT, forged),
                        "jobrunner.dev/settled": "ack",
                    }
                }
            },
        )
        == 200
    ), "without the admission policy RBAC lets A's pod patch B"
    # A's own record, the genuine way.
    await asyncio.to_thread(invoker.record_result, receipt("receipt a-1"), pod_a.env())
    await dispatcher_a.settled("ack", 1, within=120)
    await dispatcher_b.settled("dead-letter", 1, within=120)
    poison_b = f"{second_queues['orders']}-poison"
    assert await received(azure_storage, poison_b) == [b'{"id": "b-1"}']
    assert "FunctionResultUnverified" in dispatcher_b.logs()
    assert await received(azure_storage, second_queues["receipts"]) == []
    assert await received(azure_storage, function_queues["receipts"]) == [b"receipt a-1"]
    events = await asyncio.to_thread(
        client.CoreV1Api(kube_api).list_namespaced_event,
        namespace,
        field_selector=f"involvedObject.name={job_b},reason=UnverifiedMark",
    )
    texts = " ".join(e.message for e in events.items)
    assert "jobrunner.dev/settled" in texts
    assert "jobrunner.dev/function-result" in texts


@pytest.fixture
def policy_source(
    request: pytest.FixtureRequest, kube_api: client.ApiClient, kubeconfig: Path, namespace: str
) -> Iterator[Callable[[Path], None]]:
    """Puts the admission policy on the cluster, for this namespace only: as ``functions
    import`` writes it, or as the chart installs it (a release of its own, watching the
    namespace). Removed afterwards (it is cluster-scoped)."""
    adm = client.AdmissionregistrationV1Api(kube_api)
    made: list[dict[str, Any]] = []
    release = f"jr{uuid.uuid4().hex[:8]}"
    home = f"{release}-system"

    def install(out: Path) -> None:
        if request.param == "import":
            for doc in yaml.safe_load_all((out / "orders-policy.yaml").read_text()):
                made.append(doc)
                if doc["kind"] == "ValidatingAdmissionPolicy":
                    adm.create_validating_admission_policy(doc)
                else:
                    adm.create_validating_admission_policy_binding(doc)
            return
        client.CoreV1Api(kube_api).create_namespace({"metadata": {"name": home}})
        helm(
            "install", release, str(CHART), "--kubeconfig", str(kubeconfig), "-n", home,
            "--skip-crds", "--set", f"watchNamespaces={{{namespace}}}",
            "--set", "replicaCount=1", "--wait=false",
        )  # fmt: skip

    yield install
    for doc in made:
        with contextlib.suppress(client.ApiException):
            if doc["kind"] == "ValidatingAdmissionPolicy":
                adm.delete_validating_admission_policy(doc["metadata"]["name"])
            else:
                adm.delete_validating_admission_policy_binding(doc["metadata"]["name"])
    if request.param == "chart":
        helm("uninstall", release, "--kubeconfig", str(kubeconfig), "-n", home, check=False)
        with contextlib.suppress(client.ApiException):
            client.CoreV1Api(kube_api).delete_namespace(home, propagation_policy="Background")


@pytest.mark.parametrize("policy_source", ["import", "chart"], indirect=True)
async def test_the_admission_policy_lets_a_pod_change_only_its_own_jobs_result(
    policy_source: Callable[[Path], None],
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
) -> None:
    app = tmp_path / "orders"
    (app / "Fn").mkdir(parents=True)
    (app / "host.json").write_text(
        '{"customHandler": {"description": {"defaultExecutablePath": "h"}}}'
    )
    (app / "Fn" / "function.json").write_text(
        '{"bindings": [{"type": "queueTrigger", "direction": "in", "name": "m", "queueName": "q"}]}'
    )
    out = tmp_path / "out"
    assert cli(["functions", "import", str(app), "-o", str(out), "-n", namespace]) == 0
    apply(
        kube_api, namespace, out / "orders-rbac.yaml",
        kinds=("ServiceAccount", "Role", "RoleBinding"),
    )  # fmt: skip
    policy_source(out)
    batch = client.BatchV1Api(kube_api)
    for name in ("fn-a", "fn-b"):
        # The Job's message Secret with its key, as the dispatcher makes it.
        client.CoreV1Api(kube_api).create_namespaced_secret(
            namespace,
            {
                "metadata": {"name": f"{name}-message"},
                "data": {"function-key": base64.b64encode(os.urandom(32)).decode()},
            },
        )
        batch.create_namespaced_job(
            namespace,
            {
                "metadata": {
                    "name": name,
                    "labels": {"app.kubernetes.io/managed-by": "jobrunner"},
                    "annotations": {"jobrunner.dev/message-id": name},
                    "finalizers": ["jobrunner.dev/settlement"],
                },
                "spec": {
                    "template": {
                        "metadata": {"annotations": {RUN_FOR: "300s"}},
                        "spec": {
                            "restartPolicy": "Never",
                            "serviceAccountName": "orders-invoker",
                            "containers": [{"name": "c", "image": "busybox"}],
                        },
                    }
                },
            },
        )

    async def scheduled() -> bool:
        pods = await asyncio.to_thread(
            client.CoreV1Api(kube_api).list_namespaced_pod,
            namespace,
            label_selector="batch.kubernetes.io/job-name=fn-a",
        )
        return any(p.spec.node_name for p in pods.items)

    await eventually(scheduled, within=60, interval=0.2)
    pod_a = Pod(kube_api, kubeconfig, namespace, "fn-a", tmp_path)
    to_b = {"metadata": {"annotations": {RESULT: "{}"}}}

    async def enforced() -> bool:  # the API server compiles a new policy in the background
        return await asyncio.to_thread(pod_a.patch, "fn-b", to_b, dry_run=True) == 403

    await eventually(enforced, within=60, interval=0.5)
    own_result = {"metadata": {"annotations": {RESULT: "{}", RESULT + "-mac": "v1:00"}}}
    assert pod_a.patch("fn-a", own_result) == 200
    assert pod_a.patch("fn-b", to_b) == 403
    for change in (
        {"metadata": {"annotations": {"jobrunner.dev/settled": "ack"}}},
        {"metadata": {"annotations": {"jobrunner.dev/message-id": None}}},
        {"metadata": {"labels": {"jobrunner.dev/scaledjob": "another"}}},
        {"metadata": {"finalizers": None}},
        {"spec": {"activeDeadlineSeconds": 1}},
    ):
        assert pod_a.patch("fn-a", change) == 403, change
    # The real invoker, standard library only, as A's main container: it records the
    # handler's answer on A through the policy.
    env = {**pod_a.env(), "JOBRUNNER_MESSAGE": "m", "JOBRUNNER_SOURCE": "azure-queue"}
    recorded = await asyncio.to_thread(invoke_with_handler, env)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    job_a = batch.read_namespaced_job("fn-a", namespace)
    text = job_a.metadata.annotations[RESULT]
    assert json.loads(text) == {"status": "succeeded", "outputs": {"out": ["aGVsbG8="]}}
    assert job_a.metadata.annotations[RESULT + "-mac"] == mac(
        pod_a.key, namespace, "fn-a", job_a.metadata.uid, RESULT, text
    )
    # Whoever else holds the rights (here the admin; the operator's own account is
    # exempt in the chart) is not affected.
    batch.patch_namespaced_job("fn-b", namespace, {"metadata": {"annotations": {"x": "y"}}})


@pytest.mark.parametrize("policy_source", ["import"], indirect=True)
async def test_each_try_of_a_functions_job_knows_the_failed_tries_before_it(
    policy_source: Callable[[Path], None],
    azure_storage: str,
    function_queues: dict[str, str],
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    dispatchers: Callable[..., Dispatcher],
    tmp_path: Path,
) -> None:
    """maxDequeueCount 3 is three pods of one Job; in each, the invoker learns from the
    Job (a PATCH that changes nothing, which the admission policy lets its pod's token
    make) how many tries failed before it, so DequeueCount is 1, 2, 3. KWOK fails each
    pod after 15 s; the test plays the invoker in each while it runs."""
    app = custom_handler_app(tmp_path, azure_storage, function_queues)
    host = json.loads((app / "host.json").read_text())
    host["extensions"]["queues"]["maxDequeueCount"] = 3
    (app / "host.json").write_text(json.dumps(host))
    out = tmp_path / "out"
    manifest = import_app(app, out, namespace, "orders")
    docs = list(yaml.safe_load_all(manifest.read_text()))
    job_spec = docs[-1]["spec"]["jobTargetRef"]
    assert job_spec["backoffLimit"] == 2
    annotations = job_spec["template"]["metadata"]["annotations"]
    annotations.update({RUN_FOR: "15s", "kwok.jobrunner.dev/outcome": "failed"})
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    apply(
        kube_api, namespace, out / "orders-rbac.yaml", manifest,
        kinds=("Secret", "ServiceAccount", "Role", "RoleBinding"),
    )  # fmt: skip
    policy_source(out)
    await send(azure_storage, function_queues["orders"], b'{"id": "tried-thrice"}')
    dispatcher = dispatchers(manifest, {"JOBRUNNER_AZURE_QUEUE__MAX_POLL_INTERVAL_SECONDS": "0.5"})
    name = await job_with_pod(kube_api, namespace, "orders-processorder")
    core = client.CoreV1Api(kube_api)
    seen: list[str] = []
    counts: list[int] = []

    async def next_running_pod() -> str | None:
        pods = await asyncio.to_thread(
            core.list_namespaced_pod,
            namespace,
            label_selector=f"batch.kubernetes.io/job-name={name}",
        )
        for p in pods.items:
            if p.metadata.name not in seen and p.spec.node_name and p.status.phase == "Running":
                return str(p.metadata.name)
        return None

    for _ in range(3):
        pod_name = await eventually(next_running_pod, within=120, interval=0.3)
        seen.append(pod_name)
        pod = Pod(kube_api, kubeconfig, namespace, name, tmp_path, pod_name=pod_name)
        env = {**pod.env(), "JOBRUNNER_DELIVERY_COUNT": "1"}
        counts.append(await asyncio.to_thread(invoker.dequeue_count, env, {}))
    assert counts == [1, 2, 3], dispatcher.logs()
    # Nothing was changed by those PATCHes, and the third failure was the last try.
    await dispatcher.settled("dead-letter", 1, within=120)
    (job,) = await asyncio.to_thread(jobs_of, kube_api, namespace, "orders-processorder")
    assert finished(job) == "Failed"
    assert RESULT not in (job.metadata.annotations or {})
    assert job.status.failed == 3
