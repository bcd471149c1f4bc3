"""Whole operator replicas on the in-memory twins: custom resources in MemoryObjects,
Jobs in MemoryJobClient, queues in MemoryBroker. Watches, Leases, the registry, status
and Events together, with no cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from jobrunner.core.settings import Settings
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.manifest.scaledjob import ScaledJob
from jobrunner.manifest.triggers import Reach
from jobrunner.observability.telemetry import Telemetry
from jobrunner.operator import api
from jobrunner.operator.crd import ScaledJobStatus
from jobrunner.operator.operator import Operator
from jobrunner.operator.resources import Wanted
from jobrunner.runner import DispatchUnit
from jobrunner.testing import MemoryBroker, MemoryJobClient, MemoryObjects, MemorySource
from tests.helpers import eventually
from tests.unit.test_operator_registry import scaledjob_object

NS = "jobs"


class Replica:
    def __init__(self, env: Env, name: str, **operator: Any) -> None:
        settings = Settings()
        settings.dispatcher.shutdown_grace_seconds = 0.5
        op = settings.operator
        op.buckets = 8
        op.lease_duration_seconds, op.renew_seconds, op.renew_deadline_seconds = 1.5, 0.2, 0.8
        op.status_interval_seconds = 0.5
        for key, value in operator.items():
            setattr(op, key, value)
        self.client = env.store.client(name)
        telemetry = Telemetry.create()

        def open_source(kind: Any, resolved: Any, sj: ScaledJob, _s: Settings) -> MemorySource:
            return MemorySource(env.broker, resolved.queue, prefetch=sj.spec.maxReplicaCount)

        async def build(want: Wanted) -> DispatchUnit:
            assert want.scaledjob is not None
            return await DispatchUnit.create(
                want.scaledjob,
                jobs=self.operator.shared_jobs,  # as the operator's own build does
                settings=settings,
                telemetry=telemetry,
                authentications=want.authentications,
                read_secret=env.jobs.read_secret,
                base_dirs=[],
                reach=Reach(),
                open_source=open_source,
            )

        self.operator = Operator.assemble(
            settings=settings,
            objects=self.client,
            jobs=env.jobs,
            telemetry=telemetry,
            identity=name,
            lease_namespace="ops",
            build=build,
        )
        self.stop = asyncio.Event()
        self.task = start_guarded(self.operator.run(self.stop), name=f"operator-{name}")

    def serving(self) -> set[tuple[str, str]]:
        return {k for k, s in self.operator.registry.slots.items() if s.unit is not None}

    async def terminate(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


class Env:
    def __init__(self) -> None:
        self.store = MemoryObjects()
        self.admin = self.store.client("admin")
        self.jobs = MemoryJobClient()
        self.broker = MemoryBroker()
        self.replicas: list[Replica] = []

    def replica(self, name: str, **operator: Any) -> Replica:
        r = Replica(self, name, **operator)
        self.replicas.append(r)
        return r

    async def apply(self, obj: dict[str, Any], *, keda: bool = False) -> dict[str, Any]:
        path = api.scaledjobs(NS, keda=keda)
        body = {k: v for k, v in obj.items() if k != "status"}
        body["metadata"] = {
            k: v for k, v in obj["metadata"].items() if k not in ("generation", "uid")
        }
        existing = await self.admin.get(f"{path}/{obj['metadata']['name']}")
        if existing is None:
            return await self.admin.create(path, body)
        body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        return await self.admin.replace(f"{path}/{obj['metadata']['name']}", body)

    def status(self, name: str) -> dict[str, Any]:
        found = self.store.find(f"{api.scaledjobs(NS)}/{name}")
        return (found or {}).get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        for c in self.status(name).get("conditions") or []:
            if c["type"] == kind:
                return dict(c)
        return {}

    def events(self, name: str) -> list[str]:
        return [
            e["reason"]
            for e in self.store.items(api.events(NS))
            if e["involvedObject"]["name"] == name
        ]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    yield e
    for r in e.replicas:
        r.stop.set()
    await stop_tasks([r.task for r in e.replicas], grace=10)


async def until(check: Callable[[], Any], within: float = 15) -> Any:
    async def ok() -> Any:
        return check()

    return await eventually(ok, within=within, interval=0.05)


async def test_applied_scaledjob_runs_and_its_status_says_ready(env: Env) -> None:
    env.replica("r1")
    await env.apply(scaledjob_object(maxReplicaCount=4))
    ready = await until(lambda: env.condition("work", "Ready").get("status") == "True")
    assert ready
    status = env.status("work")
    ScaledJobStatus.model_validate(status)  # the shape the CRD declares
    assert env.condition("work", "Ready")["reason"] == "DispatcherReady"
    assert env.condition("work", "Paused")["status"] == "False"
    assert env.condition("work", "Active")["status"] == "False"
    assert status["observedGeneration"] == 1
    assert status["triggersTypes"] == "rabbitmq"
    assert status["owner"] == "r1"
    await env.broker.publish("q", json.dumps({"task": "a"}), message_id="a")
    await until(lambda: env.condition("work", "Active").get("status") == "True")
    assert env.status("work")["activeJobs"] == 1
    assert "lastMessageTime" in env.status("work")
    assert "Started" in env.events("work")


async def test_invalid_scaledjob_reports_ready_false_naming_the_field(env: Env) -> None:
    env.replica("r1")
    bad = scaledjob_object("bad")
    bad["spec"]["triggers"][0]["metadata"]["queueNme"] = "x"
    await env.apply(bad)
    await env.apply(scaledjob_object("good", queue="q2"))
    await until(lambda: env.condition("bad", "Ready").get("reason") == "InvalidSpec")
    message = env.condition("bad", "Ready")["message"]
    assert "spec.triggers[0].metadata.queueNme" in message
    assert "did you mean 'queueName'" in message
    assert "InvalidSpec" in env.events("bad")
    await until(lambda: env.condition("good", "Ready").get("status") == "True")


async def test_pause_annotation_sets_paused_and_stops_the_dispatcher(env: Env) -> None:
    r = env.replica("r1")
    await env.apply(scaledjob_object())
    await until(lambda: r.serving() == {(NS, "work")})
    await env.apply(scaledjob_object(annotations={"autoscaling.keda.sh/paused": "true"}))
    await until(lambda: env.condition("work", "Paused").get("status") == "True")
    assert r.serving() == set()
    assert "autoscaling.keda.sh/paused" in env.condition("work", "Paused")["message"]
    await env.apply(scaledjob_object(annotations={"jobrunner.dev/paused": "false"}))
    await until(lambda: env.condition("work", "Paused").get("status") == "False")
    await until(lambda: r.serving() == {(NS, "work")})
    assert sorted(env.events("work")) == ["Paused", "Started", "Started"]


async def test_limits_change_is_applied_live_and_observed(env: Env) -> None:
    r = env.replica("r1")
    await env.apply(scaledjob_object(maxReplicaCount=5))
    await until(lambda: env.status("work").get("observedGeneration") == 1)
    unit = r.operator.registry.slots[(NS, "work")].unit
    await env.apply(scaledjob_object(maxReplicaCount=2))
    await until(lambda: env.status("work").get("observedGeneration") == 2)
    assert r.operator.registry.slots[(NS, "work")].unit is unit
    assert env.condition("work", "Ready")["observedGeneration"] == 2
    assert "Updated" in env.events("work")


async def test_every_scaledjob_is_served_by_exactly_one_of_two_replicas(env: Env) -> None:
    names = [f"sj{i}" for i in range(12)]
    for name in names:
        await env.apply(scaledjob_object(name, queue=f"q-{name}"))
    a, b = env.replica("a"), env.replica("b")
    everyone = {(NS, n) for n in names}

    def split() -> bool:
        return (a.serving() | b.serving()) == everyone and not (a.serving() & b.serving())

    await until(lambda: split() and a.serving() and b.serving())
    for name in names:
        await until(lambda n=name: env.status(n).get("owner") in ("a", "b"))
    owners = {env.status(n)["owner"] for n in names}
    assert owners == {"a", "b"}, "both replicas work"
    # One leaves: the other serves everything, well before any lease could expire.
    await a.terminate()
    env.replicas.remove(a)
    await until(lambda: b.serving() == everyone, within=5)


async def test_idle_operator_writes_no_status(env: Env) -> None:
    r = env.replica("r1")
    for i in range(3):
        await env.apply(scaledjob_object(f"sj{i}", queue=f"q{i}"))
    await until(lambda: all(env.status(f"sj{i}").get("owner") for i in range(3)))
    await asyncio.sleep(1.5)
    writes = r.operator.status.writes
    await asyncio.sleep(2.0)
    assert r.operator.status.writes == writes
    assert r.client.requests.get("PATCH", 0) < 40, r.client.requests


async def test_keda_scaledjob_is_taken_over_only_when_annotated_and_paused_for_keda(
    env: Env,
) -> None:
    r = env.replica("r1", keda_takeover=True)
    keda = scaledjob_object("legacy", queue="kq")
    keda["apiVersion"] = "keda.sh/v1alpha1"
    await env.apply(keda, keda=True)
    await asyncio.sleep(0.5)
    assert r.serving() == set(), "not annotated: KEDA's, left alone"
    keda["metadata"]["annotations"] = {"jobrunner.dev/takeover": "true"}
    await env.apply(keda, keda=True)
    await until(lambda: "InvalidSpec" in env.events("legacy"))
    assert r.serving() == set(), "KEDA still scales it: not served"
    keda["metadata"]["annotations"]["autoscaling.keda.sh/paused"] = "true"
    await env.apply(keda, keda=True)
    await until(lambda: r.serving() == {(NS, "legacy")})
    await env.broker.publish("kq", json.dumps({"task": "x"}), message_id="x")
    await until(lambda: env.jobs.names(NS, "jobrunner.dev/scaledjob=legacy"))
    found = env.store.find(f"{api.scaledjobs(NS, keda=True)}/legacy") or {}
    assert "status" not in found, "KEDA's object keeps its own status"


async def test_readiness_says_when_the_replica_may_not_serve(env: Env) -> None:
    r = env.replica("r1")
    await until(lambda: r.operator.readiness()[0])
    assert "16 buckets" not in r.operator.readiness()[1]
    assert "of 8 buckets" in r.operator.readiness()[1]
    r.client.down = True
    await until(lambda: not r.operator.readiness()[0])
    assert "unreachable" in r.operator.readiness()[1] or "Lease" in r.operator.readiness()[1]
    r.client.down = False
    await until(lambda: r.operator.readiness()[0])


async def test_unreachable_queue_is_ready_false_with_the_brokers_words_and_recovers(
    env: Env,
) -> None:
    env.broker.missing.add("q")
    env.replica("r1")
    await env.apply(scaledjob_object())
    ready = await until(
        lambda: (
            env.condition("work", "Ready").get("reason") == "SourceUnavailable"
            and env.condition("work", "Ready")
        )
    )
    assert "does not exist" in ready["message"]
    assert env.condition("work", "Ready")["status"] == "False"
    assert "does not exist" in env.status("work")["lastError"]["message"]
    env.broker.missing.clear()
    await until(lambda: env.condition("work", "Ready").get("reason") == "DispatcherReady")
    assert "does not exist" in env.status("work")["lastError"]["message"], "kept as the last"


def test_a_refused_watch_says_what_to_do() -> None:
    from jobrunner.core.protocols import ApiRejected, TransientError
    from jobrunner.operator.informer import Informer

    def hint(path: str, exc: Exception, selector: str = "") -> str:
        return Informer(MemoryObjects().client(), path, selector=selector)._hint(exc)

    missing = ApiRejected(404, "NotFound", "the server could not find the requested resource")
    assert (
        "the jobrunner.dev CRDs are not installed: `helm show crds CHART | kubectl apply -f -`"
    ) in hint(api.scaledjobs(None), missing)
    assert "KEDA's CRDs are not installed" in hint(api.scaledjobs("media", keda=True), missing)
    forbidden = ApiRejected(403, "Forbidden", "cannot list")
    assert "check the chart's RBAC" in hint(api.scaledjobs("media"), forbidden)
    bad = ApiRejected(400, "BadRequest", "unable to parse requirement")
    assert "is the label selector 'a b' right?" in hint(api.scaledjobs(None), bad, "a b")
    assert hint(api.scaledjobs(None), TransientError("503")) == ""
