"""A ClusterTriggerAuthentication in file mode is resolved as KEDA resolves it: its
Secrets are read in KEDA's cluster object namespace ($KEDA_CLUSTER_OBJECT_NAMESPACE), never
in the ScaledJob's — checked on the stack's API server, with a decoy Secret of the same
name in the ScaledJob's namespace."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from jobrunner.kube.client import KubeJobClient, load_api_client
from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.manifest.triggers import FileSecrets, Reach, ResolveContext, resolve_trigger

GOOD = "amqp://cluster-object:secret@rabbit.example:5672/"
DECOY = "amqp://decoy:wrong@decoy.example:5672/"


def _secret(core: client.CoreV1Api, namespace: str, host: str) -> None:
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="rabbit-conn"),
            data={"host": base64.b64encode(host.encode()).decode()},
        ),
    )


@pytest.fixture
def object_namespace(kube_api: Any) -> Iterator[str]:
    """A second fresh namespace: KEDA's cluster object namespace for the test."""
    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


def _manifest(tmp_path: Path, namespace: str, kind: str) -> Path:
    docs = [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": kind,
            "metadata": {
                "name": "rabbit",
                **({"namespace": namespace} if kind == "TriggerAuthentication" else {}),
            },
            "spec": {
                "secretTargetRef": [{"parameter": "host", "name": "rabbit-conn", "key": "host"}]
            },
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {
                "triggers": [
                    {
                        "type": "rabbitmq",
                        "metadata": {"queueName": "q"},
                        "authenticationRef": {"name": "rabbit", "kind": kind},
                    }
                ],
                "jobTargetRef": {
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "main", "image": "busybox"}],
                        }
                    }
                },
            },
        },
    ]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


async def _resolve(path: Path, kubeconfig: Path, env: dict[str, str]) -> Any:
    manifests = load_manifest(path)
    [scaledjob] = manifests.scaledjobs
    jobs = KubeJobClient(load_api_client(str(kubeconfig), None))
    try:
        _, resolved = await resolve_trigger(
            ResolveContext(
                scaledjob=scaledjob,
                trigger=scaledjob.spec.triggers[0],
                authentications=manifests.authentications,
                read_secret=FileSecrets(jobs.read_secret, manifests.secrets),
                state_dir=path.parent,
                reach=Reach.own(env),
            )
        )
    finally:
        await jobs.close()
    return resolved


def test_a_cluster_trigger_authentication_reads_its_secrets_in_the_cluster_object_namespace(
    kube_api: Any, kubeconfig: Path, namespace: str, object_namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(kube_api)
    _secret(core, object_namespace, GOOD)
    _secret(core, namespace, DECOY)
    path = _manifest(tmp_path, namespace, "ClusterTriggerAuthentication")
    env = {"KEDA_CLUSTER_OBJECT_NAMESPACE": object_namespace}
    resolved = asyncio.run(_resolve(path, kubeconfig, env))
    assert resolved.url == GOOD
    # A TriggerAuthentication of the same spec still reads the ScaledJob's namespace.
    namespaced = _manifest(tmp_path, namespace, "TriggerAuthentication")
    assert asyncio.run(_resolve(namespaced, kubeconfig, env)).url == DECOY


def test_a_cluster_trigger_authentication_without_its_secret_names_where_it_looked(
    kube_api: Any, kubeconfig: Path, namespace: str, object_namespace: str, tmp_path: Path
) -> None:
    _secret(client.CoreV1Api(kube_api), namespace, DECOY)  # the wrong place
    path = _manifest(tmp_path, namespace, "ClusterTriggerAuthentication")
    env = {"KEDA_CLUSTER_OBJECT_NAMESPACE": object_namespace}
    with pytest.raises(ManifestError) as caught:
        asyncio.run(_resolve(path, kubeconfig, env))
    text = str(caught.value)
    assert f"Secret {object_namespace}/rabbit-conn not found" in text
    assert "KEDA_CLUSTER_OBJECT_NAMESPACE" in text
