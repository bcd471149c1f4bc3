"""``type: rabbitmq``: KEDA's RabbitMQ scaler metadata, consumed over AMQP.

``host`` (an ``amqp://`` or ``amqps://`` URL), ``hostFromEnv`` or a TriggerAuthentication
``host`` parameter; ``queueName``; ``vhostName`` overrides the URL's vhost. KEDA's
queue-length keys (``mode``, ``value``, ...) are accepted and ignored: a push dispatcher
takes every message as it arrives.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    one_of,
    raise_problems,
    required,
)


@dataclass(frozen=True)
class RabbitMQTrigger:
    url: str
    queue: str


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = required(metadata, "queueName")
    if not (metadata.get("host") or metadata.get("hostFromEnv") or has_auth):
        problems.append(Problem("metadata.host", "give host, hostFromEnv or an authenticationRef"))
    host = metadata.get("host")
    if host and urllib.parse.urlsplit(host).scheme not in ("amqp", "amqps"):
        problems.append(_not_amqp(host))
    problems += one_of(metadata, "protocol", ("auto", "amqp"))
    return problems


def _not_amqp(host: str) -> Problem:
    scheme = urllib.parse.urlsplit(host).scheme
    return Problem(
        "metadata.host",
        f"jobrunner consumes over AMQP: use an amqp:// or amqps:// URL, got {scheme!r} "
        "(KEDA's http protocol reads the queue length only)",
    )


async def _resolve(context: ResolveContext) -> RabbitMQTrigger:
    meta = await context.parameters()
    where = context.where()
    host = meta.get("host")
    if not host and meta.get("hostFromEnv"):
        host = os.environ.get(meta["hostFromEnv"])
        if not host:
            raise_problems(
                where,
                [Problem("metadata.hostFromEnv", f"${meta['hostFromEnv']} is not set")],
            )
    if not host:
        raise_problems(
            where, [Problem("metadata.host", "give host, hostFromEnv or an authenticationRef")]
        )
    assert host is not None
    parsed = urllib.parse.urlsplit(host)
    if parsed.scheme not in ("amqp", "amqps"):
        raise_problems(where, [_not_amqp(host)])
    if meta.get("vhostName"):
        parsed = parsed._replace(path="/" + urllib.parse.quote(meta["vhostName"], safe=""))
    return RabbitMQTrigger(url=urllib.parse.urlunsplit(parsed), queue=meta["queueName"])


TRIGGER = TriggerType(
    name="rabbitmq",
    destination="queue",
    metadata=frozenset(
        {
            "host",
            "hostFromEnv",
            "usernameFromEnv",
            "passwordFromEnv",
            "queueName",
            "vhostName",
            "protocol",
            # KEDA's queue-length scaling keys: accepted, meaningless for push delivery.
            "mode",
            "value",
            "activationValue",
            "queueLength",
            "useRegex",
            "excludeUnacknowledged",
            "pageSize",
            "operation",
            "timeout",
            "unsafeSsl",
        }
    ),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.rabbitmq:open_source",
    sink="jobrunner.sources.rabbitmq:open_sink",
    summary="a RabbitMQ queue over AMQP 0-9-1",
)
