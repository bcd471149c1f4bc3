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
