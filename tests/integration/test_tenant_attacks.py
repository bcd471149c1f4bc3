"""The operator on a cluster shared by teams, attacked by a tenant.

The chart is installed with its defaults (one ClusterRoleBinding: the operator may get
Secrets in every namespace), and the operator runs as the chart's ServiceAccount. The
tenant is a ServiceAccount with rights in its own namespace only (ScaledJobs,
TriggerAuthentications and Secrets there; read Events and Jobs), and it tries what a
hostile ScaledJob author would: a Secret of another namespace by a path in a name, the
operator's own environment, an internal HTTP service, the embedded queue, the operator's
cloud identity. Whatever happens, nothing of the victim's Secret, of the operator's
environment or of the internal service's answer may reach anything the tenant can read:
its ScaledJobs' status, the Events and Jobs of its namespace, the operator's log and
/readyz. A well-behaved ScaledJob of the same tenant works meanwhile (the control: the
attacks are not refused merely because nothing works).
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.helm import CHART, helm
from tests.helpers import eventually
from tests.integration.harness import publish, wait_for_jobs
from tests.integration.operator_harness import (
    OperatorProcess,
    ScaledJobs,
    scaledjob,
    token_kubeconfig,
)
from tests.integration.test_operator import job_spec, operators, queues
from tests.integration.test_operator_rbac import Release, sa_client, service_account_kubeconfig

pytestmark = [
    pytest.mark.kube,
    pytest.mark.rabbitmq,
    pytest.mark.usefixtures("jobrunner_crds", "keda_crds"),
]
__all__ = ["operators", "queues"]


@pytest.fixture
def cluster_wide_release(kube_api: client.ApiClient, kubeconfig: Path) -> Iterator[Release]:
    """The chart with its default RBAC: the ClusterRole bound cluster-wide (Secrets get in
    every namespace) — the setting where a tenant's path in a name was a cluster-wide
    read — and the keda.sh takeover on (KEDA's CRDs validate no names)."""
    core = client.CoreV1Api(kube_api)
    name = f"jr{uuid.uuid4().hex[:8]}"
    home = f"{name}-system"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    try:
        helm(
            "install", name, str(CHART),
            "--kubeconfig", str(kubeconfig),
            "-n", home,
            "--skip-crds",
            "--set", "replicaCount=1",
            "--set", "kedaTakeover=true",
            "--wait=false",
        )  # fmt: skip
        yield Release(name, home, "")
    finally:
        helm("uninstall", name, "--kubeconfig", str(kubeconfig), "-n", home, check=False)
        core.delete_namespace(home, propagation_policy="Background")


@pytest.fixture
def victim(kube_api: client.ApiClient) -> Iterator[tuple[str, str]]:
    """Another team's namespace with a Secret ``admin`` whose value is a marker (shaped
    like a queue name, so that it would pass as one)."""
    core = client.CoreV1Api(kube_api)
    name = f"v-{uuid.uuid4().hex[:10]}"
    marker = f"victim{uuid.uuid4().hex[:12]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_secret(
        name,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="admin"),
            data={"token": base64.b64encode(marker.encode()).decode()},
        ),
    )
    try:
        yield name, marker
    finally:
        core.delete_namespace(name, propagation_policy="Background")


TENANT_RULES = [
    {
        "apiGroups": ["jobrunner.dev", "keda.sh"],
        "resources": ["scaledjobs", "triggerauthentications"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list"]},
]


@pytest.fixture
def tenant(kube_api: client.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path) -> Any:
    """An ApiClient for a ServiceAccount with rights in ``namespace`` only."""
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "tenant"}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "tenant"}, "rules": TENANT_RULES})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "tenant"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
            "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        "tenant", namespace, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    return sa_client(
        token_kubeconfig(kubeconfig, token, tmp_path / "tenant.kubeconfig", user="tenant")
    )


class _Marker(http.server.BaseHTTPRequestHandler):
    """An internal service: whatever is asked, it answers a marker (as a 403, as the
    Storage service answers a bad signature, and in the body, where an error text would
    be copied from)."""

    marker = ""

    def _answer(self) -> None:
        body = f"<Error><Code>{self.marker}</Code><Message>{self.marker}</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-ms-error-code", self.marker)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def internal_service() -> Iterator[tuple[str, str]]:
    marker = f"internal{uuid.uuid4().hex[:12]}"
    handler = type("Handler", (_Marker,), {"marker": marker})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="internal-service", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", marker
    finally:
        server.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> str:
    """The body of ``url``, whatever its status (/readyz answers 503 when not ready)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def _create(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> int:
    """Create a custom resource as ``api``'s user: the HTTP status (201, or the refusal)."""
    group, version = body["apiVersion"].split("/")
    plural = {"ScaledJob": "scaledjobs", "TriggerAuthentication": "triggerauthentications"}
    try:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            group, version, namespace, plural[body["kind"]], body
        )
    except client.ApiException as exc:
        return int(exc.status)
    return 201


def _auth(name: str, *, keda: bool = False, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1" if keda else "jobrunner.dev/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": name},
        "spec": spec,
    }


def _trigger(kind: str, metadata: dict[str, str], auth: str | None = None) -> dict[str, Any]:
    trigger: dict[str, Any] = {"type": kind, "metadata": metadata}
    if auth:
        trigger["authenticationRef"] = {"name": auth}
    return trigger


async def test_a_tenant_reaches_nothing_that_is_not_its_own(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    rabbitmq_url: str,
    cluster_wide_release: Release,
    victim: tuple[str, str],
    tenant: Any,
    internal_service: tuple[str, str],
    queues: Callable[..., Any],
    operators: Callable[..., OperatorProcess],
) -> None:
    victim_ns, victim_marker = victim
    service_url, service_marker = internal_service
    env_marker = f"operatorenv{uuid.uuid4().hex[:12]}"
    (queue,) = await queues()
    port = _free_port()
    config = service_account_kubeconfig(
        kube_api, kubeconfig, cluster_wide_release, tmp_path / "operator.kubeconfig"
    )
    op = operators(
        "shared",
        config=config,
        lease_namespace=cluster_wide_release.namespace,
        args=("--keda-takeover",),
        env={
            "JR_OPERATOR_SECRET": env_marker,
            "JOBRUNNER_TELEMETRY__HTTP_PORT": str(port),
        },
    )

    # 1. A Secret of another namespace by a path in its name: the API server refuses the
    #    TriggerAuthentication itself (the CRD's name patterns).
    for i, bad in enumerate(
        [f"../../{victim_ns}/secrets/admin", f"..%2F..%2F{victim_ns}%2Fsecrets%2Fadmin",
         f"{victim_ns}/admin"]
    ):  # fmt: skip
        ref = {"parameter": "queueName", "name": bad, "key": "token"}
        status = await asyncio.to_thread(
            _create, tenant, namespace, _auth(f"path{i}", secretTargetRef=[ref])
        )
        assert status == 422, f"TriggerAuthentication naming Secret {bad!r}: {status}"

    # 2. The same through keda.sh objects taken over (KEDA's CRDs check no names): the
    #    operator's own models refuse it, and never ask the API server for that path.
    ref = {"parameter": "queueName", "name": f"../../{victim_ns}/secrets/admin", "key": "token"}
    assert (
        await asyncio.to_thread(
            _create, tenant, namespace, _auth("kedapath", keda=True, secretTargetRef=[ref])
        )
        == 201
    )
    legacy = scaledjob("legacy", namespace=namespace, queue="x", url=rabbitmq_url)
    legacy["apiVersion"] = "keda.sh/v1alpha1"
    legacy["metadata"]["annotations"] = {
        "jobrunner.dev/takeover": "true",
        "autoscaling.keda.sh/paused": "true",
    }
    legacy["spec"]["triggers"] = [_trigger("rabbitmq", {"host": rabbitmq_url}, auth="kedapath")]
    assert await asyncio.to_thread(_create, tenant, namespace, legacy) == 201

    # 3. The operator's environment, by a trigger key and by a TriggerAuthentication.
    assert await asyncio.to_thread(
        _create, tenant, namespace,
        _auth("operatorenv", env=[{"parameter": "queueName", "name": "JR_OPERATOR_SECRET"}]),
    ) == 201  # fmt: skip
    attacks: dict[str, dict[str, Any]] = {
        "fromenv": _trigger("rabbitmq", {"hostFromEnv": "JR_OPERATOR_SECRET", "queueName": queue}),
        "authenv": _trigger("rabbitmq", {"host": rabbitmq_url}, auth="operatorenv"),
        # 4. The embedded queue: files on the operator's filesystem.
        "embedded": _trigger("sqlite", {"queueName": "steal", "path": "/tmp/jobrunner-steal.db"}),
        # 5. The operator's own cloud identity (no keys given).
        "sqs": _trigger(
            "aws-sqs-queue",
            {
                "queueURL": f"{service_url}/000000000000/q",
                "awsRegion": "eu-west-1",
                "awsEndpoint": service_url,
            },
        ),
    }
    # 6. An internal HTTP service, whose answer must not come back through status.
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={base64.b64encode(b'k' * 32).decode()};QueueEndpoint={service_url}/acct;"
    )
    await asyncio.to_thread(
        client.CoreV1Api(tenant).create_namespaced_secret,
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="internal"),
            data={"connection": base64.b64encode(connection.encode()).decode()},
        ),
    )
    ref = {"parameter": "connection", "name": "internal", "key": "connection"}
    assert (
        await asyncio.to_thread(
            _create, tenant, namespace, _auth("internal", secretTargetRef=[ref])
        )
        == 201
    )
    attacks["ssrf"] = _trigger("azure-queue", {"queueName": "probe"}, auth="internal")

    # The control: the tenant's own broker address from its own Secret.
    await asyncio.to_thread(
        client.CoreV1Api(tenant).create_namespaced_secret,
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="broker"),
            data={"host": base64.b64encode(rabbitmq_url.encode()).decode()},
        ),
    )
    ref = {"parameter": "host", "name": "broker", "key": "host"}
    assert (
        await asyncio.to_thread(_create, tenant, namespace, _auth("broker", secretTargetRef=[ref]))
        == 201
    )
    attacks["work"] = _trigger("rabbitmq", {"queueName": queue}, auth="broker")

    for name, trigger in attacks.items():
        body = scaledjob(name, namespace=namespace, queue=queue, url="", job_spec=job_spec())
        body["spec"]["triggers"] = [trigger]
        assert await asyncio.to_thread(_create, tenant, namespace, body) == 201, name

    crs = ScaledJobs(tenant, namespace)
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady", within=120)
    for name in ("fromenv", "authenv", "embedded", "sqs"):
        await crs.wait_condition(name, "Ready", "False", reason="InvalidSpec", within=60)
    ssrf = await crs.wait_condition("ssrf", "Ready", "False", within=120)
    assert ssrf["reason"] in ("SourceUnavailable", "DispatcherFailed"), ssrf

    await publish(rabbitmq_url, queue, json.dumps({"task": "ok"}).encode(), message_id="ok")
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")

    async def takeover_refused() -> bool:
        events = await asyncio.to_thread(
            client.CoreV1Api(tenant).list_namespaced_event,
            namespace,
            field_selector="involvedObject.kind=ScaledJob,involvedObject.name=legacy",
        )
        return any(e.reason == "InvalidSpec" for e in events.items)

    await eventually(takeover_refused, within=60, interval=0.5)
    # Give the failing ones time to retry (and to write what they would write).
    await asyncio.sleep(5)

    # Everything the tenant can read, and what the operator tells anyone.
    readable: dict[str, str] = {}
    custom = client.CustomObjectsApi(tenant)
    for group in ("jobrunner.dev", "keda.sh"):
        found = await asyncio.to_thread(
            custom.list_namespaced_custom_object, group, "v1alpha1", namespace, "scaledjobs"
        )
        readable[f"{group} ScaledJobs"] = json.dumps(found)
    events = await asyncio.to_thread(client.CoreV1Api(tenant).list_namespaced_event, namespace)
    readable["Events"] = json.dumps([(e.reason, e.message) for e in events.items], default=str)
    jobs = await asyncio.to_thread(client.BatchV1Api(tenant).list_namespaced_job, namespace)
    readable["Jobs"] = json.dumps(tenant.sanitize_for_serialization(jobs))
    readable["operator log"] = op.logs()
    readable["/readyz"] = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz")
    for what, text in readable.items():
        for marker in (victim_marker, env_marker, service_marker):
            assert marker not in text, f"{marker} reached the {what}"
    assert "legacy" not in readable["/readyz"]
    assert namespace not in readable["/readyz"]
