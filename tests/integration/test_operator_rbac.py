"""The Helm chart on the local cluster, and its RBAC proven: `helm install` puts every
object on the API server; the operator, run out of cluster with a real token of the
chart's ServiceAccount (TokenRequest), serves a ScaledJob end to end; that token is
refused what the operator must not have.

The chart's Deployment is installed too, but its pod does not run here: KWOK fakes pods,
it runs no container. The operator process these tests start is that pod's program, with
that pod's identity."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.helm import CHART, helm
from tests.helpers import eventually
from tests.integration.harness import finished, jobs_of, publish, queue_depth, wait_for_jobs
from tests.integration.operator_harness import OperatorProcess, ScaledJobs, events_of, scaledjob
from tests.integration.test_operator import crs, guarded, job_spec, operators, queues

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]
__all__ = ["crs", "operators", "queues"]


class Release:
    def __init__(self, name: str, namespace: str, watched: str) -> None:
        self.name, self.namespace, self.watched = name, namespace, watched

    @property
    def service_account(self) -> str:
        return f"{self.name}-jobrunner"


@pytest.fixture
def release(kube_api: client.ApiClient, kubeconfig: Path, namespace: str) -> Iterator[Release]:
    """The chart installed in a namespace of its own, serving the test's namespace."""
    core = client.CoreV1Api(kube_api)
    name = f"jr{uuid.uuid4().hex[:8]}"
    home = f"{name}-system"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
    try:
        helm(
            "install", name, str(CHART),
            "--kubeconfig", str(kubeconfig),
            "-n", home,
            "--skip-crds",  # the cluster has them (shared by every test)
            "--set", f"watchNamespaces={{{namespace}}}",
            "--set", "replicaCount=1",
            "--wait=false",
        )  # fmt: skip
        yield Release(name, home, namespace)
    finally:
        helm("uninstall", name, "--kubeconfig", str(kubeconfig), "-n", home, check=False)
        core.delete_namespace(home, propagation_policy="Background")


def service_account_kubeconfig(
    kube_api: client.ApiClient, kubeconfig: Path, release: Release, path: Path
) -> Path:
    """A kubeconfig whose user is the chart's ServiceAccount, with a token from the
    TokenRequest API (what the kubelet mounts in its pod)."""
    token = (
        client.CoreV1Api(kube_api)
        .create_namespaced_service_account_token(
            release.service_account,
            release.namespace,
            {"spec": {"expirationSeconds": 3600}},
        )
        .status.token
    )
    config = yaml.safe_load(kubeconfig.read_text())
    config["users"] = [{"name": "chart-sa", "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = "chart-sa"
    path.write_text(yaml.safe_dump(config))
    return path


def sa_client(config: Path) -> client.ApiClient:
    from kubernetes import config as kube_config

    return kube_config.new_client_from_config(config_file=str(config))


async def test_helm_install_puts_every_object_of_the_chart_on_the_cluster(
    kube_api: client.ApiClient, kubeconfig: Path, release: Release
) -> None:
    status = json.loads(
        helm(
            "status",
            release.name,
            "-n",
            release.namespace,
            "--kubeconfig",
            str(kubeconfig),
            "-o",
            "json",
        ).stdout
    )
    assert status["info"]["status"] == "deployed"
    full = release.service_account
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    rbac, policy = client.RbacAuthorizationV1Api(kube_api), client.PolicyV1Api(kube_api)
    deployment = apps.read_namespaced_deployment(full, release.namespace)
    assert deployment.spec.template.spec.service_account_name == full
    assert core.read_namespaced_service_account(full, release.namespace)
    assert core.read_namespaced_service(full, release.namespace).spec.ports[0].port == 8080
    assert rbac.read_cluster_role(full).rules
    binding = rbac.read_namespaced_role_binding(full, release.watched)
    assert binding.role_ref.kind == "ClusterRole"
    assert rbac.read_namespaced_role(f"{full}-leases", release.namespace)
    assert policy.read_namespaced_pod_disruption_budget(full, release.namespace)
    with pytest.raises(client.ApiException) as none:
        rbac.read_cluster_role_binding(full)
    assert none.value.status == 404, "watching one namespace: no cluster-wide binding"


async def test_operator_as_the_charts_service_account_serves_a_scaledjob_end_to_end(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    rabbitmq_url: str,
    release: Release,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    (queue,) = await queues()
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    # The broker's address comes from a Secret through a TriggerAuthentication (Secret get
    # by name), and bodies go by file (the per-Job message Secret: create, owned by its
    # Job from its creation).
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="broker"),
            data={"host": base64.b64encode(rabbitmq_url.encode()).decode()},
        ),
    )
    client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "jobrunner.dev", "v1alpha1", namespace, "triggerauthentications",
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "broker", "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "host", "name": "broker", "key": "host"}]},
        },
    )  # fmt: skip
    op = operators("chart-sa", config=config, lease_namespace=release.namespace)
    body = scaledjob("work", namespace=namespace, queue=queue, url="", job_spec=job_spec())
    body["spec"]["triggers"][0] = {
        "type": "rabbitmq",
        "metadata": {"queueName": queue},
        "authenticationRef": {"name": "broker"},
    }
    body["spec"]["messageDelivery"] = {"mode": "file"}
    await crs.apply(body)
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    for task in ("a", "b"):
        await publish(rabbitmq_url, queue, json.dumps({"task": task}).encode(), message_id=task)
    jobs = await wait_for_jobs(kube_api, namespace, "work", 2, state="Complete")

    async def settled() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return (
            all(finished(j) and not guarded(j) for j in jobs)
            and (await queue_depth(rabbitmq_url, queue))[0] == 0
        )

    await eventually(settled, within=60, interval=0.3)
    secrets = core.list_namespaced_secret(namespace, label_selector="jobrunner.dev/scaledjob=work")
    assert len(secrets.items) == 2, "message Secrets created by the ServiceAccount"
    assert "Started" in await asyncio.to_thread(events_of, kube_api, namespace, "work")
    assert (await crs.status("work"))["owner"] == "chart-sa"
    leases = client.CoordinationV1Api(kube_api).list_namespaced_lease(release.namespace)
    assert any(lease.spec.holder_identity == "chart-sa" for lease in leases.items)
    assert "Forbidden" not in op.logs(), op.logs()[-3000:]
    assert len(jobs) == 2


def _refused(call: Callable[[], Any]) -> int:
    try:
        call()
    except client.ApiException as exc:
        return int(exc.status)
    return 200


async def test_charts_service_account_is_refused_what_the_operator_must_not_have(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    release: Release,
) -> None:
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    api = sa_client(config)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom, leases = client.CustomObjectsApi(api), client.CoordinationV1Api(api)
    other = "default"
    # What it has, to be sure the token works at all.
    assert _refused(lambda: batch.list_namespaced_job(namespace)) == 200
    assert _refused(lambda: leases.list_namespaced_lease(release.namespace)) == 200
    refused = {
        "list pods": lambda: core.list_namespaced_pod(namespace),
        "get pod logs": lambda: core.read_namespaced_pod_log("any", namespace),
        "list secrets": lambda: core.list_namespaced_secret(namespace),
        "watch secrets": lambda: core.list_namespaced_secret(
            namespace, watch=True, timeout_seconds=1
        ),
        "list secrets in its own namespace": lambda: core.list_namespaced_secret(release.namespace),
        "jobs of another namespace": lambda: batch.list_namespaced_job(other),
        "secrets of another namespace": lambda: core.read_namespaced_secret("x", other),
        # A message Secret is created owned by its Job: never changed, never deleted.
        "patch a Secret": lambda: core.patch_namespaced_secret(
            "x", namespace, {"metadata": {"labels": {"a": "b"}}}
        ),
        "delete a Secret": lambda: core.delete_namespaced_secret("x", namespace),
        "ScaledJobs of another namespace": lambda: custom.list_namespaced_custom_object(
            "jobrunner.dev", "v1alpha1", other, "scaledjobs"
        ),
        "ScaledJobs of every namespace": lambda: custom.list_cluster_custom_object(
            "jobrunner.dev", "v1alpha1", "scaledjobs"
        ),
        "delete a ScaledJob": lambda: custom.delete_namespaced_custom_object(
            "jobrunner.dev", "v1alpha1", namespace, "scaledjobs", "x"
        ),
        "change a ScaledJob's spec": lambda: custom.patch_namespaced_custom_object(
            "jobrunner.dev", "v1alpha1", namespace, "scaledjobs", "x", {"spec": {}}
        ),
        "Leases outside the release namespace": lambda: leases.list_namespaced_lease(namespace),
        "create a Lease in a watched namespace": lambda: leases.create_namespaced_lease(
            namespace, {"metadata": {"name": "x"}, "spec": {}}
        ),
        "keda.sh ScaledJobs (takeover off)": lambda: custom.list_namespaced_custom_object(
            "keda.sh", "v1alpha1", namespace, "scaledjobs"
        ),
        "nodes": lambda: core.list_node(),
    }
    statuses = {what: await asyncio.to_thread(_refused, call) for what, call in refused.items()}
    assert statuses == dict.fromkeys(refused, 403)
