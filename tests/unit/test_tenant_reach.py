"""The tenant model in operator mode: a ScaledJob reaches nothing of the operator's own
process (its environment, the embedded queue's files, its cloud identity) that the
operator's owner did not allow, while `jobrunner run` (the user's own process) keeps
reading its environment and default credentials as before.

Every `*FromEnv` key of every trigger type is taken from the registry, so a key added
later is tested too (and must get a value below to be)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from jobrunner.core.settings import OperatorSettings, Settings
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError, TriggerAuthentication
from jobrunner.manifest.triggers import (
    Reach,
    ResolveContext,
    resolve_trigger,
    tenant_problems,
    trigger_type,
    trigger_types,
)
from jobrunner.operator.resources import wanted_from

MARKER = "s3cret-marker-7f1d"
"""A value of the operator's environment that no tenant may ever see."""

# Minimal valid metadata per type, and for each *FromEnv key a value that type accepts
# (embedding MARKER, so that a refused one can be looked for in every text).
BASE: dict[str, dict[str, str]] = {
    "rabbitmq": {"queueName": "q", "host": "amqp://mq:5672/"},
    "kafka": {"bootstrapServers": "k:9092", "consumerGroup": "g", "topic": "t"},
    "aws-sqs-queue": {"queueURL": "https://sqs.eu-west-1.amazonaws.com/1/q", "awsRegion": "r"},
    "redis-streams": {"address": "redis:6379", "stream": "s", "consumerGroup": "g"},
    "nats-jetstream": {"natsServer": "nats://nats:4222", "stream": "S", "consumer": "c"},
    "mqtt": {"host": "mqtt://mqtt:1883", "topic": "t"},
    "azure-queue": {"queueName": "qqq"},
    "sqlite": {"queueName": "q"},
}
VALUES: dict[tuple[str, str], str] = {
    ("rabbitmq", "hostFromEnv"): f"amqp://u:{MARKER}@mq:5672/",
    ("rabbitmq", "usernameFromEnv"): MARKER,
    ("rabbitmq", "passwordFromEnv"): MARKER,
    ("kafka", "bootstrapServersFromEnv"): f"{MARKER}:9092",
    ("kafka", "consumerGroupFromEnv"): MARKER,
    ("kafka", "topicFromEnv"): MARKER,
    ("aws-sqs-queue", "queueURLFromEnv"): f"https://sqs.eu-west-1.amazonaws.com/1/{MARKER}",
    ("aws-sqs-queue", "awsAccessKeyIDFromEnv"): MARKER,
    ("aws-sqs-queue", "awsSecretAccessKeyFromEnv"): MARKER,
    ("redis-streams", "addressFromEnv"): f"{MARKER}:6379",
    ("redis-streams", "hostFromEnv"): MARKER,
    ("redis-streams", "portFromEnv"): "6380",
    ("redis-streams", "usernameFromEnv"): MARKER,
    ("redis-streams", "passwordFromEnv"): MARKER,
    ("nats-jetstream", "natsServerFromEnv"): f"nats://{MARKER}:4222",
    ("mqtt", "hostFromEnv"): f"mqtt://{MARKER}:1883",
    ("mqtt", "clientIdFromEnv"): MARKER,
    ("azure-queue", "connectionFromEnv"): (
        f"DefaultEndpointsProtocol=http;AccountName=a;AccountKey={MARKER};"
        "QueueEndpoint=http://azurite:10001/a"
    ),
}
# Keys a FromEnv key stands for, dropped from the base so the variable is what is used.
REPLACES = {
    "addressFromEnv": ("address",),
    "hostFromEnv": ("host", "address"),
    "portFromEnv": ("address",),  # an address would give the port
}
# A *FromEnv key needs its partner to resolve (SQS keys come in pairs).
PARTNERS = {
    ("aws-sqs-queue", "awsAccessKeyIDFromEnv"): {"awsSecretAccessKeyFromEnv": "SECRET_KEY"},
    ("aws-sqs-queue", "awsSecretAccessKeyFromEnv"): {"awsAccessKeyID": "id"},
    ("redis-streams", "portFromEnv"): {"host": "redis"},
    ("redis-streams", "hostFromEnv"): {"port": "6379"},
}
VARIABLE = "OPERATOR_SECRET"
USED = {
    ("mqtt", "hostFromEnv"): f"host='{MARKER}'",
    ("redis-streams", "portFromEnv"): "port=6380",
    ("redis-streams", "addressFromEnv"): f"host='{MARKER}'",
}
"""How a variable's value shows in the resolved settings, where it is not verbatim."""


def from_env_keys() -> list[tuple[str, str]]:
    found = set()
    for name in trigger_types():
        kind = trigger_type(name)
        found |= {(kind.name, key) for key in kind.metadata if key.endswith("FromEnv")}
    return sorted(found)


def environ(key: tuple[str, str]) -> dict[str, str]:
    return {VARIABLE: VALUES[key], "SECRET_KEY": "sk", "KEY_ID": "id"}


def trigger_for(kind: str, key: str, *, auth: str | None = None) -> dict[str, Any]:
    metadata = dict(BASE[kind])
    for replaced in (*REPLACES.get(key, ()), key[: -len("FromEnv")]):
        metadata.pop(replaced, None)
    metadata[key] = VARIABLE
    metadata.update(PARTNERS.get((kind, key), {}))
    trigger: dict[str, Any] = {"type": kind, "metadata": metadata}
    if auth:
        trigger["authenticationRef"] = {"name": auth}
    return trigger


def scaledjob_obj(trigger: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "work", "namespace": "team-a", "generation": 1, "uid": "u1"},
        "spec": {"jobTargetRef": {"template": {}}, "triggers": [trigger], **spec},
    }


def auth_obj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": name, "namespace": "team-a", "resourceVersion": "7"},
        "spec": spec,
    }


def b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


async def resolve(
    trigger: dict[str, Any],
    reach: Reach,
    *,
    auths: dict[str, dict[str, Any]] | None = None,
    secrets: dict[str, dict[str, str]] | None = None,
    **spec: Any,
) -> Any:
    sj = parse_scaledjob(scaledjob_obj(trigger, **spec))
    authentications = {
        name: TriggerAuthentication.model_validate(obj) for name, obj in (auths or {}).items()
    }

    async def read_secret(namespace: str, name: str) -> dict[str, str] | None:
        assert namespace == "team-a", "only the ScaledJob's own namespace"
        found = (secrets or {}).get(name)
        return {k: b64(v) for k, v in found.items()} if found is not None else None

    context = ResolveContext(
        scaledjob=sj,
        trigger=sj.spec.triggers[0],
        authentications=authentications,
        read_secret=read_secret,
        state_dir=Path("/nonexistent-state"),
        reach=reach,
    )
    return (await resolve_trigger(context))[1]


def tenants(env: dict[str, str], **kwargs: Any) -> Reach:
    return Reach.for_tenants(env, **kwargs)


def assert_refusal(text: str, *, field: str) -> None:
    assert field in text
    assert f"${VARIABLE}" in text, "the variable's name (the tenant's own words) is said"
    assert "tenant_env_allow_list" in text
    assert "tenantEnvAllowList" in text
    assert "secretTargetRef" in text, "what to do instead"
    assert "team-a" in text
    assert MARKER not in text, "the value is never said"


def test_every_from_env_key_of_every_trigger_type_has_a_test_value() -> None:
    missing = sorted(set(from_env_keys()) - set(VALUES))
    assert missing == [], f"give these *FromEnv keys a value in VALUES: {missing}"


@pytest.mark.parametrize("key", from_env_keys(), ids="/".join)
async def test_from_env_key_in_operator_mode_is_refused_without_its_value(
    key: tuple[str, str],
) -> None:
    kind, name = key
    with pytest.raises(ManifestError) as refused:
        await resolve(trigger_for(kind, name), tenants(environ(key)))
    assert_refusal(str(refused.value), field=f"metadata.{name}")


@pytest.mark.parametrize("key", from_env_keys(), ids="/".join)
def test_from_env_key_in_operator_mode_is_invalid_spec_before_anything_is_read(
    key: tuple[str, str],
) -> None:
    kind, name = key
    want = wanted_from(scaledjob_obj(trigger_for(kind, name)), reach=tenants(environ(key)))
    assert want.scaledjob is None
    assert want.invalid is not None
    assert_refusal(want.invalid, field=f"field spec.triggers[0].metadata.{name}")


@pytest.mark.parametrize("key", from_env_keys(), ids="/".join)
async def test_from_env_key_in_file_mode_reads_the_dispatchers_environment(
    key: tuple[str, str],
) -> None:
    kind, name = key
    resolved = await resolve(trigger_for(kind, name), Reach.own(environ(key)))
    assert USED.get(key, VALUES[key]) in repr(resolved)


@pytest.mark.parametrize("key", from_env_keys(), ids="/".join)
async def test_allow_listed_variable_is_read_in_operator_mode(key: tuple[str, str]) -> None:
    kind, name = key
    allowed = tenants(environ(key), allow_env=[VARIABLE, "SECRET_KEY", "KEY_ID"])
    trigger = trigger_for(kind, name)
    assert wanted_from(scaledjob_obj(trigger), reach=allowed).invalid is None
    spec = {}
    if kind == "aws-sqs-queue" and name == "queueURLFromEnv":
        spec = {}  # no keys: refused for its identity, not for the variable
        with pytest.raises(ManifestError, match="no AWS access keys"):
            await resolve(trigger, allowed, **spec)
        return
    assert await resolve(trigger, allowed, **spec) is not None


def test_a_tenant_reach_keeps_nothing_of_the_environment_but_the_listed_names() -> None:
    reach = Reach.for_tenants({VARIABLE: MARKER, "SHARED": "x"}, allow_env=["SHARED", "UNSET"])
    assert dict(reach.env) == {"SHARED": "x"}
    assert MARKER not in repr(reach)


async def test_refusal_says_the_same_whether_the_variable_is_set_or_not() -> None:
    trigger = trigger_for("rabbitmq", "hostFromEnv")
    texts = []
    for env in ({VARIABLE: f"amqp://{MARKER}@mq/"}, {}):
        with pytest.raises(ManifestError) as refused:
            await resolve(trigger, tenants(env))
        texts.append(str(refused.value))
    assert texts[0] == texts[1], "no oracle for which variables the operator has"


async def test_allow_listed_but_unset_variable_says_the_operators_environment_lacks_it() -> None:
    with pytest.raises(ManifestError, match=r"\$OPERATOR_SECRET is not set in the operator's"):
        await resolve(trigger_for("rabbitmq", "hostFromEnv"), tenants({}, allow_env=[VARIABLE]))


# ------------------------------------------------------------- TriggerAuthentication env


def env_auth() -> dict[str, dict[str, Any]]:
    return {
        "mq": auth_obj(
            "mq",
            env=[{"parameter": "host", "name": VARIABLE}],
            secretTargetRef=[{"parameter": "password", "name": "mq", "key": "password"}],
        )
    }


async def test_trigger_authentication_env_in_operator_mode_is_refused_without_its_value() -> None:
    trigger = {
        "type": "rabbitmq",
        "metadata": {"queueName": "q"},
        "authenticationRef": {"name": "mq"},
    }
    env = {VARIABLE: f"amqp://u:{MARKER}@mq/"}
    with pytest.raises(ManifestError) as refused:
        await resolve(trigger, tenants(env), auths=env_auth(), secrets={"mq": {"password": "p"}})
    text = str(refused.value)
    assert_refusal(text, field="spec.env[0].name")
    assert "TriggerAuthentication mq" in text
    assert "parameter: host" in text

    want = wanted_from(scaledjob_obj(trigger), authentications=env_auth(), reach=tenants(env))
    assert want.invalid is not None
    assert_refusal(want.invalid, field="field spec.triggers[0].authenticationRef")
    assert "TriggerAuthentication mq spec.env[0]" in want.invalid


async def test_trigger_authentication_env_in_file_mode_reads_the_dispatchers_environment() -> None:
    trigger = {
        "type": "rabbitmq",
        "metadata": {"queueName": "q"},
        "authenticationRef": {"name": "mq"},
    }
    resolved = await resolve(
        trigger,
        Reach.own({VARIABLE: "amqp://mq:5672/"}),
        auths=env_auth(),
        secrets={"mq": {"password": "p"}},
    )
    assert resolved.url == "amqp://:p@mq:5672/"


async def test_secret_given_from_env_parameter_is_refused_in_operator_mode() -> None:
    # A Secret that holds the *name* of a variable (parameter hostFromEnv) reads the
    # operator's environment just the same.
    trigger = {
        "type": "rabbitmq",
        "metadata": {"queueName": "q"},
        "authenticationRef": {"name": "mq"},
    }
    auths = {
        "mq": auth_obj(
            "mq", secretTargetRef=[{"parameter": "hostFromEnv", "name": "mq", "key": "k"}]
        )
    }
    with pytest.raises(ManifestError) as refused:
        await resolve(
            trigger,
            tenants({VARIABLE: f"amqp://{MARKER}@mq/"}),
            auths=auths,
            secrets={"mq": {"k": VARIABLE}},
        )
    assert_refusal(str(refused.value), field="metadata.hostFromEnv")


def test_output_destinations_are_checked_like_triggers() -> None:
    outputs = [
        {
            "name": "$return",
            "type": "rabbitmq",
            "metadata": {"queueName": "o", "hostFromEnv": VARIABLE},
        },
        {"name": "side", "type": "sqlite", "metadata": {"queueName": "o"}},
        {
            "name": "other",
            "type": "rabbitmq",
            "metadata": {"queueName": "o"},
            "authenticationRef": {"name": "mq"},
        },
    ]
    obj = scaledjob_obj(
        {"type": "rabbitmq", "metadata": dict(BASE["rabbitmq"])},
        function={"name": "f", "outputs": outputs},
    )
    want = wanted_from(obj, authentications=env_auth(), reach=tenants({VARIABLE: MARKER}))
    assert want.invalid is not None
    assert "spec.function.outputs[0].metadata.hostFromEnv" in want.invalid
    assert (
        "spec.function.outputs[1].type: sqlite: the embedded queue is for jobrunner run --local"
        in want.invalid
    )
    assert (
        "spec.function.outputs[2].authenticationRef: TriggerAuthentication mq spec.env[0]"
        in want.invalid
    )
    assert MARKER not in want.invalid


def test_nothing_is_refused_in_file_mode() -> None:
    sj = parse_scaledjob(scaledjob_obj(trigger_for("rabbitmq", "hostFromEnv")))
    assert tenant_problems(sj, {}, Reach.own({})) == []


# ------------------------------------------------------------- the embedded queue


def test_sqlite_trigger_is_invalid_spec_in_operator_mode() -> None:
    obj = scaledjob_obj({"type": "sqlite", "metadata": {"queueName": "q", "path": "/etc/x.db"}})
    want = wanted_from(obj, reach=tenants({}))
    assert want.invalid == (
        "field spec.triggers[0].type: sqlite: the embedded queue is for jobrunner run --local, "
        "and the operator does not serve it; use a broker"
    )


async def test_sqlite_trigger_is_refused_when_resolved_for_a_tenant_and_works_in_file_mode() -> (
    None
):
    trigger = {"type": "sqlite", "metadata": {"queueName": "q", "path": "q.db"}}
    with pytest.raises(ManifestError, match="embedded queue is for jobrunner run --local"):
        await resolve(trigger, tenants({}))
    resolved = await resolve(trigger, Reach.own({}))
    assert resolved.path == Path("/nonexistent-state/q.db")


# ------------------------------------------------------------- SQS identity


def sqs(**metadata: str) -> dict[str, Any]:
    return {"type": "aws-sqs-queue", "metadata": {**BASE["aws-sqs-queue"], **metadata}}


def sqs_keys(
    **pod_identity: str,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    spec: dict[str, Any] = {
        "secretTargetRef": [
            {"parameter": "awsAccessKeyID", "name": "aws", "key": "id"},
            {"parameter": "awsSecretAccessKey", "name": "aws", "key": "secret"},
        ]
    }
    trigger = sqs()
    trigger["authenticationRef"] = {"name": "aws"}
    return trigger, {"aws": auth_obj("aws", **spec)}, {"aws": {"id": "AKIA1", "secret": "s"}}


async def test_sqs_without_keys_in_operator_mode_is_refused() -> None:
    for metadata in ({}, {"identityOwner": "pod"}):
        with pytest.raises(ManifestError) as refused:
            await resolve(sqs(**metadata), tenants({}, operator_identity=True))
        text = str(refused.value)
        assert "no AWS access keys" in text
        assert "identityOwner: pod" in text
        assert "awsAccessKeyID and awsSecretAccessKey from a Secret of namespace team-a" in text


async def test_sqs_operator_identity_needs_the_owners_consent() -> None:
    with pytest.raises(ManifestError) as refused:
        await resolve(sqs(identityOwner="operator"), tenants({}))
    text = str(refused.value)
    assert "field metadata.identityOwner" in text
    assert "allow_operator_identity" in text
    assert "allowOperatorIdentity" in text
    resolved = await resolve(sqs(identityOwner="operator"), tenants({}, operator_identity=True))
    assert resolved.access_key_id is None, "the operator's own default chain, as allowed"


async def test_sqs_with_keys_from_a_secret_works_in_operator_mode() -> None:
    trigger, auths, secrets = sqs_keys()
    resolved = await resolve(trigger, tenants({}), auths=auths, secrets=secrets)
    assert (resolved.access_key_id, resolved.secret_access_key) == ("AKIA1", "s")


async def test_sqs_keys_and_operator_identity_together_are_refused_in_both_modes() -> None:
    trigger, auths, secrets = sqs_keys()
    trigger["metadata"]["identityOwner"] = "operator"
    for reach in (tenants({}, operator_identity=True), Reach.own({})):
        with pytest.raises(ManifestError, match="KEDA would ignore the keys"):
            await resolve(trigger, reach, auths=auths, secrets=secrets)


async def test_sqs_without_keys_in_file_mode_uses_the_default_chain_whatever_the_owner() -> None:
    for metadata in ({}, {"identityOwner": "pod"}, {"identityOwner": "operator"}):
        resolved = await resolve(sqs(**metadata), Reach.own({}))
        assert resolved.access_key_id is None


async def test_sqs_pod_identity_is_honoured_or_refused_never_ignored() -> None:
    def with_identity(**pod: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        trigger = sqs()
        trigger["authenticationRef"] = {"name": "id"}
        return trigger, {"id": auth_obj("id", podIdentity=pod)}

    trigger, auths = with_identity(provider="aws")  # identityOwner keda: the operator's
    with pytest.raises(ManifestError, match="allow_operator_identity"):
        await resolve(trigger, tenants({}), auths=auths)
    assert (
        await resolve(trigger, tenants({}, operator_identity=True), auths=auths)
    ).access_key_id is None
    trigger, auths = with_identity(provider="aws", identityOwner="workload")
    with pytest.raises(ManifestError, match="no AWS access keys"):
        await resolve(trigger, tenants({}, operator_identity=True), auths=auths)
    trigger, auths = with_identity(provider="azure-workload")
    with pytest.raises(
        ManifestError, match="podIdentity 'azure-workload' gives no AWS credentials"
    ):
        await resolve(trigger, Reach.own({}), auths=auths)
    trigger, auths = with_identity(provider="aws", roleArn="arn:aws:iam::1:role/x")
    with pytest.raises(ManifestError, match="awsRoleArn is not supported"):
        await resolve(trigger, Reach.own({}), auths=auths)
    trigger, auths = with_identity(provider="none")
    assert (await resolve(trigger, Reach.own({}), auths=auths)).access_key_id is None


# ------------------------------------------------------------- Azure credentials


def azure(
    connection: str | None, **auth_spec: Any
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    spec = copy.deepcopy(auth_spec)
    if connection is not None:
        spec["secretTargetRef"] = [{"parameter": "connection", "name": "st", "key": "c"}]
    trigger = {
        "type": "azure-queue",
        "metadata": {"queueName": "qqq"},
        "authenticationRef": {"name": "st"},
    }
    return trigger, {"st": auth_obj("st", **spec)}, {"st": {"c": connection or ""}}


@pytest.mark.parametrize("operator", [True, False], ids=["operator", "file"])
async def test_azure_needs_credentials_in_its_connection_string(operator: bool) -> None:
    reach = tenants({}, operator_identity=True) if operator else Reach.own({})
    keyless = "DefaultEndpointsProtocol=https;AccountName=acct;EndpointSuffix=core.windows.net"
    trigger, auths, secrets = azure(keyless)
    with pytest.raises(ManifestError, match="carries no credentials"):
        await resolve(trigger, reach, auths=auths, secrets=secrets)
    for good in (
        keyless + ";AccountKey=a2V5",
        "BlobEndpoint=https://a.blob;QueueEndpoint=https://a.queue;SharedAccessSignature=sv=1&sig=x",
        "UseDevelopmentStorage=true",
    ):
        trigger, auths, secrets = azure(good)
        assert (await resolve(trigger, reach, auths=auths, secrets=secrets)).connection == good


async def test_azure_account_name_alone_or_pod_identity_is_refused() -> None:
    trigger = {
        "type": "azure-queue",
        "metadata": {"queueName": "qqq", "accountName": "acct"},
        "authenticationRef": {"name": "st"},
    }
    auths = {"st": auth_obj("st")}
    with pytest.raises(ManifestError, match="workload identity"):
        await resolve(trigger, tenants({}, operator_identity=True), auths=auths)
    trigger, auths, secrets = azure(
        "UseDevelopmentStorage=true", podIdentity={"provider": "azure-workload"}
    )
    with pytest.raises(ManifestError, match="podIdentity 'azure-workload' is not supported"):
        await resolve(trigger, tenants({}, operator_identity=True), auths=auths, secrets=secrets)


# ------------------------------------------------------------- settings


def test_operator_settings_read_the_allow_list_and_identity_switch_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert OperatorSettings().tenant_env_names() == []
    assert OperatorSettings().allow_operator_identity is False
    monkeypatch.setenv("JOBRUNNER_OPERATOR__TENANT_ENV_ALLOW_LIST", "SHARED_MQ, REGION,")
    monkeypatch.setenv("JOBRUNNER_OPERATOR__ALLOW_OPERATOR_IDENTITY", "true")
    op = Settings().operator
    assert op.tenant_env_names() == ["SHARED_MQ", "REGION"]
    assert op.allow_operator_identity is True


def test_allow_list_of_things_that_are_not_variable_names_is_refused() -> None:
    with pytest.raises(ValueError, match="not names: 'A;B', '9x'"):
        OperatorSettings(tenant_env_allow_list="A;B, 9x")
