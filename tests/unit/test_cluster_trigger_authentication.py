"""KEDA's rule for where a ClusterTriggerAuthentication's Secrets are, and the two kinds
kept apart in a manifest file (one of each may share a name)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.manifest.triggers import Reach
from jobrunner.manifest.triggers.auth import auth_parameters, cluster_object_namespace


@pytest.mark.parametrize(
    ("env", "pod_namespace", "expected"),
    [
        ({"KEDA_CLUSTER_OBJECT_NAMESPACE": "platform"}, "mine", "platform"),
        ({}, "mine", "mine"),
        ({"KEDA_CLUSTER_OBJECT_NAMESPACE": ""}, None, "keda"),
        ({}, None, "keda"),
    ],
)
def test_the_cluster_object_namespace_is_keda_s(
    tmp_path: Path, env: dict[str, str], pod_namespace: str | None, expected: str
) -> None:
    file = tmp_path / "namespace"
    if pod_namespace is not None:
        file.write_text(pod_namespace + "\n")
    assert cluster_object_namespace(Reach.own(env), pod_namespace=file) == expected


def _file(tmp_path: Path, ref_kind: str) -> Path:
    def auth(kind: str, secret: str) -> dict[str, object]:
        return {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": kind,
            "metadata": {"name": "rabbit"},
            "spec": {"secretTargetRef": [{"parameter": "host", "name": secret, "key": "host"}]},
        }

    scaledjob = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work", "namespace": "apps"},
        "spec": {
            "triggers": [
                {
                    "type": "rabbitmq",
                    "metadata": {"queueName": "q"},
                    "authenticationRef": {"name": "rabbit", "kind": ref_kind},
                }
            ],
            "jobTargetRef": {
                "template": {"spec": {"containers": [{"name": "m", "image": "busybox"}]}}
            },
        },
    }
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump_all(
            [
                auth("TriggerAuthentication", "ns-secret"),
                auth("ClusterTriggerAuthentication", "cluster-secret"),
                scaledjob,
            ]
        )
    )
    return path


@pytest.mark.parametrize(
    ("ref_kind", "read"),
    [
        ("TriggerAuthentication", ("apps", "ns-secret")),
        ("ClusterTriggerAuthentication", ("keda-objects", "cluster-secret")),
    ],
)
def test_a_reference_finds_the_object_of_its_kind_and_its_secrets_where_keda_looks(
    tmp_path: Path, ref_kind: str, read: tuple[str, str]
) -> None:
    manifests = load_manifest(_file(tmp_path, ref_kind))
    [scaledjob] = manifests.scaledjobs
    asked: list[tuple[str, str]] = []

    async def secrets(namespace: str, name: str) -> Mapping[str, str] | None:
        asked.append((namespace, name))
        return {"host": base64.b64encode(b"amqp://h/").decode()}

    reach = Reach.own({"KEDA_CLUSTER_OBJECT_NAMESPACE": "keda-objects"})
    params = asyncio.run(
        auth_parameters(
            scaledjob, scaledjob.spec.triggers[0], manifests.authentications, secrets, reach
        )
    )
    assert params == {"host": "amqp://h/"}
    assert asked == [read]


def test_a_tenant_cannot_reach_a_cluster_trigger_authentication(tmp_path: Path) -> None:
    manifests = load_manifest(_file(tmp_path, "ClusterTriggerAuthentication"))
    [scaledjob] = manifests.scaledjobs

    async def secrets(namespace: str, name: str) -> Mapping[str, str] | None:
        raise AssertionError("no Secret may be read for a tenant")

    with pytest.raises(ManifestError, match="not supported by the operator"):
        asyncio.run(
            auth_parameters(
                scaledjob, scaledjob.spec.triggers[0], manifests.authentications, secrets, Reach()
            )
        )
