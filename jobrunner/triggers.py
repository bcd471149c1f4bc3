"""Resolves a trigger's connection settings the way KEDA does: ``host`` in metadata,
``hostFromEnv`` (an environment variable of the dispatcher), or a parameter supplied by
the ``authenticationRef``'s TriggerAuthentication, whose ``secretTargetRef`` entries are
read from Secrets in the cluster."""

from __future__ import annotations

import base64
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.config import ManifestError, ScaledJob, Trigger, TriggerAuthentication

SecretReader = Callable[[str, str], Awaitable[Mapping[str, str] | None]]
"""(namespace, name) -> the Secret's base64 data, or None when it does not exist."""


@dataclass(frozen=True)
class RabbitMQTrigger:
    url: str
    queue: str


async def auth_parameters(
    scaledjob: ScaledJob,
    trigger: Trigger,
    authentications: Mapping[str, TriggerAuthentication],
    read_secret: SecretReader,
) -> dict[str, str]:
    ref = trigger.authenticationRef
    if ref is None:
        return {}
    auth = authentications.get(ref.name)
    if auth is None:
        raise ManifestError(
            f"ScaledJob {scaledjob.name}: field spec.triggers[].authenticationRef.name: "
            f"TriggerAuthentication {ref.name!r} is not in the manifest file"
        )
    params: dict[str, str] = {}
    for item in auth.spec.secretTargetRef:
        data = await read_secret(scaledjob.namespace, item.name)
        if data is None:
            raise ManifestError(
                f"TriggerAuthentication {auth.metadata.name}: secretTargetRef {item.parameter}: "
                f"Secret {scaledjob.namespace}/{item.name} not found"
            )
        if item.key not in data:
            raise ManifestError(
                f"TriggerAuthentication {auth.metadata.name}: secretTargetRef {item.parameter}: "
                f"Secret {scaledjob.namespace}/{item.name} has no key {item.key!r}"
            )
        params[item.parameter] = base64.b64decode(data[item.key]).decode()
    for env_ref in auth.spec.env:
        value = os.environ.get(env_ref.name)
        if value is not None:
            params[env_ref.parameter] = value
    return params


@dataclass(frozen=True)
class KafkaTrigger:
    bootstrap_servers: str
    topic: str
    group_id: str
    offset_reset: str
    client_options: dict[str, Any]


def _kafka_security(meta: Mapping[str, str], where: str) -> dict[str, Any]:
    """KEDA's kafka auth parameters (``sasl``, ``username``, ``password``, ``tls``, ``ca``,
    ``cert``, ``key``) as aiokafka client options."""
    options: dict[str, Any] = {}
    sasl = (meta.get("sasl") or "none").lower()
    tls = (meta.get("tls") or "disable").lower() == "enable"
    if tls:
        import ssl

        context = ssl.create_default_context(cadata=meta["ca"] if meta.get("ca") else None)
        if meta.get("cert") and meta.get("key"):
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as pem:
                pem.write(meta["cert"] + "\n" + meta["key"])
            context.load_cert_chain(pem.name)
        options["ssl_context"] = context
    if sasl != "none":
        mechanisms = {
            "plaintext": "PLAIN",
            "scram_sha256": "SCRAM-SHA-256",
            "scram_sha512": "SCRAM-SHA-512",
        }
        if sasl not in mechanisms:
            raise ManifestError(f"{where}: field sasl: {sasl!r} is not one of {sorted(mechanisms)}")
        options.update(
            security_protocol="SASL_SSL" if tls else "SASL_PLAINTEXT",
            sasl_mechanism=mechanisms[sasl],
            sasl_plain_username=meta.get("username", ""),
            sasl_plain_password=meta.get("password", ""),
        )
    elif tls:
        options["security_protocol"] = "SSL"
    return options


async def resolve_kafka(
    scaledjob: ScaledJob,
    trigger: Trigger,
    authentications: Mapping[str, TriggerAuthentication],
    read_secret: SecretReader,
) -> KafkaTrigger:
    meta = dict(trigger.metadata)
    meta.update(await auth_parameters(scaledjob, trigger, authentications, read_secret))
    where = f"ScaledJob {scaledjob.name}: trigger kafka"
    servers = meta.get("bootstrapServers") or (
        os.environ.get(meta["bootstrapServersFromEnv"])
        if meta.get("bootstrapServersFromEnv")
        else None
    )
    for field_name, value in (
        ("bootstrapServers", servers),
        ("topic", meta.get("topic")),
        ("consumerGroup", meta.get("consumerGroup")),
    ):
        if not value:
            raise ManifestError(f"{where}: field metadata.{field_name}: required")
    reset = meta.get("offsetResetPolicy", "latest")
    if reset not in ("earliest", "latest"):
        raise ManifestError(
            f"{where}: field metadata.offsetResetPolicy: earliest or latest, got {reset!r}"
        )
    return KafkaTrigger(
        bootstrap_servers=str(servers),
        topic=meta["topic"],
        group_id=meta["consumerGroup"],
        offset_reset=reset,
        client_options=_kafka_security(meta, where),
    )


async def resolve_rabbitmq(
    scaledjob: ScaledJob,
    trigger: Trigger,
    authentications: Mapping[str, TriggerAuthentication],
    read_secret: SecretReader,
) -> RabbitMQTrigger:
    meta = dict(trigger.metadata)
    meta.update(await auth_parameters(scaledjob, trigger, authentications, read_secret))
    where = f"ScaledJob {scaledjob.name}: trigger rabbitmq"
    host = meta.get("host")
    if not host and meta.get("hostFromEnv"):
        host = os.environ.get(meta["hostFromEnv"])
        if not host:
            raise ManifestError(
                f"{where}: field metadata.hostFromEnv: ${meta['hostFromEnv']} is not set"
            )
    if not host:
        raise ManifestError(
            f"{where}: field metadata.host: give host, hostFromEnv or authenticationRef"
        )
    parsed = urllib.parse.urlsplit(host)
    if parsed.scheme not in ("amqp", "amqps"):
        raise ManifestError(
            f"{where}: field metadata.host: jobrunner consumes over AMQP, got {parsed.scheme!r} "
            "(KEDA's http protocol is for queue length only)"
        )
    if meta.get("vhostName"):
        parsed = parsed._replace(path="/" + urllib.parse.quote(meta["vhostName"], safe=""))
    queue = meta.get("queueName")
    if not queue:
        raise ManifestError(f"{where}: field metadata.queueName: required")
    return RabbitMQTrigger(url=urllib.parse.urlunsplit(parsed), queue=queue)


@dataclass(frozen=True)
class SQLiteTrigger:
    path: Path
    queue: str


def resolve_sqlite(scaledjob: ScaledJob, trigger: Trigger, state_dir: Path) -> SQLiteTrigger:
    """``type: sqlite``: ``queueName`` (required) and ``path`` (default ``queue.db``,
    relative to the local state directory), the embedded queue `jobrunner publish` fills."""
    queue = trigger.metadata.get("queueName")
    if not queue:
        raise ManifestError(
            f"ScaledJob {scaledjob.name}: field spec.triggers[0].metadata.queueName: required "
            "for a sqlite trigger; name the queue that `jobrunner publish` writes to"
        )
    path = Path(trigger.metadata.get("path", "queue.db")).expanduser()
    return SQLiteTrigger(path=path if path.is_absolute() else state_dir / path, queue=queue)
