"""``type: kafka``: KEDA's Apache Kafka scaler metadata. ``bootstrapServers`` (or
``bootstrapServersFromEnv``), ``consumerGroup``, ``topic``, ``offsetResetPolicy``
(``latest``, KEDA's default, or ``earliest``); authentication as KEDA's: ``sasl``
(plaintext, scram_sha256, scram_sha512), ``username``, ``password``, ``tls: enable``,
``ca``, ``cert``, ``key``. jobrunner's own: ``replyTopics``, the topics a message's
reply-topic header may name (comma-separated; ``prefix*`` for a prefix; none: no reply
is sent, and a message asking for one is dead-lettered ``ReplyFailed``; see
jobrunner.dispatch.replies)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobrunner.manifest.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    one_of,
    raise_problems,
)

SASL_MECHANISMS = {
    "plaintext": "PLAIN",
    "scram_sha256": "SCRAM-SHA-256",
    "scram_sha512": "SCRAM-SHA-512",
}


@dataclass(frozen=True)
class KafkaTrigger:
    bootstrap_servers: str
    topic: str
    group_id: str
    offset_reset: str
    sasl: str = "none"
    tls: bool = False
    username: str = ""
    password: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""
    reply_topics: tuple[str, ...] = ()
    """``replyTopics``: topics (or ``prefix*``) a reply may go to."""
    extra: dict[str, Any] = field(default_factory=dict)


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = []
    for key in ("bootstrapServers", "consumerGroup", "topic"):
        if not (metadata.get(key) or metadata.get(f"{key}FromEnv")):
            problems.append(Problem(f"metadata.{key}", f"required (or {key}FromEnv); add it"))
    problems += one_of(metadata, "offsetResetPolicy", ("earliest", "latest"))
    problems += one_of(metadata, "sasl", ("none", *SASL_MECHANISMS))
    problems += one_of(metadata, "tls", ("enable", "disable"))
    for pattern in reply_topics(metadata.get("replyTopics", "")):
        if not _TOPIC.fullmatch(pattern.removesuffix("*")):
            problems.append(
                Problem(
                    "metadata.replyTopics",
                    f"{pattern!r} is not a topic name (letters, digits, '.', '_', '-'; up to "
                    "249), nor one followed by '*' for a prefix ('*' alone would let any "
                    "producer reply into any topic)",
                )
            )
    return problems


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def reply_topics(value: str) -> tuple[str, ...]:
    """``replyTopics`` as its patterns."""
    return tuple(t.strip() for t in value.split(",") if t.strip())


def topic_allowed(topic: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``topic`` (a valid topic name) is one of ``patterns`` or starts with the
    prefix of one that ends with ``*``."""
    if not _TOPIC.fullmatch(topic):
        return False
    return any(topic.startswith(p[:-1]) if p.endswith("*") else topic == p for p in patterns)


async def _resolve(context: ResolveContext) -> KafkaTrigger:
    meta = await context.parameters()
    where = context.where()
    values = {k: context.from_env(meta, k) for k in ("bootstrapServers", "consumerGroup", "topic")}
    raise_problems(
        where,
        [Problem(f"metadata.{k}", "required; add it") for k, v in values.items() if not v],
    )
    sasl = (meta.get("sasl") or "none").lower()
    raise_problems(
        where,
        one_of({"sasl": sasl}, "sasl", ("none", *SASL_MECHANISMS))
        + one_of(meta, "offsetResetPolicy", ("earliest", "latest")),
    )
    return KafkaTrigger(
        bootstrap_servers=str(values["bootstrapServers"]),
        topic=str(values["topic"]),
        group_id=str(values["consumerGroup"]),
        offset_reset=meta.get("offsetResetPolicy", "latest"),
        sasl=sasl,
        tls=(meta.get("tls") or "disable").lower() == "enable",
        username=meta.get("username", ""),
        password=meta.get("password", ""),
        ca=meta.get("ca", ""),
        cert=meta.get("cert", ""),
        key=meta.get("key", ""),
        reply_topics=reply_topics(meta.get("replyTopics", "")),
    )


TRIGGER = TriggerType(
    name="kafka",
    destination="topic",
    metadata=frozenset(
        {
            "bootstrapServers",
            "bootstrapServersFromEnv",
            "consumerGroup",
            "consumerGroupFromEnv",
            "topic",
            "topicFromEnv",
            "offsetResetPolicy",
            "sasl",
            "tls",
            # KEDA's lag-based scaling keys: accepted, meaningless for push delivery.
            "lagThreshold",
            "activationLagThreshold",
            "allowIdleConsumers",
            "scaleToZeroOnInvalidOffset",
            "excludePersistentLag",
            "version",
            "partitionLimitation",
            "limitToPartitionsWithLag",
            "ensureEvenDistributionOfPartitions",
            "unsafeSsl",
            "replyTopics",
        }
    ),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.kafka:open_source",
    sink="jobrunner.sources.kafka:open_sink",
    summary="an Apache Kafka topic, read by a consumer group",
)
