"""A tenant cannot make the operator read another namespace's Secret by naming it as a
path (issue #20, item 1), tried on the real API server: the CRD refuses such a
TriggerAuthentication; where no CRD guards the name (a keda.sh object taken over), the
operator — run as the chart's ServiceAccount, with the chart's default cluster-wide
Secret ``get`` — refuses it as InvalidSpec, and nothing of that Secret reaches what the
tenant can read (Events, the ScaledJob, Jobs) or the operator's log."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.helm import CHART, helm
from tests.helpers import eventually
from tests.integration.harness import jobs_of
from tests.integration.operator_harness import OperatorProcess, scaledjob
from tests.integration.test_operator import job_spec, operators, queues
from tests.integration.test_operator_rbac import Release, sa_client, service_account_kubeconfig

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]
__all__ = ["operators", "queues"]

PATH_NAMES = {
    "dot-dot": "../../{ns}/secrets/admin",
    "encoded": "..%2F..%2F{ns}%2Fsecrets%2Fadmin",
    "slash": "x/../../../{ns}/secrets/admin",
}
"""Secret names that are paths to the Secret ``admin`` of namespace ``ns``."""


@pytest.fixture
def victim(kube_api: client.ApiClient) -> Iterator[str]:
    """Another tenant's namespace (the tenant under test has no rights in it)."""
    core = client.CoreV1Api(kube_api)
    name = f"victim-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def cluster_wide_release(kube_api: client.ApiClient, kubeconfig: Path) -> Iterator[Release]:
    """The chart as most install it: all namespaces (a ClusterRoleBinding, so Secret
    ``get`` everywhere), with the keda.sh takeover on."""
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


def _authentication(api_version: str, name: str, secret_name: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "TriggerAuthentication",
        "metadata": {"name": name},
        "spec": {
            "secretTargetRef": [{"parameter": "queueName", "name": secret_name, "key": "queue"}]
        },
    }


async def test_the_api_server_refuses_a_trigger_authentication_whose_secret_name_is_a_path(
    kube_api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(kube_api)

    def create(body: dict[str, Any], plural: str = "triggerauthentications") -> tuple[int, str]:
        try:
            custom.create_namespaced_custom_object(
                "jobrunner.dev", "v1alpha1", namespace, plural, body
            )
        except client.ApiException as exc:
            return int(exc.status), str(exc.body)
        return 201, ""

    bad = [
        "../../kube-system/secrets/x",
        *(n.format(ns="kube-system") for n in PATH_NAMES.values()),
        "Admin",
        "a" * 254,
        "",
    ]
    for i, secret_name in enumerate(bad):
        body = _authentication("jobrunner.dev/v1alpha1", f"bad-{i}", secret_name)
        status, text = await asyncio.to_thread(create, body)
        assert status == 422, (secret_name, status, text)
        assert "spec.secretTargetRef[0].name" in text, text
    body = _authentication("jobrunner.dev/v1alpha1", "fine", "broker.credentials")
    assert await asyncio.to_thread(create, body) == (201, "")
    # A ScaledJob's authenticationRef names a TriggerAuthentication by the same rule.
    sj = scaledjob("work", namespace=namespace, queue="q", url="amqp://mq/")
    sj["spec"]["triggers"][0]["authenticationRef"] = {"name": "../../kube-system/x"}
    status, text = await asyncio.to_thread(create, sj, "scaledjobs")
    assert status == 422, text
    assert "spec.triggers[0].authenticationRef.name" in text, text


def _texts(kube_api: client.ApiClient, namespace: str) -> str:
    """Everything of the tenant's namespace the tenant can read that the operator
    writes: Events, ScaledJobs (keda.sh and jobrunner.dev), Jobs, as JSON."""
    core, custom = client.CoreV1Api(kube_api), client.CustomObjectsApi(kube_api)
    found: list[Any] = [
        {"reason": e.reason, "message": e.message}
        for e in core.list_namespaced_event(namespace).items
    ]
    for group in ("keda.sh", "jobrunner.dev"):
        listed: Any = custom.list_namespaced_custom_object(
            group, "v1alpha1", namespace, "scaledjobs"
        )
        found += listed["items"]
    found += [j.to_dict() for j in client.BatchV1Api(kube_api).list_namespaced_job(namespace).items]
    return json.dumps(found, default=str)


def _events(kube_api: client.ApiClient, namespace: str, name: str) -> list[tuple[str, str]]:
    """(reason, message) of the Events on ScaledJob ``name``."""
    items = (
        client.CoreV1Api(kube_api)
        .list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind=ScaledJob,involvedObject.name={name}"
        )
        .items
    )
    return [(e.reason or "", e.message or "") for e in items]


async def test_operator_refuses_a_keda_secret_name_that_is_a_path_and_nothing_of_it_leaks(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    victim: str,
    rabbitmq_url: str,
    queues: Callable[..., Any],
    operators: Callable[..., OperatorProcess],
    keda_crds: list[str],
    cluster_wide_release: Release,
) -> None:
    assert "triggerauthentications.keda.sh" in keda_crds
    # The other tenant's Secret: its value is a queue that exists (so old code, having
    # read it, would start dispatching from it and say so in an Event).
    leaked, placeholder = await queues(2)
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        victim,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="admin"),
            data={"queue": base64.b64encode(leaked.encode()).decode()},
        ),
    )
    custom = client.CustomObjectsApi(kube_api)
    for kind, path_name in PATH_NAMES.items():
        # keda.sh's CRD has no pattern for a Secret's name: the API server takes it.
        await asyncio.to_thread(
            custom.create_namespaced_custom_object,
            "keda.sh", "v1alpha1", namespace, "triggerauthentications",
            _authentication("keda.sh/v1alpha1", f"steal-{kind}", path_name.format(ns=victim)),
        )  # fmt: skip
        body = scaledjob(
            f"steal-{kind}",
            namespace=namespace,
            queue=placeholder,  # the TriggerAuthentication's queueName would win
            url=rabbitmq_url,
            job_spec=job_spec(),
        )
        body["apiVersion"] = "keda.sh/v1alpha1"
        body["metadata"]["annotations"] = {
            "jobrunner.dev/takeover": "true",
            "autoscaling.keda.sh/paused": "true",
        }
        body["spec"]["triggers"][0]["authenticationRef"] = {"name": f"steal-{kind}"}
        await asyncio.to_thread(
            custom.create_namespaced_custom_object,
            "keda.sh", "v1alpha1", namespace, "scaledjobs", body,
        )  # fmt: skip
    config = service_account_kubeconfig(
        kube_api, kubeconfig, cluster_wide_release, tmp_path / "sa.kubeconfig"
    )
    # The premise: this ServiceAccount may read the other namespace's Secret.
    sa = client.CoreV1Api(sa_client(config))
    assert (await asyncio.to_thread(sa.read_namespaced_secret, "admin", victim)).data
    op = operators(
        "chart-sa",
        config=config,
        lease_namespace=cluster_wide_release.namespace,
        args=("--keda-takeover",),
    )

    async def each_decided() -> bool:
        """Each ScaledJob refused, started or failed: the operator made up its mind."""
        for kind in PATH_NAMES:
            events = await asyncio.to_thread(_events, kube_api, namespace, f"steal-{kind}")
            if not any(r in ("InvalidSpec", "Started", "DispatcherFailed") for r, _ in events):
                return False
        return True

    await eventually(each_decided, within=90, interval=0.5)
    await asyncio.sleep(3)  # time for a dispatcher to start and say so, were one going to
    assert leaked not in await asyncio.to_thread(_texts, kube_api, namespace)
    assert leaked not in op.logs()
    assert "dispatching steal-" not in op.logs()
    assert await asyncio.to_thread(jobs_of, kube_api, namespace, "steal-dot-dot") == []
    for kind in PATH_NAMES:
        events = await asyncio.to_thread(_events, kube_api, namespace, f"steal-{kind}")
        refused = [m for r, m in events if r == "InvalidSpec"]
        assert refused, events
        assert "secretTargetRef[0].name" in refused[0]
        assert "DNS-1123 subdomain" in refused[0]
