"""``type: mqtt``: an MQTT 5 topic filter, consumed with QoS 1 through a shared
subscription and a persistent session. KEDA has no MQTT scaler, so the names are
jobrunner's, in KEDA's style.

``host`` (``mqtt://host:1883`` or ``mqtts://host:8883``, or ``hostFromEnv``, or a
TriggerAuthentication ``host``), ``topic`` (a filter; wildcards allowed), ``sharedGroup``
(the ``$share/<group>/`` name; default ``jobrunner-<ScaledJob>``, so every dispatcher of a
ScaledJob shares the work; ``shared: "false"`` subscribes to the plain filter instead,
for one dispatcher per ScaledJob: Mosquitto 2.0.11 does not restore shared
subscriptions from its persistence file after a restart, plain ones it does),
``clientId`` or ``clientIdFromEnv`` (default
``jobrunner-<namespace>-<ScaledJob>``; each dispatcher needs its own, stable across its
restarts, e.g. a StatefulSet pod name from the downward API), ``sessionExpirySeconds``
(how long the broker keeps the session and its unacknowledged messages while the
dispatcher is away; default 86400). Authentication parameters: ``username``,
``password``, ``ca``, ``cert``, ``key``.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.core.naming import dns_label
from jobrunner.manifest.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    one_of,
    raise_problems,
    required,
)

SCHEMES = {"mqtt": (False, 1883), "tcp": (False, 1883), "mqtts": (True, 8883), "ssl": (True, 8883)}


@dataclass(frozen=True)
class MQTTTrigger:
    host: str
    port: int
    tls: bool
    topic: str
    shared_group: str
    client_id: str
    session_expiry: int
    username: str | None = None
    password: str | None = None
    ca: str = ""
    cert: str = ""
    key: str = ""

    shared: bool = True

    @property
    def subscription(self) -> str:
        """The MQTT 5 shared subscription (MQTT 5.0, section 4.8.2), or the plain topic
        filter with ``shared: "false"``."""
        return f"$share/{self.shared_group}/{self.topic}" if self.shared else self.topic


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+`` one level, ``#`` the rest; MQTT
    5.0 section 4.7); topics starting with ``$`` never match a leading wildcard."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    parts, levels = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(parts) == len(levels)


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = required(metadata, "topic")
    if not (metadata.get("host") or metadata.get("hostFromEnv") or has_auth):
        problems.append(Problem("metadata.host", "give host (mqtt://host:1883) or hostFromEnv"))
    host = metadata.get("host")
    if host and urllib.parse.urlsplit(host).scheme not in SCHEMES:
        problems.append(Problem("metadata.host", f"an mqtt:// or mqtts:// URL; got {host!r}"))
    problems += one_of(metadata, "shared", ("true", "false"))
    for key in ("sharedGroup",):
        value = metadata.get(key)
        if value is not None and (not value or any(c in value for c in "/+#")):
            problems.append(Problem(f"metadata.{key}", "a name without '/', '+' or '#'"))
    expiry = metadata.get("sessionExpirySeconds")
    if expiry is not None and not (expiry.isdigit() and int(expiry) <= 0xFFFFFFFF):
        problems.append(Problem("metadata.sessionExpirySeconds", f"whole seconds; got {expiry!r}"))
    return problems


async def _resolve(context: ResolveContext) -> MQTTTrigger:
    meta = await context.parameters()
    where = context.where()
    sj = context.scaledjob
    host = context.from_env(meta, "host")
    if not host:
        raise_problems(where, [Problem("metadata.host", "no broker URL; add host")])
    parsed = urllib.parse.urlsplit(str(host))
    if parsed.scheme not in SCHEMES or not parsed.hostname:
        raise_problems(where, [Problem("metadata.host", f"an mqtt:// URL; got {host!r}")])
    tls, default_port = SCHEMES[parsed.scheme]
    client_id = context.from_env(meta, "clientId") or f"jobrunner-{sj.namespace}-{sj.name}"
    dead_letter = sj.spec.deadLetter.topic or f"jobrunner/dead-letter/{sj.name}"
    if topic_matches(meta["topic"], dead_letter):
        raise_problems(
            where,
            [
                Problem(
                    "spec.deadLetter.topic",
                    f"{dead_letter!r} matches the trigger's topic {meta['topic']!r}: dead "
                    "letters would come back as work; choose a topic outside it",
                )
            ],
        )
    return MQTTTrigger(
        host=str(parsed.hostname),
        port=parsed.port or default_port,
        tls=tls,
        topic=meta["topic"],
        shared_group=meta.get("sharedGroup") or f"jobrunner-{dns_label(sj.name, 40)}",
        client_id=client_id,
        session_expiry=int(meta.get("sessionExpirySeconds") or 86_400),
        username=meta.get("username") or (urllib.parse.unquote(parsed.username or "") or None),
        password=meta.get("password") or (urllib.parse.unquote(parsed.password or "") or None),
        ca=meta.get("ca", ""),
        cert=meta.get("cert", ""),
        key=meta.get("key", ""),
        shared=(meta.get("shared") or "true") == "true",
    )


TRIGGER = TriggerType(
    name="mqtt",
    destination="topic",
    metadata=frozenset(
        {
            "host",
            "hostFromEnv",
            "topic",
            "sharedGroup",
            "shared",
            "clientId",
            "clientIdFromEnv",
            "sessionExpirySeconds",
        }
    ),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.mqtt:open_source",
    summary="an MQTT 5 topic (QoS 1, shared subscription, persistent session)",
)
