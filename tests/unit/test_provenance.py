"""What a Job is told about what made it (jobrunner.core.provenance, README "Provenance:
what the Job is told"): one uniform source name for every broker's metadata, env that
the kubelet's ``$(VAR)`` expansion gives back byte-exact, labels only where Kubernetes
takes the value, bounded annotations; and metadata a publisher controls (an MQTT topic,
a NATS subject, an HTTP path) that tries to break any of it."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobrunner.sources
from jobrunner.core import limits
from jobrunner.core.models import (
    ANNOTATION_SOURCE_DETAIL,
    ANNOTATION_TRACEPARENT,
    ANNOTATION_TRIGGER_SOURCE,
    LABEL_DELIVERY_COUNT,
    LABEL_REDELIVERED,
    LABEL_TRIGGER_SOURCE,
    LABEL_TRIGGER_TYPE,
    Delivery,
)
from jobrunner.core.naming import message_identity
from jobrunner.core.provenance import (
    ANNOTATION_VALUE_MAX,
    DESTINATION_KEYS,
    Destination,
    destination,
    provenance,
)
from jobrunner.local.supervisor import expand
from jobrunner.manifest import jobschema
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.rendering.renderer import Renderer, RenderError

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def scaledjob(trigger: dict[str, Any] | None = None, **job: Any) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "told", "namespace": "default"},
        "spec": {
            "jobTargetRef": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "work",
                                "image": "busybox",
                                "env": [{"name": "SECRET", "value": "s3cr3t"}],
                            }
                        ]
                    }
                },
                **job,
            },
            "triggers": [trigger or {"type": "sqlite", "metadata": {"queueName": "work"}}],
        },
    }


RENDERER = Renderer(parse_scaledjob(scaledjob()))


def delivery(source: str, metadata: dict[str, str], **kw: Any) -> Delivery:
    body = kw.pop("body", b'{"task": "t"}')
    return Delivery(
        source=source,
        identity=message_identity("m-1", body, {}),
        body=body,
        message_id="m-1",
        metadata=metadata,
        **kw,
    )


def env_of(job: dict[str, Any]) -> dict[str, str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def seen(job: dict[str, Any]) -> dict[str, str]:
    """The container's environment as its process sees it: each value expanded as the
    kubelet expands it (``$$`` a literal dollar, ``$(VAR)`` an earlier variable), with
    ``SECRET`` taken as defined before all of them, so that text which failed to escape
    ``$(SECRET)`` would show its value."""
    out: dict[str, str] = {}
    for item in job["spec"]["template"]["spec"]["containers"][0]["env"]:
        out[item["name"]] = expand(item.get("value", ""), {"SECRET": "s3cr3t", **out})
    return out


# Each source's metadata as its module in jobrunner/sources builds it (Delivery(...,
# metadata=...)), and where the message came from.
SOURCES = [
    (
        "rabbitmq",
        {"queue": "orders", "exchange": "shop", "routing_key": "eu.orders", "vhost": "/"},
        Destination("queue", "orders"),
    ),
    (
        "kafka",
        {"topic": "clicks", "partition": "3", "offset": "42", "key": "user-7"},
        Destination("topic", "clicks"),
    ),
    (
        "aws-sqs-queue",
        {
            "queue": "jobs.fifo",
            "queue_url": "http://sqs.local/000000000000/jobs.fifo",
            "message_group_id": "g",
            "deduplication_id": "d",
            "receive_count": "1",
        },
        Destination("queue", "jobs.fifo"),
    ),
    (
        "azure-queue",
        {"queue": "thumbnails", "Id": "abc", "DequeueCount": "1", "PopReceipt": "r"},
        Destination("queue", "thumbnails"),
    ),
    (
        "redis-streams",
        {"stream": "events", "group": "workers", "entry_id": "1700000000000-0"},
        Destination("stream", "events"),
    ),
    (
        "nats-jetstream",
        {
            "stream": "ORDERS",
            "consumer": "work",
            "subject": "orders.eu.created",
            "sequence": "9",
            "deliveries": "1",
        },
        Destination("subject", "orders.eu.created"),
    ),
    (
        "mqtt",
        {"topic": "sensors/7/temp", "subscription": "sensors/+/temp", "client_id": "c"},
        Destination("topic", "sensors/7/temp"),
    ),
    ("sqlite", {"queue": "work", "database": "/state/queue.db"}, Destination("queue", "work")),
    # The HTTP trigger (issue #24), written apart: its metadata key is ``path``.
    ("http", {"path": "/hooks/github", "method": "POST"}, Destination("path", "/hooks/github")),
]


@pytest.mark.parametrize(("source", "metadata", "expected"), SOURCES, ids=[s[0] for s in SOURCES])
def test_each_source_names_where_its_message_came_from_uniformly(
    source: str, metadata: dict[str, str], expected: Destination
) -> None:
    assert destination(delivery(source, metadata)) == expected
    job = RENDERER.render(delivery(source, metadata)).job
    env = seen(job)
    assert env["JOBRUNNER_TRIGGER_SOURCE"] == expected.name
    assert env["JOBRUNNER_TRIGGER_SOURCE_KIND"] == expected.kind
    assert env["JOBRUNNER_SOURCE"] == source  # unchanged: the source type
    assert job["metadata"]["annotations"][ANNOTATION_TRIGGER_SOURCE] == expected.name
    label = job["metadata"]["labels"].get(LABEL_TRIGGER_SOURCE)
    assert label == (expected.name if limits.is_label_value(expected.name) else None)


def test_every_source_module_is_mapped_by_the_key_it_really_sets() -> None:
    """A new source, or a renamed metadata key, fails here rather than leaving its Jobs
    without a source (the fallback keys would usually hide it)."""
    mapped = {}
    root = Path(jobrunner.sources.__file__).parent
    for path in root.rglob("*.py"):
        # A source in a package of its own (sources/http/) sets its metadata in a sibling.
        package = path.parent if path.parent != root else None
        texts = [p.read_text() for p in package.glob("*.py")] if package else [path.read_text()]
        for name in re.findall(r'^    name = "([a-z-]+)"$', path.read_text(), flags=re.MULTILINE):
            key = DESTINATION_KEYS.get(name)
            assert key is not None, f"{path.name}: source {name!r} is not in DESTINATION_KEYS"
            assert any(f'"{key}":' in t for t in texts), f"{path}: sets no metadata key {key!r}"
            mapped[name] = key
    # The HTTP trigger's module may be elsewhere in this tree: its key is checked above.
    assert set(mapped) | {"http"} == {s[0] for s in SOURCES}


def test_an_unknown_source_is_mapped_by_the_first_key_its_metadata_has() -> None:
    # The HTTP trigger under another name, or any new source: no entry needed.
    assert destination(delivery("webhook", {"path": "/in", "queue": "q"})) == Destination(
        "path", "/in"
    )
    assert destination(delivery("amqp10", {"queue": "q", "stream": "s"})) == Destination(
        "queue", "q"
    )
    # A known source whose own key is missing or empty falls back too, and no key at all
    # (or only empty ones) names nothing.
    assert destination(delivery("http", {"path": "", "topic": "t"})) == Destination("topic", "t")
    assert destination(delivery("rabbitmq", {"exchange": "x"})) is None
    assert destination(delivery("kafka", {"topic": ""})) is None


def test_a_job_is_told_its_trigger_attempt_redelivery_deadline_and_trace() -> None:
    doc = scaledjob(
        {
            "type": "apache-kafka",
            "name": "clicks-eu",
            "metadata": {"bootstrapServers": "k:9092", "consumerGroup": "g", "topic": "clicks"},
        },
        activeDeadlineSeconds=900,
    )
    again = delivery(
        "kafka",
        {"topic": "clicks", "partition": "0", "offset": "7"},
        redelivered=True,
        delivery_count=3,
    )
    rendered = Renderer(parse_scaledjob(doc)).render(again, extra_env={"TRACEPARENT": TRACEPARENT})
    env = seen(rendered.job)
    assert env["JOBRUNNER_TRIGGER_TYPE"] == "apache-kafka"  # as written, alias and all
    assert env["JOBRUNNER_TRIGGER_NAME"] == "clicks-eu"
    assert env["JOBRUNNER_TRIGGER_SOURCE"] == "clicks"
    assert env["JOBRUNNER_DELIVERY_COUNT"] == "3"
    assert env["JOBRUNNER_REDELIVERED"] == "true"
    assert env["JOBRUNNER_ACTIVE_DEADLINE_SECONDS"] == "900"
    assert env["TRACEPARENT"] == TRACEPARENT
    assert env["JOBRUNNER_MESSAGE_ID"] == "m-1"
    labels = rendered.job["metadata"]["labels"]
    assert labels[LABEL_TRIGGER_TYPE] == "apache-kafka"
    assert labels[LABEL_TRIGGER_SOURCE] == "clicks"
    assert labels[LABEL_DELIVERY_COUNT] == "3"
    assert labels[LABEL_REDELIVERED] == "true"
    assert rendered.job["metadata"]["annotations"][ANNOTATION_TRACEPARENT] == TRACEPARENT


def test_without_a_deadline_name_or_trace_nothing_is_made_up() -> None:
    rendered = RENDERER.render(delivery("sqlite", {"queue": "work"}))
    env = env_of(rendered.job)
    for absent in ("JOBRUNNER_ACTIVE_DEADLINE_SECONDS", "JOBRUNNER_TRIGGER_NAME", "TRACEPARENT"):
        assert absent not in env
    assert env["JOBRUNNER_REDELIVERED"] == "false"
    assert env["JOBRUNNER_DELIVERY_COUNT"] == "1"
    assert ANNOTATION_TRACEPARENT not in rendered.job["metadata"]["annotations"]


def test_the_deadline_is_the_one_the_template_rendered_for_this_message() -> None:
    doc = scaledjob(activeDeadlineSeconds="{{ message.json.seconds }}")
    job = (
        Renderer(parse_scaledjob(doc))
        .render(delivery("sqlite", {"queue": "work"}, body=b'{"seconds": 45}'))
        .job
    )
    assert job["spec"]["activeDeadlineSeconds"] == 45
    assert seen(job)["JOBRUNNER_ACTIVE_DEADLINE_SECONDS"] == "45"


def test_a_traceparent_that_is_not_one_is_never_annotated() -> None:
    for bogus in ("00-xyz", TRACEPARENT + "\nx: y", "$(SECRET)", "0" * 300):
        told = provenance(
            delivery("sqlite", {"queue": "q"}),
            trigger_type="sqlite",
            trigger_name=None,
            active_deadline_seconds=None,
            traceparent=bogus,
        )
        assert ANNOTATION_TRACEPARENT not in told.annotations


HOSTILE = [
    pytest.param("$(SECRET)", id="kubelet-variable"),
    pytest.param("a/$(SECRET)/$$(SECRET)/$", id="dollars"),
    pytest.param("line1\nline2\r\n", id="newlines"),
    pytest.param("orders/eu", id="slash"),
    pytest.param("-leading", id="leading-dash"),
    pytest.param("trailing.", id="trailing-dot"),
    pytest.param("x" * 64, id="64-characters"),
    pytest.param("ünïcødé", id="non-ascii"),
    pytest.param('q", "injected": "1', id="quotes"),
    pytest.param("{{ 7 * 7 }}", id="template"),
]


@pytest.mark.parametrize("topic", HOSTILE)
def test_a_publisher_chosen_topic_arrives_as_text_and_never_breaks_a_label(topic: str) -> None:
    """An MQTT topic (or NATS subject, HTTP path) is the publisher's choice: it reaches
    the process exactly, pulls in no other variable, and is a label only when it is a
    valid label value (here never), else an annotation."""
    job = RENDERER.render(delivery("mqtt", {"topic": topic, "subscription": "#"})).job
    env = seen(job)
    assert env["JOBRUNNER_TRIGGER_SOURCE"] == topic
    assert "s3cr3t" not in env["JOBRUNNER_TRIGGER_SOURCE"]
    assert LABEL_TRIGGER_SOURCE not in job["metadata"]["labels"]
    assert job["metadata"]["annotations"][ANNOTATION_TRIGGER_SOURCE] == topic
    assert jobschema.coerce(copy.deepcopy(job)) == []


def test_a_63_character_source_is_still_a_label() -> None:
    name = "q" * 63
    job = RENDERER.render(delivery("sqlite", {"queue": name})).job
    assert job["metadata"]["labels"][LABEL_TRIGGER_SOURCE] == name


def test_a_very_long_source_stays_out_of_labels_and_annotations_but_reaches_the_job() -> None:
    topic = "t/" * 32_000  # 64 000 characters: near MQTT's 65 535-byte topic limit
    rendered = RENDERER.render(delivery("mqtt", {"topic": topic}))
    meta = rendered.job["metadata"]
    assert LABEL_TRIGGER_SOURCE not in meta["labels"]
    assert ANNOTATION_TRIGGER_SOURCE not in meta["annotations"]
    assert json.loads(meta["annotations"][ANNOTATION_SOURCE_DETAIL])["topic"] == topic
    assert seen(rendered.job)["JOBRUNNER_TRIGGER_SOURCE"] == topic
    size = sum(len(k.encode()) + len(v.encode()) for k, v in meta["annotations"].items())
    assert size <= limits.ANNOTATIONS_MAX


def test_a_source_at_the_annotation_bound_is_annotated_and_one_past_it_is_not() -> None:
    at, past = "a" * ANNOTATION_VALUE_MAX, "a" * (ANNOTATION_VALUE_MAX + 1)
    for name, annotated in ((at, True), (past, False)):
        job = RENDERER.render(delivery("sqlite", {"queue": name})).job
        assert (ANNOTATION_TRIGGER_SOURCE in job["metadata"]["annotations"]) is annotated


def test_a_source_too_long_for_any_process_is_refused_as_too_large_not_crashed() -> None:
    topic = "t" * 200_000  # over what Linux passes in one variable
    with pytest.raises(RenderError) as refused:
        RENDERER.render(delivery("mqtt", {"topic": topic}))
    assert refused.value.reason == "MessageTooLarge"


def test_a_source_with_a_nul_is_left_out_of_env_and_annotations_not_refused() -> None:
    """No process can receive a NUL: the name goes only in JOBRUNNER_MESSAGE_METADATA,
    whose JSON escapes it; the message still makes its Job."""
    job = RENDERER.render(delivery("http", {"path": "/in\x00/x"})).job
    env = seen(job)
    assert "JOBRUNNER_TRIGGER_SOURCE" not in env
    assert "JOBRUNNER_TRIGGER_SOURCE_KIND" not in env
    assert json.loads(env["JOBRUNNER_MESSAGE_METADATA"])["path"] == "/in\x00/x"
    assert ANNOTATION_TRIGGER_SOURCE not in job["metadata"]["annotations"]


def test_annotations_with_the_provenance_stay_within_the_kubernetes_limit() -> None:
    """A body kept in the annotations (it is in env anyway) next to the largest
    trigger-source annotation: the kept copy moves to the Secret rather than pass
    256 KiB."""
    body = json.dumps({"pad": "x" * 95_000}).encode()
    doc = scaledjob()
    doc["spec"]["messageDelivery"] = {"maxEnvBytes": 120_000}
    rendered = Renderer(parse_scaledjob(doc)).render(
        delivery("sqlite", {"queue": "q" * ANNOTATION_VALUE_MAX}, body=body)
    )
    annotations = rendered.job["metadata"]["annotations"]
    assert ANNOTATION_TRIGGER_SOURCE in annotations
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    assert size <= limits.ANNOTATIONS_MAX


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.text(min_size=1, max_size=200), redelivered=st.booleans())
def test_any_topic_makes_a_valid_job_that_tells_it_exactly(topic: str, redelivered: bool) -> None:
    job = RENDERER.render(
        delivery("mqtt", {"topic": topic}, redelivered=redelivered, delivery_count=2)
    ).job
    assert jobschema.coerce(copy.deepcopy(job)) == []
    for key, value in job["metadata"]["labels"].items():
        assert limits.is_label_value(value), (key, value)
    env = seen(job)
    if "\x00" in topic:
        assert "JOBRUNNER_TRIGGER_SOURCE" not in env
    else:
        assert env["JOBRUNNER_TRIGGER_SOURCE"] == topic
        assert job["metadata"]["annotations"][ANNOTATION_TRIGGER_SOURCE] == topic
    assert env["JOBRUNNER_REDELIVERED"] == ("true" if redelivered else "false")
    assert env["SECRET"] == "s3cr3t"


def test_label_values_are_what_kubernetes_takes() -> None:
    for good in ("", "a", "a.b-c_d", "A9", "q" * 63):
        assert limits.is_label_value(good), good
    for bad in ("-a", "a-", ".a", "a b", "a/b", "a\n", "q" * 64, "é", "a$"):
        assert not limits.is_label_value(bad), bad
