"""What only the cluster can say: the real API server (and etcd) take every Job and
Secret the default limits admit, at the boundary; the schema jobrunner checks against
is the one this API server publishes; and Job bodies reach it as written (no client-side
model reshaping or refusing them)."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from jobrunner.core.models import Delivery
from jobrunner.kube.client import KubeJobClient, load_api_client
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.rendering.renderer import Renderer, RenderError

pytestmark = [pytest.mark.kube]
ROOT = Path(__file__).resolve().parents[2]


def scaledjob(namespace: str, job_spec: dict[str, Any] | None = None, **delivery: Any) -> Any:
    return parse_scaledjob(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "limits", "namespace": namespace},
            "spec": {
                "jobTargetRef": job_spec
                or {
                    "backoffLimit": 0,
                    "template": {"spec": {"containers": [{"name": "w", "image": "busybox"}]}},
                },
                "triggers": [{"type": "sqlite", "metadata": {"queueName": "q"}}],
                **({"messageDelivery": delivery} if delivery else {}),
            },
        }
    )


def message(body: bytes, ident: str, headers: dict[str, str] | None = None) -> Delivery:
    return Delivery(
        source="rabbitmq", identity=ident, body=body, message_id=ident, headers=headers or {}
    )


BODIES = {
    # The largest body the defaults admit (maxMessageBytes 512 KiB), as text, as binary
    # (base64 in the Secret), and as text that the kubelet escaping doubles.
    "text-max": b"x" * (512 * 1024),
    "binary-max": bytes(range(256)) * 2048,
    "dollars-max": b"$" * (512 * 1024),
    # The largest body that goes in env by default (maxEnvBytes 32 KiB), all dollars.
    "env-max-dollars": b"$" * (32 * 1024),
    # With headers near what AMQP carries.
    "headers": b"y" * (400 * 1024),
}


@pytest.mark.parametrize("case", sorted(BODIES))
async def test_the_api_server_takes_every_job_the_default_limits_admit(
    kubeconfig: Path, namespace: str, case: str
) -> None:
    headers = {f"h{i}": "v" * 1000 for i in range(100)} if case == "headers" else {}
    rendered = Renderer(scaledjob(namespace)).render(message(BODIES[case], f"m-{case}", headers))
    jobs = KubeJobClient(load_api_client(str(kubeconfig)))
    try:
        job, created = await jobs.create_job(rendered.job, rendered.secret)
        assert created
        kept = await jobs.read_secret(namespace, f"{rendered.name}-message")
    finally:
        await jobs.close()
    assert job["metadata"]["name"] == rendered.name
    if rendered.secret is not None:
        assert kept is not None
        assert base64.b64decode(kept["body"]) == BODIES[case]


async def test_a_body_over_the_default_limit_is_refused_before_the_api_server(
    namespace: str,
) -> None:
    with pytest.raises(RenderError) as err:
        Renderer(scaledjob(namespace)).render(message(b"x" * (512 * 1024 + 1), "m-over"))
    assert err.value.reason == "MessageTooLarge"


async def test_job_bodies_reach_the_api_server_as_written(
    kubeconfig: Path, namespace: str, kube_api: client.ApiClient
) -> None:
    # A quantity written as a number is valid for the API server; the kubernetes
    # client's own models (37.x) would refuse it client-side.
    spec = {
        "backoffLimit": 0,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "w",
                        "image": "busybox",
                        "resources": {"limits": {"cpu": 1, "memory": "64Mi"}},
                    }
                ]
            }
        },
    }
    rendered = Renderer(scaledjob(namespace, spec)).render(message(b"{}", "m-quantity"))
    jobs = KubeJobClient(load_api_client(str(kubeconfig)))
    try:
        await jobs.create_job(rendered.job, rendered.secret)
    finally:
        await jobs.close()
    stored = client.BatchV1Api(kube_api).read_namespaced_job(rendered.name, namespace)
    assert stored.spec.template.spec.containers[0].resources.limits["cpu"] == "1"


def test_the_vendored_job_schema_is_what_this_api_server_publishes(kubeconfig: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deploy" / "local" / "gen-job-schema.py"),
            "--kubeconfig",
            str(kubeconfig),
            "--check",
            str(ROOT / "jobrunner" / "schemas" / "batch-v1-job.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
