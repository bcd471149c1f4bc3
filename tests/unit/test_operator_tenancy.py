"""Operator mode serves many ScaledJob authors at once: what one of them can read (status,
Events) and what anyone can read (/readyz, /metrics) holds jobrunner's own words only,
each tenant's series are its own, and nothing the operator remembers grows with every
Event or every ScaledJob that came and went. On the in-memory twins (no cluster)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

from prometheus_client import generate_latest

from jobrunner.observability.telemetry import REASONS_PER_SCALEDJOB, Metrics
from jobrunner.operator import api
from jobrunner.operator.resources import wanted_from
from jobrunner.operator.status import RECORDED_MAX, EventRecorder, StatusWriter
from jobrunner.testing import MemoryObjects
from tests.unit.test_operator import NS, Env, env, until
from tests.unit.test_operator_registry import (
    World,
    jobs_count,
    publish,
    scaledjob_object,
    world,
)

__all__ = ["env", "world"]  # the fixtures, shared with the operator's other unit tests

MARKER = "INTERNAL-ANSWER-7f3a"
"""What an internal service answered: it must reach nothing a tenant can read."""


def in_namespace(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"]["namespace"] = namespace
    for key in ("generation", "uid"):
        out["metadata"].pop(key, None)
    return out


async def test_same_named_scaledjobs_of_two_namespaces_are_two_series(env: Env) -> None:
    r = env.replica("r1")
    await env.apply(scaledjob_object(queue="qa"))
    await env.admin.create(
        api.scaledjobs("other"), in_namespace(scaledjob_object(queue="qb"), "other")
    )
    await until(lambda: len(r.serving()) == 2)
    await env.broker.publish("qa", json.dumps({"task": "a"}), message_id="a")
    await env.broker.publish("qb", json.dumps({"task": "b"}), message_id="b1")
    await env.broker.publish("qb", json.dumps({"task": "c"}), message_id="b2")
    registry = r.operator._telemetry.metrics.registry

    def created(namespace: str) -> float | None:
        return registry.get_sample_value(
            "jobrunner_jobs_created_total", {"namespace": namespace, "scaledjob": "work"}
        )

    await until(lambda: created(NS) == 1 and created("other") == 2)
    # One of them goes: the other's series stay (they were one series before).
    await env.admin.delete(f"{api.scaledjobs('other')}/work")
    await until(lambda: r.serving() == {(NS, "work")})
    assert created(NS) == 1
    assert created("other") is None
    text = generate_latest(registry).decode()
    assert 'jobrunner_jobs_active{namespace="jobs",scaledjob="work"}' in text
    assert 'namespace="other"' not in text


async def test_readiness_tells_counts_never_a_scaledjob_or_its_broker(env: Env) -> None:
    env.broker.missing.add("secret-queue")
    r = env.replica("r1")
    await env.apply(scaledjob_object("tenant-a-billing", queue="secret-queue"))
    await until(
        lambda: env.condition("tenant-a-billing", "Ready").get("reason") == "SourceUnavailable"
    )
    ready, detail = r.operator.readiness()
    assert ready, "a tenant's broker is not the replica's readiness"
    assert "1 ScaledJob: 1 dispatching" in detail, detail
    assert "1 of them not consuming" in detail, detail
    for private in ("tenant-a-billing", "secret-queue", NS, "memory broker"):
        assert private not in detail, detail
    # Its author still reads why, in its own status.
    assert "secret-queue" in env.condition("tenant-a-billing", "Ready")["message"]


async def test_a_failure_reaches_status_and_events_in_jobrunners_words(world: World) -> None:
    told: list[str] = []
    tell = world.registry._event
    world.registry._event = lambda w, kind, reason, message: (
        told.append(message),
        tell(w, kind, reason, message),
    )
    world.jobs.fail_next["list_jobs"] = RuntimeError(f"server said: {MARKER}")
    world.apply(scaledjob_object())
    await until(lambda: "DispatcherFailed" in world.reasons())
    await publish(world, "q", "a")
    await jobs_count(world, 1)
    failed = [m for m in told if "RuntimeError" in m]
    assert failed, told
    assert not [m for m in told if MARKER in m], told


async def test_the_event_recorder_keeps_a_bounded_number_of_events() -> None:
    store = MemoryObjects()
    recorder = EventRecorder(store.client(), instance="r1")
    wanted = wanted_from(scaledjob_object())
    for i in range(RECORDED_MAX * 4):
        await recorder.record(wanted, "Normal", "Started", f"event {i}")
    assert len(recorder.recorded) == RECORDED_MAX
    assert recorder.recorded[-1][3] == f"event {RECORDED_MAX * 4 - 1}"


async def test_an_event_or_a_condition_never_carries_a_credential() -> None:
    store = MemoryObjects()
    recorder = EventRecorder(store.client(), instance="r1")
    await recorder.record(
        wanted_from(scaledjob_object()),
        "Warning",
        "DispatcherFailed",
        "connect to nats://alice:s3cret-pw@nats:4222 failed",
    )
    [event] = store.items(api.events(NS))
    assert "s3cret-pw" not in event["message"]
    assert "nats://***@nats:4222" in event["message"]


async def test_the_status_writer_forgets_scaledjobs_no_longer_served() -> None:
    writer = StatusWriter(MemoryObjects().client())
    writer._last[(NS, "gone")] = {"owner": "r1"}
    writer._written_at[(NS, "gone")] = 1.0
    writer._last[(NS, "kept")] = {"owner": "r1"}
    writer.retain([(NS, "kept")])
    assert set(writer._last) == {(NS, "kept")}
    assert set(writer._written_at) == set()


def test_reason_labels_are_bounded_per_scaledjob() -> None:
    metrics = Metrics.create()
    seen = {
        metrics.reason(NS, "work", "jobs_failed", f"Reason{i}")
        for i in range(REASONS_PER_SCALEDJOB * 3)
    }
    assert len(seen) == REASONS_PER_SCALEDJOB + 1
    assert "Other" in seen
    assert metrics.reason(NS, "work", "jobs_failed", "Reason0") == "Reason0", "kept once seen"
    assert metrics.reason(NS, "other", "jobs_failed", "Reason99") == "Reason99"


async def test_a_message_that_failed_once_then_succeeded_leaves_nothing_behind(
    world: World,
) -> None:
    """A dispatcher remembers the unforeseen errors of a message (to dead-letter it after
    a few), and must forget them once the message is settled: else every message that
    ever met one stays in memory for the life of the process."""
    world.apply(scaledjob_object())
    world.jobs.fail_next["create_job"] = RuntimeError("a hiccup nobody foresaw")
    await publish(world, "q", "a")
    [name] = await jobs_count(world, 1)
    await world.jobs.finish(NS, name)
    await until(lambda: world.broker.acked("q"))
    assert world.unit().dispatcher.settlement.unforeseen == {}


async def test_no_metric_label_carries_a_credential(world: World) -> None:
    obj = scaledjob_object()
    obj["spec"]["triggers"] = [
        {
            "type": "aws-sqs-queue",
            "metadata": {
                "queueURL": "https://probe:s3cret-pw@sqs.example/000000000000/jobs",
                "awsRegion": "eu-west-1",
            },
            # Keys of the tenant's own (operator mode refuses SQS without them).
            "authenticationRef": {"name": "aws"},
        }
    ]
    key = base64.b64encode(b"AKIAEXAMPLE").decode()
    world.jobs.secrets[(NS, "aws")] = {
        "metadata": {"name": "aws", "namespace": NS},
        "data": {"id": key, "secret": key},
    }
    auth = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "aws", "namespace": NS, "resourceVersion": "1"},
        "spec": {
            "secretTargetRef": [
                {"parameter": "awsAccessKeyID", "name": "aws", "key": "id"},
                {"parameter": "awsSecretAccessKey", "name": "aws", "key": "secret"},
            ]
        },
    }
    want = wanted_from(obj, authentications={"aws": auth})
    assert want.invalid is None, want.invalid
    world.registry.reconcile({want.key: want}, grace=1.0)
    await world.converged()
    registry = world.unit().dispatcher.metrics.metrics.registry

    def depth_sampled() -> bool:
        return "jobrunner_queue_depth_messages{" in generate_latest(registry).decode()

    await until(depth_sampled)
    text = generate_latest(registry).decode()
    assert "s3cret-pw" not in text
    assert 'queue="https://***@sqs.example/000000000000/jobs"' in text
