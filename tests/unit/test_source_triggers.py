"""The newer trigger types, checked and resolved without a broker: KEDA's metadata names,
TriggerAuthentication parameters, and the mistakes each refuses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.manifest.triggers import (
    FileSecrets,
    Reach,
    ResolveContext,
    check_trigger,
    resolve_trigger,
)
from jobrunner.manifest.triggers.mqtt import topic_matches


def scaledjob(trigger: dict[str, Any], **spec: Any) -> Any:
    return parse_scaledjob(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": "ns"},
            "spec": {"jobTargetRef": {"template": {}}, "triggers": [trigger], **spec},
        }
    )


async def no_secret(namespace: str, name: str) -> None:
    return None


async def resolve(trigger: dict[str, Any], **spec: Any) -> Any:
    sj = scaledjob(trigger, **spec)
    context = ResolveContext(
        scaledjob=sj,
        trigger=sj.spec.triggers[0],
        authentications={},
        read_secret=no_secret,
        state_dir=Path("."),
        reach=Reach.own(os.environ),
    )
    return (await resolve_trigger(context))[1]


async def test_sqs_takes_kedas_queue_url_and_names_the_queue() -> None:
    resolved = await resolve(
        {
            "type": "aws-sqs-queue",
            "metadata": {
                "queueURL": "https://sqs.eu-west-1.amazonaws.com/123456789012/work.fifo",
                "awsRegion": "eu-west-1",
                "queueLength": "5",
            },
        }
    )
    assert resolved.queue_name == "work.fifo"
    assert resolved.region == "eu-west-1"
    assert resolved.access_key_id is None, "no keys: the AWS SDK's default chain"


async def test_sqs_refuses_a_consumer_timeout_past_the_12_hour_cap() -> None:
    with pytest.raises(ManifestError, match="43200"):
        await resolve(
            {"type": "aws-sqs-queue", "metadata": {"queueURL": "q", "awsRegion": "r"}},
            consumerTimeoutSeconds=50_000,
        )


async def test_redis_streams_reads_kedas_address_and_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    resolved = await resolve(
        {
            "type": "redis-streams",
            "metadata": {
                "address": "redis.ns:6380",
                "stream": "work",
                "consumerGroup": "jobs",
                "passwordFromEnv": "REDIS_PASSWORD",
                "pendingEntriesCount": "10",
            },
        }
    )
    assert (resolved.host, resolved.port, resolved.password) == ("redis.ns", 6380, "s3cret")
    assert resolved.claim_min_idle == 60


async def test_nats_client_url_defaults_to_the_monitoring_endpoints_host() -> None:
    resolved = await resolve(
        {
            "type": "nats-jetstream",
            "metadata": {
                "natsServerMonitoringEndpoint": "nats.ns.svc:8222",
                "stream": "WORK",
                "consumer": "jobs",
                "account": "$G",
            },
        }
    )
    assert resolved.server == "nats://nats.ns.svc:4222"


async def test_mqtt_defaults_to_a_shared_subscription_and_a_stable_client_id() -> None:
    resolved = await resolve(
        {"type": "mqtt", "metadata": {"host": "mqtt://broker:1883", "topic": "devices/+/up"}}
    )
    assert resolved.subscription == "$share/jobrunner-work/devices/+/up"
    assert resolved.client_id == "jobrunner-ns-work"
    assert (resolved.host, resolved.port, resolved.tls) == ("broker", 1883, False)


async def test_mqtt_refuses_a_dead_letter_topic_inside_its_own_filter() -> None:
    with pytest.raises(ManifestError, match="dead letters would come back"):
        await resolve(
            {"type": "mqtt", "metadata": {"host": "mqtt://b", "topic": "#"}},
        )


def test_topic_filters_match_as_mqtt_says() -> None:
    assert topic_matches("devices/+/up", "devices/a/up")
    assert not topic_matches("devices/+/up", "devices/a/b/up")
    assert topic_matches("devices/#", "devices/a/b")
    assert not topic_matches("#", "$SYS/broker")


@pytest.mark.parametrize(
    ("trigger", "field"),
    [
        ({"type": "aws-sqs-queue", "metadata": {"queueUrl": "q", "awsRegion": "r"}}, "queueUrl"),
        ({"type": "redis-streams", "metadata": {"address": "a:1", "stream": "s"}}, "consumerGroup"),
        (
            {"type": "nats-jetstream", "metadata": {"natsServer": "nats://n", "stream": "S"}},
            "consumer",
        ),
        ({"type": "mqtt", "metadata": {"host": "http://b", "topic": "t"}}, "host"),
    ],
)
def test_static_checks_name_the_field(trigger: dict[str, Any], field: str) -> None:
    from jobrunner.manifest.scaledjob import Trigger

    problems = check_trigger(Trigger.model_validate(trigger))
    assert any(p.field == f"metadata.{field}" for p in problems), problems


def rabbitmq(host: str, **metadata: str) -> dict[str, Any]:
    return {"type": "rabbitmq", "metadata": {"queueName": "q", "host": host, **metadata}}


async def test_the_management_api_of_an_amqps_broker_is_reached_over_https() -> None:
    from jobrunner.core.settings import Settings
    from jobrunner.sources.rabbitmq import open_source

    for host, derived in (
        ("amqps://u:pw@rabbit:5671/", "https://rabbit:15671/"),
        ("amqp://u:pw@rabbit:5672/", "http://rabbit:15672/"),
    ):
        trigger = rabbitmq(host)
        resolved = await resolve(trigger)
        source = open_source(resolved, scaledjob=scaledjob(trigger), settings=Settings())
        assert source.management_url == derived, host


@pytest.mark.parametrize(
    ("host", "management", "refused"),
    [
        # Credentials in clear where the AMQP link has them in TLS: refused.
        ("amqps://u:pw@rabbit:5671/", "http://rabbit:15672/", "the AMQP link is amqps"),
        ("amqps://rabbit:5671/", "http://admin:pw@rabbit:15672/", "the AMQP link is amqps"),
        # ... or to a host other than the broker's.
        ("amqp://u:pw@rabbit:5672/", "http://other:15672/", "not the broker's host"),
        # Fine: https anywhere; plain http only where the link sends them in clear already,
        # or with no credentials at all.
        ("amqps://u:pw@rabbit:5671/", "https://mgmt.example:443/", None),
        ("amqp://u:pw@rabbit:5672/", "http://rabbit:15672/", None),
        ("amqps://rabbit:5671/", "http://rabbit:15672/", None),
    ],
)
async def test_a_management_url_never_sends_credentials_in_clear_that_amqp_keeps_secret(
    host: str, management: str, refused: str | None
) -> None:
    trigger = rabbitmq(host, managementURL=management)
    if refused is None:
        assert (await resolve(trigger)).management_url == management
        return
    with pytest.raises(ManifestError, match="managementURL") as caught:
        await resolve(trigger)
    assert refused in str(caught.value)
    assert "pw" not in str(caught.value)


def test_a_management_url_is_http_or_https() -> None:
    from jobrunner.manifest.scaledjob import Trigger

    metadata = {"queueName": "q", "host": "amqp://r/", "managementURL": "ftp://r/"}
    problems = check_trigger(Trigger(type="rabbitmq", metadata=metadata))
    assert [p.field for p in problems] == ["metadata.managementURL"]


def _authentication() -> Any:
    from jobrunner.manifest.scaledjob import TriggerAuthentication

    return TriggerAuthentication.model_validate(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "broker", "namespace": "ns"},
            "spec": {"secretTargetRef": [{"parameter": "host", "name": "creds", "key": "url"}]},
        }
    )


@pytest.mark.parametrize(
    ("reader", "said"),
    [
        # Operator mode reads the cluster's Secrets alone: no manifest file to speak of.
        (no_secret, "not found in the cluster; create it (kubectl create secret generic "
                    "creds -n ns --from-literal=url=...)"),
        (FileSecrets(no_secret, {}), "not found in the cluster or the manifest file;"),
        (FileSecrets(None, {}), "not found in the manifest file;"),
    ],
)  # fmt: skip
async def test_a_missing_secret_is_looked_for_where_this_mode_looks(reader: Any, said: str) -> None:
    trigger = {"type": "rabbitmq", "metadata": {"queueName": "q"}}
    sj = scaledjob({**trigger, "authenticationRef": {"name": "broker"}})
    context = ResolveContext(
        scaledjob=sj,
        trigger=sj.spec.triggers[0],
        authentications={"broker": _authentication()},
        read_secret=reader,
        state_dir=Path("."),
        reach=Reach.own({}),
    )
    with pytest.raises(ManifestError) as caught:
        await context.parameters()
    assert said in str(caught.value)
    assert "Secret ns/creds" in str(caught.value)
