"""Each phase of the dispatch loop on its own (jobrunner/dispatch/: intake, lifecycle,
settlement, kept copies), wired by hand to the in-memory twins of jobrunner.testing: a
MemoryBroker and its MemorySource, a MemoryJobClient and a real JobTracker watching it.
No Dispatcher: a phase that needs another gets the real one, nothing mocked."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from jobrunner.core.models import (
    ANNOTATION_BODY_DIGEST,
    ANNOTATION_HANDED_OVER,
    Action,
    Decision,
    JobOutcome,
    Outcome,
)
from jobrunner.core.protocols import ApiRejected, MessageHandle, SettleHook
from jobrunner.core.settings import DispatcherSettings
from jobrunner.dispatch.admission import Admission
from jobrunner.dispatch.events import JobEvents
from jobrunner.dispatch.intake import InFlight, Intake, refuse_reuse
from jobrunner.dispatch.keptcopies import KeptCopies
from jobrunner.dispatch.lifecycle import Lifecycle
from jobrunner.dispatch.limiter import ActiveJobs
from jobrunner.dispatch.metrics import DispatchMetrics
from jobrunner.dispatch.scope import Scope
from jobrunner.dispatch.settlement import Settlement, decision_for
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.observability.telemetry import Telemetry
from jobrunner.rendering.renderer import RenderedJob, Renderer
from jobrunner.testing import MemoryBroker, MemoryJobClient, MemorySource
from jobrunner.tracking.tracker import JobTracker
from tests.helpers import eventually

NS = "media"
Q = "q"
WITHIN = 10.0
"""Seconds any one phase may take here (each takes milliseconds)."""


def manifest(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "resize", "namespace": NS},
        "spec": {
            "jobTargetRef": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "w", "image": "busybox", "args": ["{{ message.body }}"]}
                        ]
                    }
                },
            },
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": Q, "host": "amqp://x"}}],
            **spec,
        },
    }


@dataclass
class Phases:
    broker: MemoryBroker
    source: MemorySource
    jobs: MemoryJobClient
    tracker: JobTracker
    scope: Scope
    renderer: Renderer
    metrics: DispatchMetrics
    settlement: Settlement
    intake: Intake
    lifecycle: Lifecycle
    limiter: ActiveJobs
    deliveries: AsyncIterator[MessageHandle]

    async def delivery(self, body: str, message_id: str = "m-1") -> MessageHandle:
        """Publish a message and take its delivery from the source."""
        await self.broker.publish(Q, body, message_id=message_id)
        return await asyncio.wait_for(anext(self.deliveries), WITHIN)

    async def quiet(self) -> None:
        """Until the phases' short tasks (settlements, Events, releases) are done."""
        async with asyncio.timeout(WITHIN):
            while self.scope.side_tasks:
                await asyncio.gather(*list(self.scope.side_tasks))

    def rendered(self, handle: MessageHandle) -> RenderedJob:
        return self.renderer.render(handle.delivery)


async def build(hook: SettleHook | None = None, **spec: Any) -> Phases:
    scaledjob = parse_scaledjob(manifest(**spec))
    broker, jobs = MemoryBroker(), MemoryJobClient()
    source = MemorySource(broker, Q, prefetch=10)
    await source.start()
    tracker = JobTracker(client=jobs, namespace=NS, selector="")
    telemetry = Telemetry.create()
    scope = Scope(
        scaledjob=scaledjob,
        source=source,
        jobs=jobs,
        tracker=tracker,
        settings=DispatcherSettings(max_unforeseen_errors=2),
        tracer=telemetry.tracer,
        log=logging.LoggerAdapter(logging.getLogger(__name__), {"scaledjob": "resize"}),
    )
    limiter = ActiveJobs(scaledjob.spec.maxReplicaCount)
    metrics = DispatchMetrics(
        metrics=telemetry.metrics,
        namespace=NS,
        scaledjob="resize",
        source="memory",
        active=lambda: len(limiter),
    )
    events = JobEvents(scope)
    settlement = Settlement(scope=scope, events=events, metrics=metrics, settle_hook=hook)
    renderer = Renderer(scaledjob)
    intake = Intake(
        scope=scope, renderer=renderer, settlement=settlement, events=events, metrics=metrics
    )
    lifecycle = Lifecycle(
        scope=scope,
        intake=intake,
        settlement=settlement,
        limiter=limiter,
        events=events,
        metrics=metrics,
        admission=Admission(scope=scope, limiter=limiter, events=events, metrics=metrics),
    )
    return Phases(
        broker=broker,
        source=source,
        jobs=jobs,
        tracker=tracker,
        scope=scope,
        renderer=renderer,
        metrics=metrics,
        settlement=settlement,
        intake=intake,
        lifecycle=lifecycle,
        limiter=limiter,
        deliveries=source.deliveries(),
    )


@contextlib.asynccontextmanager
async def watching(phases: Phases) -> AsyncIterator[None]:
    """The tracker's watch runs (as the runner runs it) for the block."""
    task = asyncio.create_task(phases.tracker.run(), name="test-tracker")
    try:
        await asyncio.wait_for(phases.tracker.synced.wait(), WITHIN)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def phases() -> AsyncIterator[Phases]:
    built = await build()
    async with watching(built):
        yield built
    await built.source.close()


async def until(check: Callable[[], bool]) -> None:
    """Until ``check`` holds, for at most WITHIN seconds (tests.helpers.eventually)."""

    async def holds() -> bool:
        return check()

    await eventually(holds, within=WITHIN, interval=0.01)


def adopted_count(phases: Phases) -> float:
    registry = phases.metrics.metrics.registry
    labels = {"namespace": NS, "scaledjob": "resize"}
    return registry.get_sample_value("jobrunner_jobs_adopted_total", labels) or 0.0


FAILED = JobOutcome(Outcome.FAILED, "BackoffLimitExceeded", "exit code 3")
SUCCEEDED = JobOutcome(Outcome.SUCCEEDED, "Completed")


# ---------------------------------------------------------------------- intake
async def test_intake_joins_a_redelivery_to_the_message_in_hand(phases: Phases) -> None:
    first = await phases.delivery("resize a")
    admitted = await phases.intake.receive(first)
    assert admitted is not None
    rendered, record = admitted
    again = await phases.delivery("resize a")  # the same id and body: a duplicate publish

    assert await phases.intake.receive(again) is None
    assert phases.intake.inflight == {rendered.name: record}
    assert record.handles == [first, again]
    assert adopted_count(phases) == 1
    await phases.quiet()
    assert phases.broker.settled == []  # joined: settled later, with the first
    assert [e["reason"] for e in phases.jobs.events] == ["Adopted"]


async def test_intake_dead_letters_a_reused_id_with_another_body(phases: Phases) -> None:
    first = await phases.delivery("resize a")
    admitted = await phases.intake.receive(first)
    assert admitted is not None
    _, record = admitted
    other = await phases.delivery("resize b")  # same message id, another body

    assert await phases.intake.receive(other) is None
    await phases.quiet()
    [dead] = phases.broker.dead_letters(Q)
    assert (dead.reason, dead.body) == ("MessageIdReused", b"resize b")
    assert record.handles == [first]  # the message in hand is untouched


async def test_intake_dead_letters_a_message_that_cannot_become_a_job() -> None:
    spec = manifest()["spec"]["jobTargetRef"]
    spec["template"]["spec"]["containers"][0]["args"] = ["{{ message.json.task }}"]
    built = await build(jobTargetRef=spec)
    handle = await built.delivery("not json")

    assert await built.intake.receive(handle) is None
    await built.quiet()
    assert built.intake.inflight == {}
    [dead] = built.broker.dead_letters(Q)
    assert dead.reason == "InvalidMessage"
    assert built.jobs.jobs == {}


async def test_reuse_refusal_follows_the_body_digest_and_the_redelivered_flag(
    phases: Phases,
) -> None:
    handle = await phases.delivery("resize a")
    delivery = handle.delivery
    job = phases.rendered(handle).job
    own = hashlib.sha256(delivery.body).hexdigest()
    job["metadata"]["annotations"][ANNOTATION_BODY_DIGEST] = own

    assert refuse_reuse(job, delivery, None) is None  # still running: adopt it
    duplicate = refuse_reuse(job, delivery, SUCCEEDED)
    assert duplicate is not None
    assert duplicate.reason == "DuplicateMessage"
    redelivered = dataclasses.replace(delivery, redelivered=True)
    assert refuse_reuse(job, redelivered, SUCCEEDED) is None  # a redelivery adopts it
    job["metadata"]["annotations"][ANNOTATION_BODY_DIGEST] = "0" * 64
    reused = refuse_reuse(job, redelivered, None)
    assert reused is not None
    assert reused.reason == "MessageIdReused"


# ---------------------------------------------------------------------- settlement
def test_decision_for_acks_a_success_and_dead_letters_a_failure_with_its_reason() -> None:
    assert decision_for(SUCCEEDED, "j") == Decision.ack("j")
    dead = decision_for(FAILED, "j")
    assert (dead.action, dead.reason, dead.detail) == (
        Action.DEAD_LETTER,
        "BackoffLimitExceeded",
        "exit code 3",
    )


async def created(phases: Phases, handle: MessageHandle) -> str:
    rendered = phases.rendered(handle)
    await phases.jobs.create_job(rendered.job, rendered.secret)
    return rendered.name


async def test_settlement_acks_a_succeeded_job_and_releases_it(phases: Phases) -> None:
    handle = await phases.delivery("resize a")
    name = await created(phases, handle)
    decision = await phases.settlement.decide(SUCCEEDED, name)

    assert await phases.settlement.settle(handles=[handle], decision=decision)
    [acked] = phases.broker.acked(Q)
    assert acked.job == name
    meta = phases.jobs.job(NS, name)["metadata"]
    assert meta["finalizers"] == []
    assert name in phases.settlement.settled_here


async def test_settlement_dead_letters_a_failed_job_with_its_reason(phases: Phases) -> None:
    handle = await phases.delivery("resize a")
    name = await created(phases, handle)
    decision = await phases.settlement.decide(FAILED, name)

    assert await phases.settlement.settle(handles=[handle], decision=decision)
    await phases.quiet()
    [dead] = phases.broker.dead_letters(Q)
    assert (dead.reason, dead.job) == ("BackoffLimitExceeded", name)
    assert phases.broker.acked(Q) == []
    assert [e["reason"] for e in phases.jobs.events] == ["DeadLettered"]


class Outputs:
    """A settle hook standing for a function's outputs: it records what the broker had
    settled when it was asked, and turns the ack into a dead letter (outputs that could
    not go out)."""

    def __init__(self) -> None:
        self.broker = MemoryBroker()
        self.asked: list[tuple[Decision, bool, int]] = []

    async def before_settle(
        self, decision: Decision, *, live: bool = False, message: Mapping[str, Any] | None = None
    ) -> Decision:
        self.asked.append((decision, live, len(self.broker.settled)))
        return Decision.dead_letter("OutputFailed", "the sink refused", decision.job_name)


async def test_settlement_asks_the_settle_hook_first_and_carries_out_its_decision() -> None:
    hook = Outputs()
    built = await build(hook)
    hook.broker = built.broker
    handle = await built.delivery("resize a")
    name = await created(built, handle)

    assert await built.settlement.settle(handles=[handle], decision=Decision.ack(name))
    assert hook.asked == [(Decision.ack(name), True, 0)]  # before anything was settled
    [dead] = built.broker.dead_letters(Q)
    assert (dead.reason, dead.job) == ("OutputFailed", name)
    # Not final (an ack that hands the message to its Job): the hook is not asked.
    again = await built.delivery("resize b", message_id="m-2")
    await built.settlement.settle(handles=[again], decision=Decision.ack(name), final=False)
    assert len(hook.asked) == 1


async def test_settlement_acks_every_joined_delivery_once(phases: Phases) -> None:
    first = await phases.delivery("resize a")
    again = await phases.delivery("resize a")
    name = await created(phases, first)

    assert await phases.settlement.settle(handles=[first, again], decision=Decision.ack(name))
    assert len(phases.broker.acked(Q)) == 2
    assert phases.source.in_hand == 0


async def test_settlement_releases_an_unforeseen_error_up_to_the_bound_then_dead_letters(
    phases: Phases,
) -> None:
    """max_unforeseen_errors=2: the first error sends the message back, the second
    dead-letters it InternalError, and nothing about it is remembered afterwards."""
    handle = await phases.delivery("resize a")
    await phases.settlement.release_unforeseen([handle], None, RuntimeError("a bug"))
    assert phases.broker.settled == []
    assert phases.broker.depth(Q) == 1
    assert phases.settlement.unforeseen == {handle.delivery.identity: 1}

    again = await asyncio.wait_for(anext(phases.deliveries), WITHIN)
    assert again.delivery.redelivered
    await phases.settlement.release_unforeseen([again], None, RuntimeError("a bug"))
    [dead] = phases.broker.dead_letters(Q)
    assert dead.reason == "InternalError"
    assert phases.broker.depth(Q) == 0
    assert phases.settlement.unforeseen == {}


# ---------------------------------------------------------------------- kept copies
async def test_a_failed_job_that_keeps_its_message_is_dead_lettered_from_its_copy() -> None:
    built = await build(ackPolicy="onJobCreation")
    kept = KeptCopies(scope=built.scope, settlement=built.settlement, in_hand=lambda _: False)
    built.tracker.on_finished(kept.job_finished)
    async with watching(built):
        handle = await built.delivery("resize a")
        name = await created(built, handle)
        await built.settlement.settle(handles=[handle], decision=Decision.ack(name), final=False)
        assert [s.action for s in built.broker.settled] == ["ack"]

        await built.jobs.finish(NS, name, succeeded=False)
        await asyncio.wait_for(built.tracker.wait_for(name), WITHIN)
        await built.quiet()
    dead = built.broker.dead_letters(Q)
    assert [(d.reason, d.body, d.job) for d in dead] == [
        ("BackoffLimitExceeded", b"resize a", name)
    ]
    meta = built.jobs.job(NS, name)["metadata"]
    assert meta["finalizers"] == []  # released once the dead letter went out


async def test_a_kept_copy_is_left_to_the_delivery_in_hand() -> None:
    built = await build(ackPolicy="onJobCreation")
    kept = KeptCopies(scope=built.scope, settlement=built.settlement, in_hand=lambda _: True)
    built.tracker.on_finished(kept.job_finished)
    async with watching(built):
        handle = await built.delivery("resize a")
        name = await created(built, handle)
        await built.jobs.finish(NS, name, succeeded=False)
        await asyncio.wait_for(built.tracker.wait_for(name), WITHIN)
        await built.quiet()
    assert built.broker.settled == []
    assert built.jobs.job(NS, name)["metadata"]["finalizers"] != []


# ---------------------------------------------------------------------- lifecycle
async def test_lifecycle_creates_one_job_for_two_deliveries_of_one_id(phases: Phases) -> None:
    """Two deliveries of one message, each in hand as its own record (two dispatchers,
    say): one Job is created, the other delivery adopts it, and both are acked once it
    succeeds."""
    first = await phases.delivery("resize a")
    second = await phases.delivery("resize a")
    rendered = phases.rendered(first)
    span = phases.scope.tracer.start_span
    records = [InFlight(handles=[h], span=span("message")) for h in (first, second)]
    tasks = [
        asyncio.create_task(phases.lifecycle.process(phases.rendered(r.handle), r)) for r in records
    ]
    await until(lambda: adopted_count(phases) == 1)
    assert phases.jobs.names(NS) == [rendered.name]
    assert adopted_count(phases) == 1
    assert phases.broker.settled == []  # waiting on the Job

    await phases.jobs.finish(NS, rendered.name)
    await asyncio.wait_for(asyncio.gather(*tasks), WITHIN)
    assert [(s.action, s.job) for s in phases.broker.settled] == [("ack", rendered.name)] * 2
    assert phases.jobs.names(NS) == [rendered.name]


async def test_lifecycle_hands_the_message_over_when_the_consumer_timeout_is_near() -> None:
    """consumerTimeoutSeconds no longer than the handover margin: the message is acked at
    once and its running Job, annotated, keeps it from then on."""
    built = await build(consumerTimeoutSeconds=30)
    async with watching(built):
        handle = await built.delivery("resize a")
        rendered = built.rendered(handle)
        record = InFlight(handles=[handle], span=built.scope.tracer.start_span("message"))
        await asyncio.wait_for(built.lifecycle.process(rendered, record), WITHIN)
    assert [(s.action, s.job) for s in built.broker.settled] == [("ack", rendered.name)]
    job = built.jobs.job(NS, rendered.name)
    assert job["metadata"]["annotations"][ANNOTATION_HANDED_OVER] == "true"
    assert job["status"] == {}  # still running: its outcome is the Job's to report
    assert record.deciding is False


async def test_lifecycle_dead_letters_what_the_api_server_rejects(phases: Phases) -> None:
    handle = await phases.delivery("resize a")
    rendered = phases.rendered(handle)
    phases.jobs.fail_next["create_job"] = ApiRejected(422, "Invalid", "spec.template: bad")
    record = InFlight(handles=[handle], span=phases.scope.tracer.start_span("m"))
    phases.intake.inflight[rendered.name] = record

    await asyncio.wait_for(phases.lifecycle.process(rendered, record), WITHIN)
    [dead] = phases.broker.dead_letters(Q)
    assert dead.reason == "ApiRejected"
    assert phases.lifecycle.rejected_in_row == 1
    assert phases.intake.inflight == {}
    assert rendered.name not in phases.limiter
