"""The operator's registry of dispatch units, against the in-memory twins of the Job
client and the broker (jobrunner.testing): real DispatchUnits, real dispatchers, real
trackers; no cluster, no broker, no subprocess."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from jobrunner.core.settings import Settings
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers import Reach
from jobrunner.observability.telemetry import Telemetry
from jobrunner.operator.registry import Phase, Registry
from jobrunner.operator.resources import Key, Wanted, wanted_from
from jobrunner.runner import DispatchUnit
from jobrunner.testing import MemoryBroker, MemoryJobClient, MemorySource
from tests.helpers import eventually

NS = "jobs"


def scaledjob_object(
    name: str = "work",
    *,
    queue: str = "q",
    generation: int = 1,
    args: str = "v1 {{ message.json.task }}",
    annotations: dict[str, str] | None = None,
    uid: str = "uid-1",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {
            "name": name,
            "namespace": NS,
            "generation": generation,
            "uid": uid,
            "annotations": annotations or {},
        },
        "spec": {
            "jobTargetRef": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "w", "image": "busybox", "args": [args]}],
                    }
                }
            },
            "triggers": [
                {"type": "rabbitmq", "metadata": {"queueName": queue, "host": "amqp://x/"}}
            ],
            **spec,
        },
    }


@dataclass
class World:
    jobs: MemoryJobClient
    broker: MemoryBroker
    registry: Registry
    events: list[tuple[str, str, str]] = field(default_factory=list)
    built: list[DispatchUnit] = field(default_factory=list)

    def apply(self, *objects: dict[str, Any], grace: float = 1.0) -> dict[Key, Wanted]:
        wanted = {w.key: w for w in (wanted_from(o) for o in objects)}
        self.registry.reconcile(wanted, grace=grace)
        return wanted

    async def converged(self) -> None:
        await eventually(lambda: _true(self.registry.converged()), within=10)

    def unit(self, name: str = "work") -> DispatchUnit:
        slot = self.registry.slots[(NS, name)]
        assert slot.unit is not None, slot
        return slot.unit

    def job_names(self, name: str = "work") -> list[str]:
        return self.jobs.names(NS, f"jobrunner.dev/scaledjob={name}")

    def reasons(self) -> list[str]:
        return [reason for _, _, reason in self.events]


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def world() -> AsyncIterator[World]:
    jobs = MemoryJobClient()
    broker = MemoryBroker()
    settings = Settings()
    settings.dispatcher.shutdown_grace_seconds = 1.0
    telemetry = Telemetry.create()
    built: list[DispatchUnit] = []

    def open_source(kind: Any, resolved: Any, sj: ScaledJob, _s: Settings) -> MemorySource:
        return MemorySource(broker, resolved.queue, prefetch=sj.spec.maxReplicaCount)

    async def build(want: Wanted) -> DispatchUnit:
        assert want.scaledjob is not None
        unit = await DispatchUnit.create(
            want.scaledjob,
            jobs=jobs,
            settings=settings,
            telemetry=telemetry,
            authentications=want.authentications,
            read_secret=jobs.read_secret,
            base_dirs=[],
            reach=Reach(),
            open_source=open_source,
        )
        built.append(unit)
        return unit

    events: list[tuple[str, str, str]] = []
    registry = Registry(
        build=build,
        start=lambda unit: unit.start(settings=settings, telemetry=telemetry),
        on_event=lambda w, kind, reason, message: events.append((w.key[1], kind, reason)),
        retry_initial=0.05,
        retry_ceiling=0.2,
    )
    w = World(jobs=jobs, broker=broker, registry=registry, events=events, built=built)
    yield w
    await registry.close(grace=0)


async def publish(world: World, queue: str, *tasks: str) -> None:
    for task in tasks:
        await world.broker.publish(queue, json.dumps({"task": task}), message_id=task)


async def jobs_count(world: World, count: int, name: str = "work") -> list[str]:
    async def enough() -> list[str] | None:
        names = world.job_names(name)
        return names if len(names) >= count else None

    return await eventually(enough, within=10)


async def test_new_scaledjob_starts_a_unit_whose_messages_become_jobs(world: World) -> None:
    world.apply(scaledjob_object())
    await publish(world, "q", "a", "b")
    names = await jobs_count(world, 2)
    assert world.registry.slots[(NS, "work")].phase is Phase.RUNNING
    assert "Started" in world.reasons()
    for name in names:
        await world.jobs.finish(NS, name)
    await eventually(lambda: _true(len(world.broker.acked("q")) == 2), within=10)


async def test_limits_change_live_and_a_larger_limit_wakes_waiting_messages(world: World) -> None:
    world.apply(scaledjob_object(maxReplicaCount=3))
    await world.converged()
    world.apply(scaledjob_object(maxReplicaCount=1, generation=2))
    await world.converged()
    unit = world.unit()
    await publish(world, "q", "a", "b", "c")
    await jobs_count(world, 1)
    await asyncio.sleep(0.3)
    assert len(world.job_names()) == 1, "maxReplicaCount 1 holds the others back"
    world.apply(scaledjob_object(maxReplicaCount=3, successfulJobsHistoryLimit=0, generation=3))
    await jobs_count(world, 3)
    assert world.unit() is unit, "limits are applied to the running unit, not by replacing it"
    assert unit.dispatcher.limiter.limit == 3
    assert world.reasons().count("Started") == 1
    assert world.reasons().count("Updated") == 2
    assert world.registry.slots[(NS, "work")].observed == 3


async def test_limit_above_the_opened_prefetch_replaces_the_unit(world: World) -> None:
    world.apply(scaledjob_object(maxReplicaCount=2))
    await world.converged()
    first = world.unit()
    world.apply(scaledjob_object(maxReplicaCount=5, generation=2))
    await world.converged()
    assert world.unit() is not first
    assert world.unit().capacity == 5
    assert "Replacing" in world.reasons()


async def test_template_change_replaces_the_unit_without_touching_running_jobs(
    world: World,
) -> None:
    world.apply(scaledjob_object())
    await publish(world, "q", *[f"t{i}" for i in range(5)])
    running = await jobs_count(world, 5)
    before = {n: copy.deepcopy(world.jobs.job(NS, n)) for n in running}
    world.apply(scaledjob_object(args="v2 {{ message.json.task }}", generation=2))
    await world.converged()
    assert "Replacing" in world.reasons()
    # The five messages went back to the broker and came to the new unit, which adopted
    # their Jobs: no sixth Job, and the Jobs are exactly as they were.
    new_unit = world.unit()
    await eventually(lambda: _true(len(new_unit.dispatcher.intake.inflight) == 5), within=10)
    assert sorted(world.job_names()) == sorted(running)
    for name in running:
        job = world.jobs.job(NS, name)
        assert job["metadata"]["uid"] == before[name]["metadata"]["uid"]
        assert job["spec"] == before[name]["spec"]
        await world.jobs.finish(NS, name)
    await eventually(lambda: _true(len(world.broker.acked("q")) == 5), within=10)
    await publish(world, "q", "after")
    names = await jobs_count(world, 6)
    (new,) = set(names) - set(running)
    args = world.jobs.job(NS, new)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["v2 after"]


async def test_removed_scaledjob_stops_consuming_and_leaves_its_jobs_running(
    world: World,
) -> None:
    world.apply(scaledjob_object())
    await publish(world, "q", "a", "b")
    names = await jobs_count(world, 2)
    world.registry.reconcile({}, grace=1.0)
    await world.converged()
    assert (NS, "work") not in world.registry.slots
    assert world.broker.consumers["q"] == 0
    assert world.broker.depth("q") == 2, "the messages wait in the queue for the next owner"
    assert world.jobs.running(NS) == sorted(names)
    assert world.reasons()[-1] == "Stopped"


async def test_paused_scaledjob_stops_and_resumes_where_it_left(world: World) -> None:
    world.apply(scaledjob_object())
    await world.converged()
    world.apply(scaledjob_object(annotations={"autoscaling.keda.sh/paused": "true"}))
    await world.converged()
    slot = world.registry.slots[(NS, "work")]
    assert slot.phase is Phase.PAUSED
    assert slot.unit is None
    await publish(world, "q", "a")
    await asyncio.sleep(0.3)
    assert world.job_names() == []
    world.apply(scaledjob_object(annotations={"autoscaling.keda.sh/paused": "false"}))
    await jobs_count(world, 1)
    assert world.reasons() == ["Started", "Paused", "Started"]


async def test_jobrunner_pause_annotation_pauses_too(world: World) -> None:
    world.apply(scaledjob_object(annotations={"jobrunner.dev/paused": "true"}))
    await world.converged()
    assert world.registry.slots[(NS, "work")].phase is Phase.PAUSED


async def test_invalid_scaledjob_is_reported_naming_the_field_and_others_run(
    world: World,
) -> None:
    bad = scaledjob_object("bad", queue="q2")
    bad["spec"]["triggers"][0]["type"] = "rabitmq"
    world.apply(scaledjob_object(), bad)
    await publish(world, "q", "a")
    await jobs_count(world, 1)
    slot = world.registry.slots[(NS, "bad")]
    assert slot.phase is Phase.INVALID
    assert slot.problem is not None
    assert "spec.triggers[0].type" in slot.problem
    assert "did you mean 'rabbitmq'" in slot.problem
    assert ("bad", "Warning", "InvalidSpec") in world.events


async def test_unreachable_queue_waits_alone_and_is_consumed_once_it_exists(
    world: World,
) -> None:
    world.broker.missing.add("q2")
    world.apply(scaledjob_object(), scaledjob_object("other", queue="q2"))
    await publish(world, "q", "a")
    await publish(world, "q2", "b")
    await jobs_count(world, 1)
    # Built on its own (templates are parsed off the loop): it may come after the first.
    await eventually(lambda: _true(world.registry.slots[(NS, "other")].unit is not None), within=10)
    other = world.unit("other")
    await eventually(lambda: _true(bool(other.readiness())), within=5)
    assert "does not exist" in (other.readiness() or "")
    world.broker.missing.clear()
    await jobs_count(world, 1, name="other")


async def test_unit_that_cannot_be_built_is_retried_with_backoff(world: World) -> None:
    obj = scaledjob_object()
    del obj["spec"]["jobTargetRef"]
    obj["spec"]["jobTemplate"] = "no-such-template.yaml"
    world.apply(obj)
    await eventually(lambda: _true(world.registry.slots[(NS, "work")].failures >= 2), within=10)
    slot = world.registry.slots[(NS, "work")]
    assert slot.phase is Phase.FAILED
    assert "no-such-template.yaml" in (slot.problem or "")
    assert world.reasons().count("InvalidSpec") == 1, "one event, not one per retry"


async def test_unit_whose_essential_task_fails_is_restarted(world: World) -> None:
    world.jobs.fail_next["list_jobs"] = RuntimeError("a bug in the Job watch")
    world.apply(scaledjob_object())
    await eventually(lambda: _true("DispatcherFailed" in world.reasons()), within=10)
    await publish(world, "q", "a")
    await jobs_count(world, 1)
    assert world.registry.slots[(NS, "work")].phase is Phase.RUNNING
    assert world.reasons().count("Started") == 2
