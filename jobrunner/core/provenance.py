"""What a Job is told about what made it, beside the message itself (issue #24,
"Provenance for the Job"; README "Provenance: what the Job is told").

Each source names the place it read a message from under a metadata key of its own (a
RabbitMQ queue, a Kafka topic, a NATS subject, an HTTP path, ...). ``destination`` maps
them to one pair, so that a Job, a selector or a dashboard reads the same
``JOBRUNNER_TRIGGER_SOURCE`` whatever the broker, and ``provenance`` gives everything a
Job is told as plain text: its env values (not yet escaped against the kubelet's
``$(VAR)`` expansion: the renderer does that, as for every other message text), its
labels (only values Kubernetes takes as label values) and its annotations (bounded).

Some of this text comes from the message, not the manifest: an MQTT or NATS subscriber
gets whatever topic or subject a publisher chose under its filter, and an HTTP caller
picks its path. It may be long, hold newlines, ``$(SECRET)``, ``/`` or a NUL; nothing
here trusts it (see ``carriable`` and the label and annotation rules below).

Imports only ``jobrunner.core``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobrunner.core.limits import is_label_value
from jobrunner.core.models import (
    ANNOTATION_TRACEPARENT,
    ANNOTATION_TRIGGER_SOURCE,
    LABEL_DELIVERY_COUNT,
    LABEL_REDELIVERED,
    LABEL_TRIGGER_SOURCE,
    LABEL_TRIGGER_TYPE,
    Delivery,
)

DESTINATION_KEYS: Mapping[str, str] = {
    "rabbitmq": "queue",
    "kafka": "topic",
    "aws-sqs-queue": "queue",
    "azure-queue": "queue",
    "redis-streams": "stream",
    # The subject the message was published on (the stream is only where it is kept,
    # and a consumer's filter may be a wildcard over many subjects).
    "nats-jetstream": "subject",
    # The topic the message was published on, not the subscription's filter.
    "mqtt": "topic",
    "sqlite": "queue",
    "http": "path",
}
"""Source type (``Delivery.source``) -> the ``Delivery.metadata`` key naming where the
message came from (what each module in jobrunner.sources puts there)."""

FALLBACK_KEYS = ("path", "subject", "topic", "queue", "stream")
"""For a source not in DESTINATION_KEYS (or one whose key is missing): the first of these
keys its metadata has. So the HTTP trigger's ``path``, or any new source's queue or
topic, maps without an entry here."""

ANNOTATION_VALUE_MAX = 1024
"""Characters of the source's name kept in the ``jobrunner.dev/trigger-source``
annotation at most. A name passed from the message may be long (an MQTT topic can be
64 KiB); a longer one is left out of the annotation rather than cut (a cut name names
another place), and stays whole in the ``jobrunner.dev/source-detail`` annotation and in
the env, both bounded by the renderer's checks of the annotations' 256 KiB and of what a
process can be given."""

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
"""W3C Trace Context ``traceparent`` (version-traceid-parentid-flags)."""


@dataclass(frozen=True)
class Destination:
    """Where a message came from, uniformly: ``kind`` is the metadata key that named it
    (``queue``, ``topic``, ``stream``, ``subject``, ``path``), ``name`` its value."""

    kind: str
    name: str


def destination(delivery: Delivery) -> Destination | None:
    """Where ``delivery`` came from (see DESTINATION_KEYS and FALLBACK_KEYS); None when its
    metadata names no place, or names it with an empty value."""
    metadata = delivery.metadata
    known = DESTINATION_KEYS.get(delivery.source)
    for key in (known, *FALLBACK_KEYS) if known else FALLBACK_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return Destination(kind=key, name=value)
    return None


def carriable(text: str) -> bool:
    """Whether ``text`` can travel as an env value or an annotation as it is: no NUL,
    which no process receives (execve strings end at it). The metadata's JSON in
    ``JOBRUNNER_MESSAGE_METADATA`` carries such a name escaped."""
    return "\x00" not in text


@dataclass(frozen=True)
class Provenance:
    """What a Job is told about what made it, as text: ``env`` (before escaping against
    the kubelet's ``$(VAR)`` expansion), ``labels`` (valid label values only) and
    ``annotations``."""

    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def provenance(
    delivery: Delivery,
    *,
    trigger_type: str,
    trigger_name: str | None,
    active_deadline_seconds: int | None,
    traceparent: str | None,
) -> Provenance:
    """What the Job made for ``delivery`` is told, beside the message (the message id,
    headers, metadata, source type and delivery count, which the renderer always gave).

    ``trigger_type`` is the ScaledJob's trigger ``type`` as written (``apache-kafka`` as
    well as ``kafka``), ``trigger_name`` its optional ``name``.

    **The deadline** is ``active_deadline_seconds``: the Job's ``activeDeadlineSeconds``
    as rendered, given as it is (a duration), never as a time of day. Kubernetes counts
    it from the Job's ``status.startTime``, which is only known once the Job controller
    starts the Job, after this render, and which spans every pod that ``backoffLimit``
    retries; an absolute time computed here would be wrong by however long the Job waited
    (and would make rendering depend on the clock, while the same message must render
    the same Job). A pod that may read its Job gets the exact end as ``startTime`` plus
    this. There is no second, broker deadline to tell: no source makes the Job settle
    its message in time. Where a broker caps how long a message may be held (RabbitMQ's
    ``consumer_timeout``, SQS's 12 hours) the dispatcher hands the message over to the Job
    before the cap, and a Job that then fails is dead-lettered from the copy it keeps; the
    other sources renew their hold while the Job runs; ``ackPolicy: onJobCreation`` acks
    at once. (kedacore/keda #5218, which issue #24 cites, asks only which trigger made a
    Job; a KEDA Job must itself finish inside its broker's lock, which is why its users
    want a deadline. Here that is the dispatcher's job, so the Job's only limit is its
    own.)

    The attempt is ``JOBRUNNER_DELIVERY_COUNT`` (models.Delivery.delivery_count); it
    counts deliveries of the message, not retries of the Job's pods."""
    env = {
        "JOBRUNNER_TRIGGER_TYPE": trigger_type,
        "JOBRUNNER_REDELIVERED": "true" if delivery.redelivered else "false",
    }
    labels = {
        LABEL_DELIVERY_COUNT: str(delivery.delivery_count),
        LABEL_REDELIVERED: env["JOBRUNNER_REDELIVERED"],
    }
    annotations: dict[str, str] = {}
    if is_label_value(trigger_type):
        labels[LABEL_TRIGGER_TYPE] = trigger_type
    if trigger_name and carriable(trigger_name):
        env["JOBRUNNER_TRIGGER_NAME"] = trigger_name
    where = destination(delivery)
    if where is not None and carriable(where.name):
        env["JOBRUNNER_TRIGGER_SOURCE"] = where.name
        env["JOBRUNNER_TRIGGER_SOURCE_KIND"] = where.kind
        if is_label_value(where.name):
            labels[LABEL_TRIGGER_SOURCE] = where.name
        if len(where.name) <= ANNOTATION_VALUE_MAX:
            annotations[ANNOTATION_TRIGGER_SOURCE] = where.name
    if active_deadline_seconds is not None:
        env["JOBRUNNER_ACTIVE_DEADLINE_SECONDS"] = str(active_deadline_seconds)
    if traceparent and _TRACEPARENT.fullmatch(traceparent):
        annotations[ANNOTATION_TRACEPARENT] = traceparent
    return Provenance(env=env, labels=labels, annotations=annotations)
