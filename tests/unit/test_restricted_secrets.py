"""A dispatcher whose RBAC names the Secrets it may read (the chart's
permissions.operator.restrict.secret): it never needs to read a message Secret back, and a
refused TriggerAuthentication Secret is an InvalidSpec in jobrunner's words."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.core.models import Delivery
from jobrunner.core.naming import message_identity
from jobrunner.core.protocols import ApiRejected
from jobrunner.core.settings import Settings
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError, TriggerAuthentication
from jobrunner.manifest.triggers.auth import auth_parameters
from jobrunner.manifest.triggers.reach import Reach
from jobrunner.rendering.renderer import (
    ANNOTATION_ORIGINAL_MESSAGE,
    ORIGINAL_IN_ANNOTATION_MAX,
    Renderer,
    RenderError,
    original_message,
)


def scaledjob(**delivery: Any) -> Any:
    return parse_scaledjob(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "resize", "namespace": "media"},
            "spec": {
                "jobTargetRef": {
                    "template": {"spec": {"containers": [{"name": "w", "image": "busybox"}]}}
                },
                "triggers": [
                    {
                        "type": "rabbitmq",
                        "metadata": {"queueName": "q"},
                        "authenticationRef": {"name": "broker"},
                    }
                ],
                "messageDelivery": delivery or {"mode": "file"},
            },
        }
    )


def delivery(body: bytes) -> Delivery:
    return Delivery(
        source="rabbitmq",
        identity=message_identity("m-1", body, {}),
        body=body,
        message_id="m-1",
        headers={"h": "v"},
    )


def test_read_message_secrets_is_on_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().dispatcher.read_message_secrets is True
    monkeypatch.setenv("JOBRUNNER_DISPATCHER__READ_MESSAGE_SECRETS", "false")
    assert Settings().dispatcher.read_message_secrets is False


@pytest.mark.parametrize("size", [10, 60 * 1024])
def test_copy_in_job_only_keeps_every_copy_that_fits_in_the_jobs_annotations(size: int) -> None:
    body = b"x" * size
    rendered = Renderer(scaledjob(), copy_in_job_only=True).render(delivery(body))
    assert ANNOTATION_ORIGINAL_MESSAGE in rendered.job["metadata"]["annotations"]
    # What the dispatcher dead-letters from needs no Secret at all.
    kept = original_message(rendered.job, None)
    assert kept is not None
    assert kept["body"] == body
    # The pod still gets its body from the message Secret (mode: file), without the copy.
    assert rendered.secret is not None
    assert "original.json" not in rendered.secret["data"]


def test_a_copy_too_large_for_the_job_is_refused_when_secrets_cannot_be_read_back() -> None:
    body = b"x" * (ORIGINAL_IN_ANNOTATION_MAX)  # base64 in the copy: well over the limit
    unrestricted = Renderer(scaledjob()).render(delivery(body))
    assert unrestricted.secret is not None
    assert "original.json" in unrestricted.secret["data"]
    with pytest.raises(RenderError) as refused:
        Renderer(scaledjob(), copy_in_job_only=True).render(delivery(body))
    assert refused.value.reason == "MessageTooLarge"
    assert f"over the {ORIGINAL_IN_ANNOTATION_MAX} kept in its annotations" in str(refused.value)
    assert "permissions.operator.restrict.secret" in str(refused.value)


def test_copy_in_job_only_also_counts_the_templates_own_annotations(tmp_path: Path) -> None:
    # A Job template file's annotations leave less room for the copy.
    (tmp_path / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"annotations": {"big": "y" * (200 * 1024)}},
                "spec": {"template": {"spec": {"containers": [{"name": "w", "image": "b"}]}}},
            }
        )
    )
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize", "namespace": "media"},
        "spec": {
            "jobTemplate": "job.yaml",
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": "q", "host": "amqp://h"}}],
            "messageDelivery": {"mode": "file"},
        },
    }
    sj = parse_scaledjob(doc)
    small = delivery(b"z" * (50 * 1024))  # a copy of ~67 KiB: under 96, over what is left
    assert Renderer(sj, base_dirs=[tmp_path]).render(small).secret is not None
    with pytest.raises(RenderError) as refused:
        Renderer(sj, base_dirs=[tmp_path], copy_in_job_only=True).render(small)
    assert refused.value.reason == "MessageTooLarge"


def authentication() -> TriggerAuthentication:
    return TriggerAuthentication.model_validate(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "broker", "namespace": "media"},
            "spec": {
                "secretTargetRef": [{"parameter": "host", "name": "rabbit-creds", "key": "url"}]
            },
        }
    )


async def test_a_secret_rbac_refuses_is_an_invalid_spec_naming_it_in_our_words() -> None:
    server_text = (
        'secrets "rabbit-creds" is forbidden: User "system:serviceaccount:jr:jr" cannot get '
        'resource "secrets" in API group "" in the namespace "media"'
    )

    async def refused(namespace: str, name: str) -> Mapping[str, str] | None:
        raise ApiRejected(403, "Forbidden", server_text)

    sj = scaledjob()
    with pytest.raises(ManifestError) as error:
        await auth_parameters(
            sj, sj.spec.triggers[0], {"broker": authentication()}, refused, Reach.own({})
        )
    text = str(error.value)
    assert "TriggerAuthentication broker: secretTargetRef host" in text
    assert "Secret media/rabbit-creds" in text
    assert "permissions.operator.restrict.namesAllowList" in text
    assert "system:serviceaccount" not in text, "the server's words stay out of status"


async def test_other_api_refusals_of_a_secret_read_are_not_taken_for_rbac() -> None:
    async def broken(namespace: str, name: str) -> Mapping[str, str] | None:
        raise ApiRejected(400, "BadRequest", "no")

    sj = scaledjob()
    with pytest.raises(ApiRejected):
        await auth_parameters(
            sj, sj.spec.triggers[0], {"broker": authentication()}, broken, Reach.own({})
        )


def test_the_copy_holds_what_a_dead_letter_needs() -> None:
    rendered = Renderer(scaledjob(), copy_in_job_only=True).render(delivery(b'{"a": 1}'))
    kept = json.loads(rendered.job["metadata"]["annotations"][ANNOTATION_ORIGINAL_MESSAGE])
    assert kept["identity"] == "m-1"
    assert kept["headers"] == {"h": "v"}
