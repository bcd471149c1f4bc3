"""A function's pod cannot forge outcomes: the marks a Job's pod can write (the function's
result) and the dispatcher's own (outputs published, settled) count only when their MAC
verifies under that Job's key, which lives in the Job's own message Secret.

The MACs here are computed by the test itself with the standard library (the format is
the contract between the invoker, which imports nothing of jobrunner, and the
dispatcher), the way a pod holding a key would compute them."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

from jobrunner.core.models import Action, Decision, Delivery
from jobrunner.core.naming import message_secret_name
from jobrunner.core.settings import Settings
from jobrunner.dispatch.outputs import FunctionResults
from jobrunner.functions import invoker
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.manifest.triggers import Reach
from jobrunner.observability.telemetry import Telemetry
from jobrunner.rendering.renderer import ANNOTATION_ORIGINAL_MESSAGE, Renderer, original_message
from jobrunner.runner import DispatchUnit
from jobrunner.testing import MemoryBroker, MemoryJobClient, MemorySource
from tests.helpers import eventually

T = TypeVar("T")

NS = "fn"
RESULT = "jobrunner.dev/function-result"
PUBLISHED = "jobrunner.dev/outputs-published"
SETTLED = "jobrunner.dev/settled"


def mac(key: bytes, name: str, uid: str, annotation: str, value: str, namespace: str = NS) -> str:
    message = "\n".join(("jobrunner.dev/mark/v1", namespace, name, uid, annotation, value))
    return "v1:" + hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def signed(key: bytes, job: dict[str, Any], annotation: str, value: str) -> dict[str, str]:
    meta = job["metadata"]
    return {
        annotation: value,
        annotation + "-mac": mac(key, meta["name"], meta["uid"], annotation, value),
    }


SUCCESS = json.dumps(
    {"status": "succeeded", "outputs": {"out": [base64.b64encode(b"genuine").decode()]}},
    sort_keys=True,
)
FORGED = json.dumps(
    {"status": "succeeded", "outputs": {"out": [base64.b64encode(b"forged").decode()]}},
    sort_keys=True,
)


async def until(check: Callable[[], T], within: float = 15) -> T:
    async def ok() -> T:
        return check()

    return await eventually(ok, within=within)


class Sink:
    def __init__(self) -> None:
        self.published: list[tuple[bytes, str]] = []

    async def publish(self, body: bytes, *, message_id: str) -> None:
        self.published.append((body, message_id))

    async def close(self) -> None:
        pass


async def function_job(
    jobs: MemoryJobClient, name: str, key: bytes | None, *, mounts_key: bool = True
) -> dict[str, Any]:
    """A finished function Job (its template mounting its key, as rendered since keys,
    unless not ``mounts_key``) and its message Secret holding ``key``."""
    volumes = [{"name": "jobrunner-function-key", "secret": {}}] if mounts_key else []
    job, _ = await jobs.create_job(
        {
            "metadata": {"name": name, "namespace": NS, "labels": {}, "annotations": {}},
            "spec": {"template": {"spec": {"containers": [{"name": "c"}], "volumes": volumes}}},
        },
        {
            "metadata": {"name": message_secret_name(name), "namespace": NS},
            "data": {"function-key": base64.b64encode(key).decode()} if key else {"body": ""},
        },
    )
    await jobs.finish(NS, name)
    return dict(job)


def results(jobs: MemoryJobClient, sink: Sink) -> FunctionResults:
    return FunctionResults(jobs=jobs, namespace=NS, function="Fn", sinks={"out": sink})


async def annotate(jobs: MemoryJobClient, name: str, annotations: dict[str, str]) -> None:
    """What a pod with ``patch`` on Jobs can do to any Job of its namespace."""
    await jobs.annotate_job(NS, name, annotations)


# --------------------------------------------------------------------- the result
async def test_a_genuine_result_publishes_its_outputs() -> None:
    jobs, sink = MemoryJobClient(), Sink()
    job = await function_job(jobs, "fn-b", b"k" * 32)
    await annotate(jobs, "fn-b", signed(b"k" * 32, job, RESULT, SUCCESS))
    decision = await results(jobs, sink).before_settle(Decision.ack("fn-b"))
    assert decision.action is Action.ACK
    assert sink.published == [(b"genuine", "fn-b/out/0")]
    assert not [e for e in jobs.events if e["reason"] == "UnverifiedMark"]


@pytest.mark.parametrize(
    "forge",
    [
        "no-mac",
        "random-mac",
        "made-with-another-jobs-key",
        "copied-from-another-job",
        "another-uid",
        "another-namespace",
        "another-annotation",
    ],
)
async def test_a_forged_result_publishes_nothing_and_the_message_is_dead_lettered(
    forge: str,
) -> None:
    jobs, sink = MemoryJobClient(), Sink()
    key_a, key_b = b"a" * 32, b"b" * 32
    job_a = await function_job(jobs, "fn-a", key_a)
    job_b = await function_job(jobs, "fn-b", key_b)
    uid_b = job_b["metadata"]["uid"]
    forged = {
        "no-mac": {RESULT: FORGED},
        "random-mac": {RESULT: FORGED, RESULT + "-mac": "v1:" + "0" * 64},
        # A's pod holds A's key and signs B's name and uid with it.
        "made-with-another-jobs-key": {
            RESULT: FORGED,
            RESULT + "-mac": mac(key_a, "fn-b", uid_b, RESULT, FORGED),
        },
        # A's genuine record, copied onto B.
        "copied-from-another-job": signed(key_a, job_a, RESULT, FORGED),
        # B's own key, but for an earlier Job of the same name.
        "another-uid": {
            RESULT: FORGED,
            RESULT + "-mac": mac(key_b, "fn-b", "old-uid", RESULT, FORGED),
        },
        "another-namespace": {
            RESULT: FORGED,
            RESULT + "-mac": mac(key_b, "fn-b", uid_b, RESULT, FORGED, namespace="other"),
        },
        "another-annotation": {
            RESULT: FORGED,
            RESULT + "-mac": mac(key_b, "fn-b", uid_b, PUBLISHED, FORGED),
        },
    }[forge]
    await annotate(jobs, "fn-b", forged)
    decision = await results(jobs, sink).before_settle(Decision.ack("fn-b"))
    assert sink.published == []
    assert decision.action is Action.DEAD_LETTER
    assert decision.reason == "FunctionResultUnverified"
    assert "replay it" in decision.detail
    (event,) = [e for e in jobs.events if e["reason"] == "UnverifiedMark"]
    assert event["job"] == "fn-b"
    assert event["type"] == "Warning"
    assert "jobrunner.dev/function-result" in event["message"]


async def test_a_job_whose_secret_holds_no_key_is_not_trusted() -> None:
    jobs, sink = MemoryJobClient(), Sink()
    job = await function_job(jobs, "fn-b", None)
    await annotate(jobs, "fn-b", signed(b"k" * 32, job, RESULT, SUCCESS))
    decision = await results(jobs, sink).before_settle(Decision.ack("fn-b"))
    assert (decision.reason, sink.published) == ("FunctionResultUnverified", [])
    (event,) = [e for e in jobs.events if e["reason"] == "UnverifiedMark"]
    assert "holds no function-key" in event["message"]


async def test_a_job_made_before_keys_is_trusted_as_it_was() -> None:
    """An upgrade must not dead-letter the Jobs running through it: a Job whose
    template mounts no key (an earlier jobrunner's; a template cannot be changed) keeps
    today's trust. Every Job rendered since mounts one, so this opens nothing new."""
    jobs, sink = MemoryJobClient(), Sink()
    await function_job(jobs, "fn-old", None, mounts_key=False)
    await annotate(jobs, "fn-old", {RESULT: SUCCESS})
    decision = await results(jobs, sink).before_settle(Decision.ack("fn-old"))
    assert decision.action is Action.ACK
    assert sink.published == [(b"genuine", "fn-old/out/0")]


async def test_a_completed_job_without_a_result_is_dead_lettered_not_acked() -> None:
    """Removing a result is a forgery a MAC cannot see; it must not ack the message."""
    jobs, sink = MemoryJobClient(), Sink()
    await function_job(jobs, "fn-b", b"k" * 32)
    decision = await results(jobs, sink).before_settle(Decision.ack("fn-b"))
    assert decision.reason == "FunctionResultUnverified"
    assert "has no jobrunner.dev/function-result" in decision.detail


async def test_a_failed_job_keeps_its_own_reason_against_a_forged_error() -> None:
    jobs, sink = MemoryJobClient(), Sink()
    await function_job(jobs, "fn-b", b"k" * 32)
    await annotate(jobs, "fn-b", {RESULT: json.dumps({"status": "failed", "error": "lies"})})
    failed = Decision.dead_letter("BackoffLimitExceeded", "pod failed", "fn-b")
    assert await results(jobs, sink).before_settle(failed) == failed


async def test_a_forged_outputs_count_does_not_suppress_outputs() -> None:
    jobs, sink = MemoryJobClient(), Sink()
    key = b"k" * 32
    job = await function_job(jobs, "fn-b", key)
    await annotate(jobs, "fn-b", {**signed(key, job, RESULT, SUCCESS), PUBLISHED: "99"})
    await results(jobs, sink).before_settle(Decision.ack("fn-b"))
    assert sink.published == [(b"genuine", "fn-b/out/0")]
    # The count the dispatcher records is signed, and trusted the next time round.
    annotations = jobs.job(NS, "fn-b")["metadata"]["annotations"]
    assert annotations[PUBLISHED] == "1"
    assert annotations[PUBLISHED + "-mac"] == mac(
        key, "fn-b", job["metadata"]["uid"], PUBLISHED, "1"
    )
    await results(jobs, sink).before_settle(Decision.ack("fn-b"))
    assert len(sink.published) == 1


def test_the_invoker_computes_the_same_mac_as_the_dispatcher() -> None:
    from jobrunner.core import marks
    from jobrunner.functions import policy

    args = {"key": b"k" * 32, "namespace": NS, "name": "j", "uid": "u", "annotation": RESULT}
    assert invoker.mark_mac(**args, value="v\nx") == marks.mark_mac(**args, value="v\nx")
    assert invoker.mark_mac(**args, value="v") == mac(b"k" * 32, "j", "u", RESULT, "v")
    assert f"{marks.KEY_MOUNT}/{marks.KEY_DATA}" == invoker.KEY_FILE
    assert policy.RESULT_KEYS == marks.POD_WRITABLE


# --------------------------------------------------------------------- rendering
def function_scaledjob(**spec: Any) -> Any:
    return parse_scaledjob(
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "fn", "namespace": NS},
            "spec": {
                "jobTargetRef": {
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "initContainers": [
                                {"name": "handler", "image": "app", "restartPolicy": "Always"}
                            ],
                            "containers": [{"name": "invoker", "image": "jobrunner"}],
                        }
                    }
                },
                "triggers": [
                    {"type": "rabbitmq", "metadata": {"queueName": "q", "host": "amqp://x/"}}
                ],
                "function": {"name": "Fn"},
                "messageDelivery": {"containers": ["invoker"]},
                **spec,
            },
        }
    )


def test_every_function_job_gets_its_own_key_mounted_into_the_invoker_only() -> None:
    renderer = Renderer(function_scaledjob())
    delivery = Delivery(source="rabbitmq", identity="m1", body=b"small", message_id="m1")
    first, second = renderer.render(delivery), renderer.render(delivery)
    assert first.secret is not None
    assert second.secret is not None
    key = first.secret["data"]["function-key"]
    assert len(base64.b64decode(key)) == 32
    assert key != second.secret["data"]["function-key"]
    pod = first.job["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "jobrunner-function-key"]
    assert volume["secret"] == {
        "secretName": message_secret_name(first.name),
        "items": [{"key": "function-key", "path": "function-key"}],
    }
    (invoker_c,) = pod["containers"]
    assert {
        "name": "jobrunner-function-key",
        "mountPath": "/var/run/jobrunner/function-key",
        "readOnly": True,
    } in invoker_c["volumeMounts"]
    env = {e["name"]: e for e in invoker_c["env"]}
    assert env["JOBRUNNER_FUNCTION_KEY_FILE"]["value"] == invoker.KEY_FILE
    assert env["JOBRUNNER_JOB_UID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}
    }
    (handler,) = pod["initContainers"]
    assert not handler.get("volumeMounts")
    assert not handler.get("env")
    # The copy kept for a dead letter is in the Secret, which a pod cannot write.
    assert ANNOTATION_ORIGINAL_MESSAGE not in first.job["metadata"]["annotations"]
    assert "original.json" in first.secret["data"]


def test_the_secrets_copy_of_a_message_wins_over_an_annotation() -> None:
    secret = {
        "original.json": base64.b64encode(json.dumps({"identity": "m1"}).encode()).decode(),
        "body": base64.b64encode(b"genuine").decode(),
    }
    forged = json.dumps({"identity": "m1", "body": base64.b64encode(b"forged").decode()})
    job = {"metadata": {"annotations": {ANNOTATION_ORIGINAL_MESSAGE: forged}}}
    kept = original_message(job, secret)
    assert kept is not None
    assert kept["body"] == b"genuine"


# --------------------------------------------------------------------- the dispatcher
class Unit:
    """A function ScaledJob served as in production (DispatchUnit.create), on twins."""

    def __init__(self) -> None:
        self.jobs = MemoryJobClient()
        self.broker = MemoryBroker()
        self.unit: DispatchUnit | None = None

    async def start(self, **spec: Any) -> DispatchUnit:
        settings = Settings()
        settings.dispatcher.shutdown_grace_seconds = 0.5
        telemetry = Telemetry.create()

        def open_source(kind: Any, resolved: Any, sj: Any, _s: Settings) -> MemorySource:
            return MemorySource(self.broker, resolved.queue, prefetch=sj.spec.maxReplicaCount)

        self.unit = await DispatchUnit.create(
            function_scaledjob(**spec),
            jobs=self.jobs,
            settings=settings,
            telemetry=telemetry,
            authentications={},
            read_secret=self.jobs.read_secret,
            base_dirs=[],
            reach=Reach(),
            open_source=open_source,
        )
        self.unit.start(settings=settings, telemetry=telemetry)
        return self.unit


@pytest.fixture
async def unit() -> AsyncIterator[Unit]:
    made = Unit()
    yield made
    if made.unit is not None:
        await made.unit.stop(grace=0.5)


async def test_a_forged_settlement_does_not_stop_a_kept_failure_from_being_dead_lettered(
    unit: Unit,
) -> None:
    """A Job that keeps its (acked) message fails; another pod had marked it settled
    and replaced its kept copy. The failure is still dead-lettered, with the real body."""
    await unit.start(ackPolicy="onJobCreation")
    await unit.broker.publish("q", b"the real body", message_id="m1")
    (name,) = await until(lambda: unit.jobs.names(NS) or None)
    await until(lambda: unit.broker.acked("q") or None)
    forged_copy = json.dumps({"identity": "m1", "body": base64.b64encode(b"forged").decode()})
    await annotate(unit.jobs, name, {SETTLED: "ack", ANNOTATION_ORIGINAL_MESSAGE: forged_copy})
    await unit.jobs.finish(NS, name, succeeded=False)
    (dead,) = await until(lambda: unit.broker.dead_letters("q") or None)
    assert dead.body == b"the real body"
    assert dead.reason == "BackoffLimitExceeded"
    assert any(
        e["reason"] == "UnverifiedMark" and SETTLED in e["message"] for e in unit.jobs.events
    )
    annotations = unit.jobs.job(NS, name)["metadata"]["annotations"]
    assert annotations[SETTLED] == "dead-letter"
    assert annotations[SETTLED + "-mac"].startswith("v1:")


async def test_its_own_settlement_is_signed_and_trusted_by_the_next_dispatcher(
    unit: Unit,
) -> None:
    await unit.start(ackPolicy="onJobCreation")
    await unit.broker.publish("q", b"body", message_id="m1")
    (name,) = await until(lambda: unit.jobs.names(NS) or None)
    await until(lambda: unit.broker.acked("q") or None)
    await unit.jobs.finish(NS, name, succeeded=False)
    await until(lambda: unit.broker.dead_letters("q") or None)
    await until(lambda: SETTLED in unit.jobs.job(NS, name)["metadata"]["annotations"] or None)
    assert unit.unit is not None
    await unit.unit.stop(grace=0.5)
    # A restart: the settled Job is not dead-lettered a second time.
    again = Unit()
    again.jobs, again.broker = unit.jobs, unit.broker
    second = await again.start(ackPolicy="onJobCreation")
    try:
        await until(lambda: second.tracker.synced.is_set() or None)
        # A negative: the restarted dispatcher acts on the Jobs it lists at once; give it
        # a moment to (wrongly) dead-letter the settled one again.
        await asyncio.sleep(0.5)
        assert len(unit.broker.dead_letters("q")) == 1
        assert not [e for e in unit.jobs.events if e["reason"] == "UnverifiedMark"]
    finally:
        await second.stop(grace=0.5)
    unit.unit = None


def test_a_forged_mark_in_the_jobs_copy_is_left_alone() -> None:
    """screen() never changes the object it is given (the watch's copy is shared)."""
    from jobrunner.core.marks import JobMarks

    jobs = MemoryJobClient()
    job = {"metadata": {"name": "j", "uid": "u", "annotations": {SETTLED: "ack"}}}
    before = copy.deepcopy(job)
    screened = asyncio.run(JobMarks(jobs=jobs, namespace=NS).screen(job))
    assert job == before
    assert SETTLED not in screened["metadata"]["annotations"]


async def test_a_kept_message_whose_success_is_not_trusted_is_dead_lettered_from_its_copy(
    unit: Unit,
) -> None:
    """The Job keeps its (acked) message and succeeds, but its result is forged: the
    message must go to the dead letters from the copy the Job keeps, not vanish."""
    await unit.start(ackPolicy="onJobCreation")
    await unit.broker.publish("q", b"the real body", message_id="m1")
    (name,) = await until(lambda: unit.jobs.names(NS) or None)
    await until(lambda: unit.broker.acked("q") or None)
    forged = json.dumps({"status": "succeeded", "outputs": {}})
    await annotate(unit.jobs, name, {RESULT: forged, RESULT + "-mac": "v1:" + "0" * 64})
    await unit.jobs.finish(NS, name)
    (dead,) = await until(lambda: unit.broker.dead_letters("q") or None)
    assert dead.body == b"the real body"
    assert dead.reason == "FunctionResultUnverified"
    await until(lambda: unit.jobs.job(NS, name)["metadata"]["annotations"].get(SETTLED))
    assert unit.jobs.job(NS, name)["metadata"]["annotations"][SETTLED] == "dead-letter"


async def test_a_redelivery_is_not_acked_on_a_forged_settlement_of_its_running_job(
    unit: Unit,
) -> None:
    """After a restart the message comes back and adopts its Job, which another pod has
    marked settled: it waits for the Job's real end instead of being acked at once."""
    first = await unit.start()
    await unit.broker.publish("q", b"body", message_id="m1")
    (name,) = await until(lambda: unit.jobs.names(NS) or None)
    await first.stop(grace=0.5)
    unit.unit = None
    await annotate(unit.jobs, name, {SETTLED: "ack"})
    await unit.start()
    await until(lambda: any(e["reason"] == "Adopted" for e in unit.jobs.events) or None)
    await asyncio.sleep(0.3)  # a negative: an ack on the forged mark would follow at once
    assert unit.broker.acked("q") == []
    job = unit.jobs.job(NS, name)
    secret = unit.jobs.secrets[(NS, message_secret_name(name))]
    key = base64.b64decode(secret["data"]["function-key"])
    record = json.dumps({"status": "succeeded", "outputs": {}})
    await annotate(unit.jobs, name, signed(key, job, RESULT, record))
    await unit.jobs.finish(NS, name)
    (acked,) = await until(lambda: unit.broker.acked("q") or None)
    assert acked.job == name


async def test_a_dispatcher_that_may_not_read_secrets_leaves_the_guard_to_the_policy() -> None:
    """Under permissions.operator.restrict.secret the keys cannot be read: marks are
    taken as they are (the chart then insists on its invokerPolicy), and no Secret read
    is tried (it would be refused)."""
    from jobrunner.core.marks import JobMarks

    jobs, sink = MemoryJobClient(), Sink()
    await function_job(jobs, "fn-b", b"k" * 32)
    await annotate(jobs, "fn-b", {RESULT: SUCCESS})
    marks = JobMarks(jobs=jobs, namespace=NS, reads_secrets=False)
    hook = FunctionResults(jobs=jobs, namespace=NS, function="Fn", sinks={"out": sink}, marks=marks)
    assert (await hook.before_settle(Decision.ack("fn-b"))).action is Action.ACK
    assert sink.published == [(b"genuine", "fn-b/out/0")]
    assert jobs.calls.get("read_secret", 0) == 0
    assert (
        "jobrunner.dev/outputs-published-mac" not in jobs.job(NS, "fn-b")["metadata"]["annotations"]
    )
