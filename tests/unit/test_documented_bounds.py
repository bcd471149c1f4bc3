"""Every bound the README documents for a manifest is enforced by ``validate`` (and so by
``run`` and the operator, which parse with the same function), each refusal naming the
field: one row per bound, with the largest value that is allowed beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.cli import main
from jobrunner.core import limits

KIB = 1024
ENV_MOST = limits.env_value_max("JOBRUNNER_MESSAGE")
assert 128 * KIB - 20 < ENV_MOST < 128 * KIB  # the README's "128 KiB less the variable's name"

TRIGGERS: dict[str, dict[str, Any]] = {
    "rabbitmq": {"queueName": "q", "host": "amqp://guest:guest@localhost:5672/"},
    "aws-sqs-queue": {
        "queueURL": "https://sqs.eu-west-1.amazonaws.com/123456789012/q",
        "awsRegion": "eu-west-1",
        "identityOwner": "operator",
    },
    "azure-queue": {"queueName": "q1q", "connectionFromEnv": "AZURE_STORAGE"},
    "redis-streams": {"address": "localhost:6379", "stream": "s", "consumerGroup": "g"},
    "mqtt": {"host": "mqtt://localhost:1883", "topic": "t"},
}

# (the README's words, trigger type, what the row changes, the field the refusal names,
#  the same change at the bound, which is accepted)
BOUNDS: list[tuple[str, str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "SQS caps visibility at 43,200 s (consumerTimeoutSeconds at most 43200)",
        "aws-sqs-queue",
        {"spec": {"consumerTimeoutSeconds": 50000}},
        "spec.consumerTimeoutSeconds",
        {"spec": {"consumerTimeoutSeconds": 43200}},
    ),
    (
        "SQS visibilityTimeout 1 to 43200",
        "aws-sqs-queue",
        {"trigger": {"visibilityTimeout": "43201"}},
        "spec.triggers[0].metadata.visibilityTimeout",
        {"trigger": {"visibilityTimeout": "43200"}},
    ),
    (
        "deadLetter.queue: SQS takes 80",
        "aws-sqs-queue",
        {"spec": {"deadLetter": {"queue": "d" * 81}}},
        "spec.deadLetter.queue",
        {"spec": {"deadLetter": {"queue": "d" * 80}}},
    ),
    (
        "deadLetter.queue: Azure takes 63",
        "azure-queue",
        {"spec": {"deadLetter": {"queue": "p" * 64}}},
        "spec.deadLetter.queue",
        {"spec": {"deadLetter": {"queue": "p" * 63}}},
    ),
    (
        "the poison queue <queue>-poison is a Storage queue name too",
        "azure-queue",
        {"trigger": {"queueName": "q" * 57}},
        "spec.deadLetter.queue",
        {"trigger": {"queueName": "q" * 56}},
    ),
    (
        "maxReplicaCount at most 1000",
        "rabbitmq",
        {"spec": {"maxReplicaCount": 1001}},
        "spec.maxReplicaCount",
        {"spec": {"maxReplicaCount": 1000}},
    ),
    (
        "history limits at most 10,000",
        "rabbitmq",
        {"spec": {"failedJobsHistoryLimit": 10001}},
        "spec.failedJobsHistoryLimit",
        {"spec": {"failedJobsHistoryLimit": 10000}},
    ),
    (
        "maxMessageBytes at most 960 KiB",
        "rabbitmq",
        {"spec": {"messageDelivery": {"maxMessageBytes": 960 * KIB + 1}}},
        "spec.messageDelivery.maxMessageBytes",
        {"spec": {"messageDelivery": {"maxMessageBytes": 960 * KIB}}},
    ),
    (
        "maxEnvBytes at most 128 KiB less the variable's name",
        "rabbitmq",
        {"spec": {"messageDelivery": {"maxEnvBytes": ENV_MOST + 1}}},
        "spec.messageDelivery.maxEnvBytes",
        {"spec": {"messageDelivery": {"maxEnvBytes": ENV_MOST}}},
    ),
    (
        "deadLetter.exchange at most 255 characters",
        "rabbitmq",
        {"spec": {"deadLetter": {"exchange": "x" * 256}}},
        "spec.deadLetter.exchange",
        {"spec": {"deadLetter": {"exchange": "x" * 255}}},
    ),
    (
        "the ScaledJob's name at most 40 characters",
        "rabbitmq",
        {"name": "n" * 41},
        "metadata.name",
        {"name": "n" * 40},
    ),
    (
        "claimMinIdleSeconds at least 2",
        "redis-streams",
        {"trigger": {"claimMinIdleSeconds": "1"}},
        "spec.triggers[0].metadata.claimMinIdleSeconds",
        {"trigger": {"claimMinIdleSeconds": "2"}},
    ),
]


def _manifest(tmp_path: Path, trigger: str, change: dict[str, Any]) -> Path:
    spec: dict[str, Any] = {
        "triggers": [
            {"type": trigger, "metadata": {**TRIGGERS[trigger], **change.get("trigger", {})}}
        ],
        "jobTargetRef": {
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
                }
            }
        },
        **change.get("spec", {}),
    }
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": change.get("name", "work")},
        "spec": spec,
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("trigger", "over", "field", "at"),
    [row[1:] for row in BOUNDS],
    ids=[row[0] for row in BOUNDS],
)
def test_validate_refuses_a_value_past_each_documented_bound(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    trigger: str,
    over: dict[str, Any],
    field: str,
    at: dict[str, Any],
) -> None:
    assert main(["validate", "-f", str(_manifest(tmp_path, trigger, at))]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["validate", "-f", str(_manifest(tmp_path, trigger, over))]) == 2
    err = capsys.readouterr().err
    assert f"field {field}" in err, err
    assert "line " in err, err
