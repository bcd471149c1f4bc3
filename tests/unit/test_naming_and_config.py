from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner.core.naming import job_name, message_identity
from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.scaledjob import AckPolicy, ManifestError

KEDA_SCALEDJOB = """
apiVersion: keda.sh/v1alpha1
kind: ScaledJob
metadata:
  name: rabbitmq-consumer
  namespace: default
spec:
  jobTargetRef:
    template:
      spec:
        containers:
        - name: rabbitmq-client
          image: ghcr.io/kedacore/rabbitmq-client:v1.0
          command: ["receive", "amqp://user:PASSWORD@rabbitmq.default.svc.cluster.local:5672"]
        restartPolicy: Never
    backoffLimit: 4
  pollingInterval: 10
  maxReplicaCount: 30
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 2
  scalingStrategy:
    strategy: "custom"
    customScalingQueueLengthDeduction: 1
  triggers:
  - type: rabbitmq
    metadata:
      queueName: hello
      queueLength: "5"
      hostFromEnv: RABBITMQ_HOST
    authenticationRef:
      name: rabbitmq-consumer-trigger
---
apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata:
  name: rabbitmq-consumer-trigger
spec:
  secretTargetRef:
  - parameter: host
    name: rabbitmq-consumer-secret
    key: RabbitMqHost
"""


def test_keda_scaledjob_loads_unchanged_with_keda_defaults(tmp_path: Path) -> None:
    path = tmp_path / "keda.yaml"
    path.write_text(KEDA_SCALEDJOB)
    loaded = load_manifest(path)
    sj = loaded.scaledjobs[0]
    assert sj.spec.maxReplicaCount == 30
    assert sj.spec.successfulJobsHistoryLimit == 3
    assert sj.spec.ackPolicy is AckPolicy.ON_JOB_COMPLETION
    assert sj.spec.triggers[0].metadata["queueName"] == "hello"
    assert "rabbitmq-consumer-trigger" in loaded.authentications


def test_defaults_follow_keda(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        KEDA_SCALEDJOB.replace("  maxReplicaCount: 30\n", "").replace(
            "  successfulJobsHistoryLimit: 3\n  failedJobsHistoryLimit: 2\n", ""
        )
    )
    spec = load_manifest(path).scaledjobs[0].spec
    assert (spec.maxReplicaCount, spec.successfulJobsHistoryLimit, spec.failedJobsHistoryLimit) == (
        100,
        100,
        100,
    )


def test_invalid_manifest_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(KEDA_SCALEDJOB.replace("maxReplicaCount: 30", "maxReplicaCount: lots"))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert str(path) in str(err.value)
    assert "spec.maxReplicaCount" in str(err.value)


def test_misspelt_field_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(KEDA_SCALEDJOB.replace("maxReplicaCount: 30", "maxReplicas: 30"))
    with pytest.raises(ManifestError, match=r"spec\.maxReplicas"):
        load_manifest(path)


def test_job_name_is_stable_and_a_dns_label() -> None:
    name = job_name("My_ScaledJob.with.a.really.long.name.that.goes.on", "id-1")
    assert name == job_name("My_ScaledJob.with.a.really.long.name.that.goes.on", "id-1")
    assert len(name) <= 63
    assert name.replace("-", "").isalnum()
    assert name == name.lower()
    assert job_name("a", "id-1") != job_name("a", "id-2")
    assert job_name("a", "id-1") != job_name("b", "id-1")


def test_identity_without_message_id_ignores_broker_headers() -> None:
    first = message_identity(None, b"body", {"app": "x"})
    redelivered = message_identity(None, b"body", {"app": "x", "x-delivery-count": 2})
    assert first == redelivered
    assert first != message_identity(None, b"body2", {"app": "x"})
    assert message_identity("given", b"body", {}) == "given"
