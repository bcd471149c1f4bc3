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

from jobrunner.core.naming import job_name
from tests.helm import CHART, helm
from tests.helpers import eventually
from tests.integration.harness import (
    drain_queue,
    finished,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
)
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
    # The README's out-of-cluster command: the release's namespace and lease group.
    op = operators(
        "chart-sa",
        config=config,
        lease_namespace=release.namespace,
        env={"JOBRUNNER_OPERATOR__LEASE_GROUP": release.service_account},
    )
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
    assert any(
        lease.spec.holder_identity == "chart-sa"
        and lease.metadata.labels["jobrunner.dev/lease-group"] == release.service_account
        for lease in leases.items
    )
    assert "Forbidden" not in op.logs(), op.logs()[-3000:]
    assert len(jobs) == 2


async def test_leases_out_of_the_release_namespace_are_refused_naming_the_role_it_lacks(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    release: Release,
    operators: Callable[..., OperatorProcess],
) -> None:
    # The command the README gave before: Leases in the watched namespace, where the
    # chart's ServiceAccount has no Lease rights (403 on every list, retried for good).
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    op = operators("chart-sa", config=config, lease_namespace=namespace)

    async def said() -> bool:
        return "<release full name>-leases" in op.logs()

    await eventually(said, within=60, interval=0.3)
    line = next(line for line in op.logs().splitlines() if "-leases" in line)
    assert f"no Role in namespace {namespace} granting get, list, watch" in line
    assert "--lease-namespace <release namespace>" in line
    assert "JOBRUNNER_OPERATOR__LEASE_GROUP=<release full name>" in line
    assert op.alive


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
        # Only with httpTrigger.enabled (a right to test any token it is shown).
        "create a TokenReview (httpTrigger off)": lambda: client.AuthenticationV1Api(
            api
        ).create_token_review({"spec": {"token": "not-a-token"}}),
    }
    statuses = {what: await asyncio.to_thread(_refused, call) for what, call in refused.items()}
    assert statuses == dict.fromkeys(refused, 403)


# ---------------------------------------------------------------- a shared cluster
# The chart's switches for a cluster shared by several teams: Secrets restricted to an
# allow-list, an egress NetworkPolicy, a ValidatingAdmissionPolicy on the Jobs the
# operator creates. Each release is the chart installed with those values, and the
# operator (or a client) acts with a TokenRequest token of its ServiceAccount.


@pytest.fixture
def install(
    kube_api: client.ApiClient, kubeconfig: Path, namespace: str
) -> Iterator[Callable[..., Release]]:
    """Install the chart (in a namespace of its own, serving ``watched`` or the test's
    namespace) with extra ``--set``/``--set-json`` arguments; uninstalled afterwards."""
    core = client.CoreV1Api(kube_api)
    made: list[Release] = []

    def make(*args: str, watched: tuple[str, ...] = ()) -> Release:
        name = f"jr{uuid.uuid4().hex[:8]}"
        home = f"{name}-system"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=home)))
        made.append(Release(name, home, namespace))
        served = ",".join(watched or (namespace,))
        helm(
            "install", name, str(CHART),
            "--kubeconfig", str(kubeconfig),
            "-n", home,
            "--skip-crds",
            "--set", f"watchNamespaces={{{served}}}",
            "--set", "replicaCount=1",
            "--wait=false",
            *args,
        )  # fmt: skip
        return made[-1]

    yield make
    for release in made:
        helm("uninstall", release.name, "--kubeconfig", str(kubeconfig), "-n", release.namespace,
             check=False)  # fmt: skip
        core.delete_namespace(release.namespace, propagation_policy="Background")


def installed(kubeconfig: Path, release: Release) -> list[dict[str, Any]]:
    """The objects of the release as Helm installed them (`helm get manifest`)."""
    manifest = helm(
        "get", "manifest", release.name, "-n", release.namespace, "--kubeconfig", str(kubeconfig)
    ).stdout
    return [d for d in yaml.safe_load_all(manifest) if d]


def deployment_env(kubeconfig: Path, release: Release, *names: str) -> dict[str, str]:
    """Settings the chart gives the operator's container, for the process these tests run
    in its place (lease timings and ports stay the harness's)."""
    (deployment,) = [d for d in installed(kubeconfig, release) if d["kind"] == "Deployment"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if e["name"] in names}


def secret(name: str, **values: str) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        data={k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    )


def trigger_authentication(namespace: str, name: str, secret_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"secretTargetRef": [{"parameter": "host", "name": secret_name, "key": "host"}]},
    }


RESTRICTED = (
    "--set", "permissions.operator.restrict.secret=true",
    "--set", "permissions.operator.restrict.namesAllowList={broker}",
)  # fmt: skip


async def test_restricted_service_account_gets_only_the_allow_listed_secrets(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    install: Callable[..., Release],
) -> None:
    release = install(*RESTRICTED)
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(namespace, secret("broker", host="amqp://x"))
    core.create_namespaced_secret(namespace, secret("payroll", host="amqp://y"))
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    sa = client.CoreV1Api(sa_client(config))
    calls = {
        "get the allow-listed Secret": lambda: sa.read_namespaced_secret("broker", namespace),
        "get another Secret": lambda: sa.read_namespaced_secret("payroll", namespace),
        "get a Secret that does not exist": lambda: sa.read_namespaced_secret("nope", namespace),
        "list Secrets": lambda: sa.list_namespaced_secret(namespace),
        "get the allow-listed name elsewhere": lambda: sa.read_namespaced_secret(
            "broker", "default"
        ),
        "create a message Secret": lambda: sa.create_namespaced_secret(
            namespace, secret("work-0123456789abcdef-message", body="b")
        ),
    }
    statuses = {what: await asyncio.to_thread(_refused, call) for what, call in calls.items()}
    assert statuses == {
        "get the allow-listed Secret": 200,
        "get another Secret": 403,
        "get a Secret that does not exist": 403,
        "list Secrets": 403,
        "get the allow-listed name elsewhere": 403,
        "create a message Secret": 200,
    }
    # The same ServiceAccount with the default values may get them all (what restrict takes).
    open_release = install()
    config = service_account_kubeconfig(
        kube_api, kubeconfig, open_release, tmp_path / "open.kubeconfig"
    )
    sa = client.CoreV1Api(sa_client(config))
    assert (
        await asyncio.to_thread(_refused, lambda: sa.read_namespaced_secret("payroll", namespace))
        == 200
    )


async def test_operator_with_restricted_secrets_serves_a_scaledjob_end_to_end(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    rabbitmq_url: str,
    install: Callable[..., Release],
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    release = install(*RESTRICTED)
    queue, other_queue = await queues(2)
    core = client.CoreV1Api(kube_api)
    custom = client.CustomObjectsApi(kube_api)
    # "payroll" is a Secret of the namespace that is not on the allow-list; its value must
    # reach nothing a tenant reads.
    marker = f"amqp://payroll-{uuid.uuid4().hex}@nowhere:5672/"
    core.create_namespaced_secret(namespace, secret("broker", host=rabbitmq_url))
    core.create_namespaced_secret(namespace, secret("payroll", host=marker))
    for name, target in (("broker", "broker"), ("payroll", "payroll")):
        custom.create_namespaced_custom_object(
            "jobrunner.dev", "v1alpha1", namespace, "triggerauthentications",
            trigger_authentication(namespace, name, target),
        )  # fmt: skip
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    env = deployment_env(kubeconfig, release, "JOBRUNNER_DISPATCHER__READ_MESSAGE_SECRETS")
    assert env == {"JOBRUNNER_DISPATCHER__READ_MESSAGE_SECRETS": "false"}
    op = operators("chart-sa", config=config, lease_namespace=release.namespace, env=env)

    spec = job_spec()
    spec["template"]["metadata"]["annotations"]["kwok.jobrunner.dev/outcome"] = (
        "{{ message.json.get('outcome', 'succeeded') }}"
    )
    work = scaledjob("work", namespace=namespace, queue=queue, url="", job_spec=spec)
    work["spec"]["triggers"][0] = {
        "type": "rabbitmq",
        "metadata": {"queueName": queue},
        "authenticationRef": {"name": "broker"},
    }
    # The Job owns its message from creation: its failure is dead-lettered from the copy
    # it keeps, which the operator may not read from a Secret here.
    work["spec"]["ackPolicy"] = "onJobCreation"
    work["spec"]["messageDelivery"] = {"mode": "file"}
    await crs.apply(work)
    stolen = scaledjob("stolen", namespace=namespace, queue=other_queue, url="")
    stolen["spec"]["triggers"][0] = {
        "type": "rabbitmq",
        "metadata": {"queueName": other_queue},
        "authenticationRef": {"name": "payroll"},
    }
    await crs.apply(stolen)

    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    await publish(rabbitmq_url, queue, json.dumps({"task": "ok"}).encode(), message_id="ok")
    await publish(
        rabbitmq_url, queue, json.dumps({"task": "bad", "outcome": "failed"}).encode(),
        message_id="bad",
    )  # fmt: skip
    big = json.dumps({"task": "big", "pad": "x" * (100 * 1024)}).encode()
    await publish(rabbitmq_url, queue, big, message_id="big")
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Failed")
    dead = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=60)
    while len(dead) < 2:
        more = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=60)
        assert more, [m.message_id for m in dead]
        dead += more
    by_id = {m.message_id: m for m in dead}
    assert set(by_id) == {"bad", "big"}
    # The failed Job's message, from the copy in its annotations: body and id intact.
    assert json.loads(by_id["bad"].body) == {"task": "bad", "outcome": "failed"}
    # The large one never became a Job: its copy would not fit in one.
    assert by_id["big"].body == big
    assert by_id["big"].headers["x-jobrunner-reason"] == "MessageTooLarge"
    assert "permissions.operator.restrict.secret" in str(by_id["big"].headers["x-jobrunner-detail"])
    assert len(await asyncio.to_thread(jobs_of, kube_api, namespace, "work")) == 2
    # mode: file still works: the operator creates the message Secrets it cannot read.
    secrets = core.list_namespaced_secret(namespace, label_selector="jobrunner.dev/scaledjob=work")
    assert len(secrets.items) == 2

    # The Secret off the list: Ready=False, naming it, in jobrunner's words.
    ready = await crs.wait_condition("stolen", "Ready", "False", reason="InvalidSpec")
    assert "Secret " + namespace + "/payroll" in ready["message"]
    assert "permissions.operator.restrict.namesAllowList" in ready["message"]
    assert "403 Forbidden" in ready["message"]
    events = client.CoreV1Api(kube_api).list_namespaced_event(namespace).items
    readable = [
        json.dumps(await crs.status("stolen")),
        *(e.message or "" for e in events),
        *(json.dumps(client.ApiClient().sanitize_for_serialization(j)) for j in
          await asyncio.to_thread(jobs_of, kube_api, namespace, "stolen")),
        op.logs(),
    ]  # fmt: skip
    assert not any(marker in text or "payroll-" in text for text in readable)
    # The one refusal the operator met was that Secret: it never tried to read a message
    # Secret back (the kept copies are in the Jobs).
    refusals = [line for line in op.logs().splitlines() if "Forbidden" in line]
    assert refusals, "the refusal is logged"
    assert all(f"{namespace}/stolen" in line for line in refusals), refusals


def job_body(
    name: str, *, pod: dict[str, Any] | None = None, container: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A Job labelled as jobrunner's, with extra pod-spec and container fields."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "jobrunner"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "work", "image": "busybox:1.36", **(container or {})}],
                    **(pod or {}),
                }
            },
        },
    }


HOSTILE = {
    "privileged": ({}, {"securityContext": {"privileged": True}}, "privileged container(s) work"),
    "escalation": (
        {}, {"securityContext": {"allowPrivilegeEscalation": True}},
        "container(s) work with allowPrivilegeEscalation: true",
    ),
    "capability": (
        {}, {"securityContext": {"capabilities": {"add": ["CHOWN", "SYS_ADMIN"]}}},
        "container(s) work (SYS_ADMIN) add capabilities beyond the allowed",
    ),
    "hostnetwork": ({"hostNetwork": True}, {}, "host namespaces (hostNetwork: true)"),
    "hostpid": ({"hostPID": True, "hostIPC": True}, {}, "host namespaces (hostPID, hostIPC: true)"),
    "hostpath": (
        {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}, {},
        "hostPath volume(s) root",
    ),
    "init": (
        {"initContainers": [{"name": "setup", "image": "busybox:1.36",
                             "securityContext": {"privileged": True}}]},
        {}, "privileged container(s) setup",
    ),
    "hostport": (
        {}, {"ports": [{"containerPort": 80, "hostPort": 80}]},
        "container(s) work with a hostPort",
    ),
    "seccomp": (
        {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, {},
        "seccomp or AppArmor profile Unconfined for the pod",
    ),
    "apparmor": (
        {}, {"securityContext": {"appArmorProfile": {"type": "Unconfined"}}},
        "seccomp or AppArmor profile Unconfined for work",
    ),
    "procmount": (
        {"hostUsers": False}, {"securityContext": {"procMount": "Unmasked"}},
        "container(s) work with procMount: Unmasked",
    ),
}  # fmt: skip


async def test_admission_policy_refuses_privileged_jobs_from_the_operator_unless_opted_in(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    install: Callable[..., Release],
) -> None:
    core = client.CoreV1Api(kube_api)
    opted = f"{namespace}-privileged"
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(
                name=opted, labels={"jobrunner.dev/allow-privileged-jobs": "true"}
            )
        )
    )
    try:
        release = install(
            "--set", "admissionPolicy.enabled=true", watched=(namespace, opted)
        )  # fmt: skip
        config = service_account_kubeconfig(
            kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig"
        )
        operator = client.BatchV1Api(sa_client(config))
        admin = client.BatchV1Api(kube_api)

        def create(api: client.BatchV1Api, ns: str, body: dict[str, Any], **kw: Any) -> str:
            try:
                api.create_namespaced_job(ns, body, **kw)
            except client.ApiException as exc:
                return f"{exc.status} {json.loads(exc.body).get('message', '')}"
            return "created"

        # The API server loads a new policy from its watch: wait until it refuses.
        privileged = job_body("probe", container={"securityContext": {"privileged": True}})

        async def enforced() -> bool:
            answer = await asyncio.to_thread(create, operator, namespace, privileged, dry_run="All")
            return answer.startswith("403")

        await eventually(enforced, within=60, interval=0.5)

        for name, (pod, container, message) in HOSTILE.items():
            answer = await asyncio.to_thread(
                create, operator, namespace, job_body(name, pod=pod, container=container)
            )
            assert answer.startswith("403 "), (name, answer)
            assert f"Job {namespace}/{name}: {message}" in answer, (name, answer)
            assert "jobrunner.dev/allow-privileged-jobs=true" in answer, answer
        plain = job_body(
            "plain",
            container={"securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"add": ["NET_BIND_SERVICE"]}}},
        )  # fmt: skip
        assert await asyncio.to_thread(create, operator, namespace, plain) == "created"
        # The namespace that opted in takes them from the operator too.
        for name, (pod, container, _) in HOSTILE.items():
            body = job_body(name, pod=pod, container=container)
            assert await asyncio.to_thread(create, operator, opted, body) == "created", name
        # Matched on who asks, not on the label: the same Job from someone else is theirs
        # to answer for (Pod Security Admission's level of the namespace judges it).
        body = job_body("by-admin", container={"securityContext": {"privileged": True}})
        assert await asyncio.to_thread(create, admin, namespace, body, dry_run="All") == "created"
        # Only creation is judged: the operator still patches (and releases) its Jobs.
        patched = await asyncio.to_thread(
            operator.patch_namespaced_job, "privileged", opted,
            {"metadata": {"annotations": {"jobrunner.dev/settled": "ack"}}},
        )  # fmt: skip
        assert patched.metadata.annotations["jobrunner.dev/settled"] == "ack"
    finally:
        core.delete_namespace(opted, propagation_policy="Background")


async def test_every_shared_cluster_switch_installs_and_the_api_server_takes_it(
    kube_api: client.ApiClient, kubeconfig: Path, namespace: str, install: Callable[..., Release]
) -> None:
    destinations = [
        {"name": "rabbitmq", "cidr": "10.20.0.0/24", "except": ["10.20.0.9/32"],
         "ports": [{"port": 5672}, {"port": 15672}]},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "brokers"}},
         "podSelector": {}, "ports": [{"port": 9092, "endPort": 9094}]},
        {"podSelector": {"matchLabels": {"app": "nats"}}, "ports": [{"port": "client"}]},
    ]  # fmt: skip
    release = install(
        *RESTRICTED,
        "--set", "admissionPolicy.enabled=true",
        "--set", "networkPolicy.enabled=true",
        "--set-json", f"networkPolicy.destinations={json.dumps(destinations)}",
    )  # fmt: skip
    status = json.loads(
        helm("status", release.name, "-n", release.namespace, "--kubeconfig", str(kubeconfig),
             "-o", "json").stdout
    )  # fmt: skip
    assert status["info"]["status"] == "deployed"
    # No apiServer.cidrs given: looked up on the cluster (the `kubernetes` Service's
    # ClusterIP, then its EndpointSlices' addresses: this stack's API server advertises
    # the real node's bridge address, deploy/local/node.sh).
    service = client.CoreV1Api(kube_api).read_namespaced_service("kubernetes", "default")
    slices = client.DiscoveryV1Api(kube_api).list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=kubernetes"
    )
    endpoints = [f"{a}/32" for s in slices.items for e in s.endpoints or [] for a in e.addresses]
    assert endpoints, "the API server advertises an address (stack-up's --advertise-address)"
    policy = client.NetworkingV1Api(kube_api).read_namespaced_network_policy(
        f"{release.service_account}-egress", release.namespace
    )
    api_rule = policy.spec.egress[1]
    cidrs = [peer.ip_block.cidr for peer in api_rule.to]
    assert sorted(cidrs) == sorted({f"{service.spec.cluster_ip}/32", *endpoints})
    assert len(policy.spec.egress) == 2 + len(destinations)
    assert policy.spec.egress[3].to[0].pod_selector.match_labels is None, "{}: every pod"
    admission = client.AdmissionregistrationV1Api(kube_api)
    assert admission.read_validating_admission_policy(f"{release.service_account}-jobs")
    assert admission.read_validating_admission_policy_binding(f"{release.service_account}-jobs")
    notes = helm("get", "notes", release.name, "-n", release.namespace, "--kubeconfig",
                 str(kubeconfig)).stdout  # fmt: skip
    assert "get only broker" in notes
    assert "WARNING" not in notes


async def test_operator_dead_letters_a_message_whose_job_the_admission_policy_refuses(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    rabbitmq_url: str,
    install: Callable[..., Release],
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    release = install("--set", "admissionPolicy.enabled=true")
    (queue,) = await queues()
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    operators("chart-sa", config=config, lease_namespace=release.namespace)
    spec = job_spec()
    spec["template"]["spec"]["containers"][0]["securityContext"] = {
        "privileged": "{{ message.json.get('privileged', False) }}"
    }
    await crs.apply(scaledjob("work", namespace=namespace, queue=queue, url=rabbitmq_url,
                              job_spec=spec))  # fmt: skip
    await crs.wait_condition("work", "Ready", "True", reason="DispatcherReady")
    # The policy is loaded by the API server from its watch: the first message may come
    # before it is; the test sends until one is refused.
    refused: list[Any] = []
    for attempt in range(30):
        body = json.dumps({"task": f"root-{attempt}", "privileged": True}).encode()
        await publish(rabbitmq_url, queue, body, message_id=f"root-{attempt}")
        refused = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=5)
        if refused:
            break
    assert refused, "no privileged Job was refused"
    (dead,) = refused
    assert dead.headers["x-jobrunner-reason"] == "ApiRejected"
    detail = str(dead.headers["x-jobrunner-detail"])
    assert f"{release.service_account}-jobs" in detail
    assert "privileged container(s) work" in detail
    names = {j.metadata.name for j in await asyncio.to_thread(jobs_of, kube_api, namespace, "work")}
    assert job_name("work", dead.message_id) not in names
    # A Job without privileges from the same ScaledJob passes.
    await publish(rabbitmq_url, queue, json.dumps({"task": "plain"}).encode(), message_id="plain")

    async def plain_done() -> bool:
        jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "work")
        return any(j.metadata.name == job_name("work", "plain") and finished(j) for j in jobs)

    await eventually(plain_done, within=60, interval=0.3)


def test_helm_install_refuses_what_lint_and_template_refuse(kubeconfig: Path) -> None:
    from tests.unit.test_helm_chart import INSTALLS_AND_CANNOT_WORK

    # --dry-run=server: the install's own render, with the cluster's capabilities and
    # lookups, and nothing created.
    for sets, message in INSTALLS_AND_CANNOT_WORK:
        args = [arg for item in sets for arg in ("--set", item)]
        result = helm(
            "install", "refused", str(CHART), "--kubeconfig", str(kubeconfig), "-n", "default",
            "--skip-crds", "--dry-run=server", *args, check=False,
        )  # fmt: skip
        assert result.returncode != 0, sets
        assert message in result.stderr, (sets, result.stderr)


def test_a_service_monitor_without_its_crd_is_refused_at_install_only(kubeconfig: Path) -> None:
    # The stack has no Prometheus Operator: `helm template` renders the ServiceMonitor (a
    # GitOps render cannot see CRDs), `helm install` says the CRD is missing.
    result = helm(
        "install", "monitored", str(CHART), "--kubeconfig", str(kubeconfig), "-n", "default",
        "--skip-crds", "--dry-run=server", "--set", "serviceMonitor.enabled=true", check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert 'no matches for kind "ServiceMonitor" in version "monitoring.coreos.com/v1"' in (
        result.stderr
    )


async def test_http_trigger_release_reviews_service_account_tokens_as_its_service_account(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    install: Callable[..., Release],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
) -> None:
    """With httpTrigger.enabled the chart's ServiceAccount may create TokenReviews (a
    ClusterRoleBinding of its own, although the release watches one namespace), and the
    operator acting as it lets a ServiceAccount of the ScaledJob's namespace in (202) and
    one of another namespace not (403)."""
    import socket

    import aiohttp

    from tests.integration.test_operator_http import event_headers, http_scaledjob, sa_token

    release = install("--set", "httpTrigger.enabled=true")
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    review = await asyncio.to_thread(
        client.AuthenticationV1Api(sa_client(config)).create_token_review,
        {"spec": {"token": "not-a-token"}},
    )
    assert review.status.authenticated is not True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    op = operators(
        "chart-sa",
        config=config,
        lease_namespace=release.namespace,
        env={
            "JOBRUNNER_OPERATOR__LEASE_GROUP": release.service_account,
            "JOBRUNNER_HTTP__LISTEN_ADDRESS": f"127.0.0.1:{port}",
        },
    )
    await crs.apply(
        http_scaledjob(
            "hook",
            namespace=namespace,
            metadata={"path": f"/{namespace}/hook", "auth": "tokenReview"},
            auth=None,
            jobTargetRef=job_spec(),
        )
    )
    await crs.wait_condition("hook", "Ready", "True", reason="DispatcherReady")
    own = await asyncio.to_thread(sa_token, kube_api, namespace, "poster")
    foreign = await asyncio.to_thread(sa_token, kube_api, release.namespace, "poster")
    url = f"http://127.0.0.1:{port}/{namespace}/hook"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=b'{"task": "t"}', headers=event_headers("r1", own)) as r:
            assert r.status == 202, await r.text()
        async with http.post(url, data=b'{"task": "t"}', headers=event_headers("r2", foreign)) as r:
            assert r.status == 403
    assert len(await asyncio.to_thread(jobs_of, kube_api, namespace, "hook")) == 1
    assert "Forbidden" not in op.logs(), op.logs()[-3000:]
