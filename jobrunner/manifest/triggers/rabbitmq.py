"""``type: rabbitmq``: KEDA's RabbitMQ scaler metadata, consumed over AMQP.

``host`` (an ``amqp://`` or ``amqps://`` URL), ``hostFromEnv`` or a TriggerAuthentication
``host`` parameter; ``queueName``; ``vhostName`` overrides the URL's vhost. TLS and
credentials as KEDA's TriggerAuthentication parameters (or ``usernameFromEnv`` and
``passwordFromEnv`` in metadata): ``username``, ``password``,
``tls: enable``, ``ca``, ``cert``, ``key``, ``keyPassword``; ``unsafeSsl: "true"`` in
metadata skips verifying the broker's certificate. ``managementURL`` (jobrunner's): where
the management API is asked for the queue's dead-letter exchange and delivery limit
(``http://`` or ``https://``; by default the broker's host at ``https://…:15671`` for
amqps, ``http://…:15672`` for amqp); credentials go over plain http only where the AMQP
link already sends them in clear — a plain amqp link to the same host. KEDA's
queue-length keys (``mode``, ``value``, ...) are accepted and ignored: a push dispatcher
takes every message as it arrives.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.manifest.triggers import (
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
    """amqp:// or amqps://, with the credentials (never logged)."""
    queue: str
    tls: bool = False
    """TLS on: an amqps:// URL, or KEDA's ``tls: enable``."""
    ca: str = ""
    """PEM of the CA that signed the broker's certificate (else the system's CAs)."""
    cert: str = ""
    key: str = ""
    key_password: str = ""
    unsafe_ssl: bool = False
    """KEDA's ``unsafeSsl``: do not verify the broker's certificate."""
    management_url: str = ""
    """``managementURL``: http(s) URL of the management API; "" derives it from ``url``."""


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = required(metadata, "queueName")
    if not (metadata.get("host") or metadata.get("hostFromEnv") or has_auth):
        problems.append(Problem("metadata.host", "give host, hostFromEnv or an authenticationRef"))
    host = metadata.get("host")
    if host and urllib.parse.urlsplit(host).scheme not in ("amqp", "amqps"):
        problems.append(_not_amqp(host))
    management = metadata.get("managementURL")
    if management and urllib.parse.urlsplit(management).scheme not in ("http", "https"):
        problems.append(
            Problem(
                "metadata.managementURL",
                "the management API's URL: http:// or https:// (https:// to send credentials "
                "to a host other than the broker's, or when the broker is amqps)",
            )
        )
    problems += one_of(metadata, "protocol", ("auto", "amqp"))
    problems += one_of(metadata, "unsafeSsl", ("true", "false"))
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
    host = context.from_env(meta, "host")
    if not host and meta.get("hostFromEnv"):
        raise_problems(
            where,
            [Problem("metadata.hostFromEnv", context.reach.unset(meta["hostFromEnv"]))],
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
    username = context.from_env(meta, "username")
    password_given = context.from_env(meta, "password")
    if username or password_given:
        # KEDA's username/password parameters win over credentials in the host URL.
        user = urllib.parse.quote(username or parsed.username or "", safe="")
        password = urllib.parse.quote(password_given or "", safe="")
        host_port = parsed.netloc.rsplit("@", 1)[-1]
        parsed = parsed._replace(netloc=f"{user}:{password}@{host_port}")
    tls = parsed.scheme == "amqps" or meta.get("tls", "").lower() == "enable"
    if tls and parsed.scheme == "amqp":
        parsed = parsed._replace(scheme="amqps")
    management = meta.get("managementURL", "")
    if why := _clear_credentials(management, parsed):
        raise_problems(where, [Problem("metadata.managementURL", why)])
    return RabbitMQTrigger(
        url=urllib.parse.urlunsplit(parsed),
        management_url=management,
        queue=meta["queueName"],
        tls=tls,
        ca=meta.get("ca", ""),
        cert=meta.get("cert", ""),
        key=meta.get("key", ""),
        key_password=meta.get("keyPassword", ""),
        unsafe_ssl=meta.get("unsafeSsl", "").lower() == "true",
    )


def _clear_credentials(management: str, amqp: urllib.parse.SplitResult) -> str | None:
    """Why ``management`` would send credentials in clear where the AMQP link does not
    (None when it would not): over plain http, credentials (its own or the link's) go only
    to the host of a plain amqp link, whose AMQP handshake already sends them in clear —
    never anywhere when the link is amqps, and never to another host."""
    if not management:
        return None
    parsed = urllib.parse.urlsplit(management)
    if parsed.scheme != "http" or not (parsed.username or amqp.username):
        return None
    if amqp.scheme == "amqp" and (parsed.hostname or "") == (amqp.hostname or ""):
        return None
    link = "the AMQP link is amqps" if amqp.scheme == "amqps" else "it is not the broker's host"
    return (
        f"credentials would go over plain http to {parsed.hostname}, where {link}; use an "
        "https:// managementURL"
    )


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
            "managementURL",
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
