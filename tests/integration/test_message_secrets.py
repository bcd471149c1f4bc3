"""A Job's message Secret on the real API server: made after its Job and owned by it from
its creation, so a refused Job leaves none; one that is already there is used only when
it holds this very body; a crash between the two creates is completed by the message's
redelivery; and with ``mode: file`` the body is in no annotation of the Job."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from jobrunner.core.models import Delivery
from jobrunner.core.protocols import ApiRejected
from jobrunner.kube.client import KubeJobClient, load_api_client
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.rendering.messagesecret import CONFLICT_REASON
from jobrunner.rendering.renderer import RenderedJob, Renderer
from tests.helpers import eventually
from tests.integration.harness import (
    Dispatcher,
    busybox_job,
    drain_queue,
    jobs_of,
    publish,
    queue_depth,
    wait_for_jobs,
)
from tests.integration.operator_harness import token_kubeconfig

pytestmark = [pytest.mark.kube]


def render(namespace: str, body: bytes, ident: str, **delivery: Any) -> RenderedJob:
    scaledjob = parse_scaledjob(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "secrets", "namespace": namespace},
            "spec": {
                "jobTargetRef": {
                    "backoffLimit": 0,
                    "template": {"spec": {"containers": [{"name": "w", "image": "busybox"}]}},
                },
                "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
                "messageDelivery": delivery or {"mode": "file"},
            },
        }
    )
    return Renderer(scaledjob).render(
        Delivery(source="rabbitmq", identity=ident, body=body, message_id=ident)
    )


@pytest.fixture
async def jobs(kubeconfig: Path) -> AsyncIterator[KubeJobClient]:
    jobs = KubeJobClient(load_api_client(str(kubeconfig)))
    try:
        yield jobs
    finally:
        await jobs.close()


def secrets_of(kube_api: client.ApiClient, namespace: str) -> list[Any]:
    return list(client.CoreV1Api(kube_api).list_namespaced_secret(namespace).items)


async def quota(
    kube_api: client.ApiClient, namespace: str, name: str, hard: dict[str, str]
) -> None:
    """A ResourceQuota, waited for until the quota controller has counted what is there
    (before that the API server refuses every create it governs, whatever the count)."""
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": name}, "spec": {"hard": hard}}
    )

    async def counted() -> bool:
        found = await asyncio.to_thread(core.read_namespaced_resource_quota, name, namespace)
        return found.status is not None and found.status.used is not None

    await eventually(counted, within=60, interval=0.2)


async def test_a_job_refused_by_a_resourcequota_leaves_no_secret(
    kube_api: client.ApiClient, namespace: str, jobs: KubeJobClient
) -> None:
    await quota(kube_api, namespace, "no-jobs", {"count/jobs.batch": "0"})
    rendered = render(namespace, b'{"task": "x"}', "over-quota")
    assert rendered.secret is not None
    with pytest.raises(ApiRejected) as refused:
        await jobs.create_job(rendered.job, rendered.secret)
    assert refused.value.status == 403
    assert secrets_of(kube_api, namespace) == [], "the refused Job left its message Secret"


async def test_a_job_refused_as_invalid_leaves_no_secret(
    kube_api: client.ApiClient, namespace: str, jobs: KubeJobClient
) -> None:
    rendered = render(namespace, b'{"task": "x"}', "invalid")
    # What only the API server's validation refuses (a 422), not jobrunner's schema check.
    rendered.job["spec"]["template"]["spec"]["containers"][0]["name"] = "Not_A_DNS_Label"
    with pytest.raises(ApiRejected) as refused:
        await jobs.create_job(rendered.job, rendered.secret)
    assert refused.value.status == 422
    assert secrets_of(kube_api, namespace) == []


async def test_a_refused_message_cannot_lend_its_body_to_a_later_one_with_its_id(
    kube_api: client.ApiClient, namespace: str, jobs: KubeJobClient
) -> None:
    # The swap: a hostile publisher sends id X with its own body while Jobs are refused
    # (here, by a quota); the genuine message X comes later and must get its own body.
    await quota(kube_api, namespace, "no-jobs", {"count/jobs.batch": "0"})
    hostile = render(namespace, b"rm -rf /data", "order-7")
    with pytest.raises(ApiRejected):
        await jobs.create_job(hostile.job, hostile.secret)
    client.CoreV1Api(kube_api).delete_namespaced_resource_quota("no-jobs", namespace)
    genuine = render(namespace, b'{"order": 7}', "order-7")
    assert genuine.name == hostile.name
    created = None

    async def create() -> bool:
        nonlocal created
        try:
            created, _ = await jobs.create_job(genuine.job, genuine.secret)
        except ApiRejected as exc:
            if exc.status != 403:  # 403: the quota's deletion not seen yet
                raise
            return False
        return True

    await eventually(create, within=60, interval=0.5)
    assert created is not None
    [secret] = secrets_of(kube_api, namespace)
    assert base64.b64decode(secret.data["body"]) == b'{"order": 7}'
    [owner] = secret.metadata.owner_references
    assert (owner.kind, owner.name, owner.uid) == (
        "Job",
        genuine.name,
        created["metadata"]["uid"],
    )
    assert secret.metadata.annotations["jobrunner.dev/body-sha256"] == (
        hashlib.sha256(b'{"order": 7}').hexdigest()
    )


async def test_a_secret_already_there_with_another_body_is_refused_and_never_mounted(
    kube_api: client.ApiClient, namespace: str, jobs: KubeJobClient
) -> None:
    rendered = render(namespace, b'{"order": 8}', "order-8")
    assert rendered.secret is not None
    name = rendered.secret["metadata"]["name"]
    # As an older jobrunner left it (created before its refused Job), or anyone could.
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": name},
            "data": {"body": base64.b64encode(b"not this message").decode()},
        },
    )
    with pytest.raises(ApiRejected) as refused:
        await jobs.create_job(rendered.job, rendered.secret)
    assert (refused.value.status, refused.value.reason) == (409, CONFLICT_REASON)
    assert f"Secret {namespace}/{name} already exists and holds another body" in str(refused.value)
    # No Job was made that could mount it, and the Secret is left as it was.
    assert client.BatchV1Api(kube_api).list_namespaced_job(namespace).items == []
    [kept] = secrets_of(kube_api, namespace)
    assert base64.b64decode(kept.data["body"]) == b"not this message"


async def test_an_existing_job_whose_secret_holds_another_body_is_removed_and_refused(
    kube_api: client.ApiClient, namespace: str, jobs: KubeJobClient
) -> None:
    # What an older jobrunner did after a swap: the genuine message's Job, owning the
    # hostile body's Secret. Its redelivery must not adopt it.
    rendered = render(namespace, b'{"order": 9}', "order-9")
    assert rendered.secret is not None
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    job = batch.create_namespaced_job(namespace, rendered.job)
    owner = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": rendered.name,
        "uid": job.metadata.uid,
    }
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": rendered.secret["metadata"]["name"], "ownerReferences": [owner]},
            "data": {"body": base64.b64encode(b"hostile").decode()},
        },
    )
    with pytest.raises(ApiRejected) as refused:
        await jobs.create_job(rendered.job, rendered.secret)
    assert refused.value.reason == CONFLICT_REASON

    async def job_gone() -> bool:
        return not await asyncio.to_thread(lambda: batch.list_namespaced_job(namespace).items)

    await eventually(job_gone, within=30, interval=0.3)


async def test_a_secret_refused_after_its_job_removes_the_job(
    kube_api: client.ApiClient, namespace: str, jobs: KubeJobClient
) -> None:
    await quota(kube_api, namespace, "no-secrets", {"count/secrets": "0"})
    rendered = render(namespace, b'{"task": "x"}', "no-room")
    with pytest.raises(ApiRejected) as refused:
        await jobs.create_job(rendered.job, rendered.secret)
    assert refused.value.status == 403
    assert "the Job's message Secret was refused, so the Job was removed" in str(refused.value)
    batch = client.BatchV1Api(kube_api)

    async def job_gone() -> bool:
        return not await asyncio.to_thread(lambda: batch.list_namespaced_job(namespace).items)

    # Not a Job left waiting for a Secret that will never come.
    await eventually(job_gone, within=30, interval=0.3)
    assert secrets_of(kube_api, namespace) == []


async def test_a_redelivery_makes_the_secret_a_crash_left_out_owned_by_the_job(
    kube_api: client.ApiClient, namespace: str, jobs: KubeJobClient
) -> None:
    rendered = render(namespace, b'{"task": "late"}', "late")
    # What a crash between the two creates leaves: the Job, no Secret.
    job = client.BatchV1Api(kube_api).create_namespaced_job(namespace, rendered.job)
    adopted, created = await jobs.create_job(rendered.job, rendered.secret)
    assert not created
    assert adopted["metadata"]["uid"] == job.metadata.uid
    [secret] = secrets_of(kube_api, namespace)
    assert base64.b64decode(secret.data["body"]) == b'{"task": "late"}'
    [owner] = secret.metadata.owner_references
    assert owner.uid == job.metadata.uid
    # Adopting again changes nothing and costs two reads.
    before = dict(jobs.requests)
    await jobs.create_job(rendered.job, rendered.secret)
    spent = {k: v - before.get(k, 0) for k, v in jobs.requests.items() if v != before.get(k, 0)}
    assert spent == {"GET": 2}


async def test_a_new_job_with_its_secret_costs_one_read_and_two_writes(
    namespace: str, jobs: KubeJobClient
) -> None:
    rendered = render(namespace, b'{"task": "x"}', "cost")
    await jobs.create_job(rendered.job, rendered.secret)
    assert jobs.requests == {"GET": 1, "POST": 2}


@pytest.mark.rabbitmq
async def test_sigkill_between_job_and_secret_recovers_with_the_secret_owned(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    path = manifest(messageDelivery={"mode": "file"})
    first = dispatchers(path, {"JOBRUNNER_DISPATCHER__FAILPOINTS": '["between-job-and-secret"]'})
    await publish(rabbitmq_url, queue, b'{"seconds": 1}', message_id="crash")
    await asyncio.to_thread(first.process.wait, 30)  # type: ignore[union-attr]
    assert first.process.returncode == -9  # type: ignore[union-attr]
    [job] = jobs_of(kube_api, namespace, "work")
    assert secrets_of(kube_api, namespace) == [], "killed between the Job and its Secret"
    second = dispatchers(path)
    await second.settled("ack", 1)
    [done] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    assert done.metadata.uid == job.metadata.uid, "the redelivery adopted the Job"
    [secret] = secrets_of(kube_api, namespace)
    assert base64.b64decode(secret.data["body"]) == b'{"seconds": 1}'
    [owner] = secret.metadata.owner_references
    assert owner.uid == job.metadata.uid
    assert second.terminate() == 0
    assert (await queue_depth(rabbitmq_url, queue))[0] == 0


@pytest.mark.rabbitmq
async def test_with_mode_file_the_body_is_in_no_annotation_and_still_dead_lettered(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    # onJobCreation: the broker forgets the message at once; the failure is dead-lettered
    # from the copy the Job keeps, in its Secret only.
    body = json.dumps({"fail": "failed", "secret-ish": "s3cr3t-token"}).encode()
    dispatchers(
        manifest(
            ackPolicy="onJobCreation",
            messageDelivery={"mode": "file"},
            job_spec=busybox_job(),
        )
    )
    await publish(rabbitmq_url, queue, body, message_id="kept")
    [job] = await wait_for_jobs(kube_api, namespace, "work", 1)
    stored = client.BatchV1Api(kube_api).read_namespaced_job(job.metadata.name, namespace)
    annotations = stored.metadata.annotations or {}
    assert "jobrunner.dev/original-message" not in annotations
    assert "s3cr3t-token" not in json.dumps(annotations)
    everything = json.dumps(client.ApiClient().sanitize_for_serialization(stored))
    assert "s3cr3t-token" not in everything, "nowhere in the Job"
    [dead] = await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=60)
    assert dead.message_id == "kept"
    assert dead.body == body


@pytest.fixture
async def blind_jobs(
    kube_api: client.ApiClient, kubeconfig: Path, namespace: str, tmp_path: Path
) -> AsyncIterator[KubeJobClient]:
    """A client as the chart's ``restrict.secret`` makes the operator: its token may create
    Secrets and Jobs in ``namespace`` but read no Secret, and it is told so."""
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "blind"}})
    rules = [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        },
    ]
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "blind"}, "rules": rules})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "blind"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "blind"},
            "subjects": [{"kind": "ServiceAccount", "name": "blind", "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        "blind", namespace, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    path = token_kubeconfig(kubeconfig, token, tmp_path / "blind.kubeconfig", user="blind")
    jobs = KubeJobClient(load_api_client(str(path)), read_message_secrets=False)
    try:
        yield jobs
    finally:
        await jobs.close()


async def test_a_client_that_may_not_read_secrets_makes_them_blind_and_refuses_one_it_cannot_check(
    kube_api: client.ApiClient, namespace: str, blind_jobs: KubeJobClient
) -> None:
    core = client.CoreV1Api(kube_api)
    # A message through: the Job, then its Secret owned by it, and not one GET of a Secret
    # (the token has no right to: a GET would be a 403 and fail the create).
    rendered = render(namespace, b'{"task": "ok"}', "blind-ok")
    assert rendered.secret is not None
    job, created = await blind_jobs.create_job(rendered.job, rendered.secret)
    assert created
    secret = core.read_namespaced_secret(rendered.secret["metadata"]["name"], namespace)
    assert [o.uid for o in secret.metadata.owner_references] == [job["metadata"]["uid"]]
    # Its redelivery adopts the Job and takes the Secret (409) for the one made for it.
    again, created = await blind_jobs.create_job(rendered.job, rendered.secret)
    assert not created
    assert again["metadata"]["uid"] == job["metadata"]["uid"]
    # A Secret of the name already there, for a Job just made, cannot be checked: refused,
    # the Job removed, never mounting a body that may not be its message's.
    squat = render(namespace, b'{"task": "genuine"}', "blind-squat")
    assert squat.secret is not None
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=squat.secret["metadata"]["name"]),
            data={"body": base64.b64encode(b"someone else's body").decode()},
        ),
    )
    with pytest.raises(ApiRejected) as refused:
        await blind_jobs.create_job(squat.job, squat.secret)
    assert refused.value.status == 409
    assert refused.value.reason == CONFLICT_REASON
    assert "may not read it" in refused.value.message

    async def removed() -> bool:
        names = [j.metadata.name for j in jobs_of(kube_api, namespace, "secrets")]
        return squat.name not in names

    await eventually(removed, within=30, interval=0.2)
