"""Results back to the producer (jobrunner.dispatch.replies) on the in-memory twins: the
reply's body and id, exactly once across a rerun of the settlement, a reply that cannot
go turning into a ``ReplyFailed`` dead letter, and the sources' abuse rules."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import pytest

from jobrunner.core.failpoints import Failpoints, InjectedFault
from jobrunner.core.models import (
    ANNOTATION_REPLIED,
    Action,
    Decision,
    Delivery,
    JobResult,
    Outcome,
    Reply,
    ReplyAddress,
)
from jobrunner.core.protocols import ReplyRefused, SendsReplies
from jobrunner.dispatch.hooks import SettleHooks, chain
from jobrunner.dispatch.replies import RESULT_LIMIT, Replies, reply_body
from jobrunner.manifest.triggers.kafka import topic_allowed
from jobrunner.rendering.renderer import ANNOTATION_ORIGINAL_MESSAGE, original_fields
from jobrunner.sources.kafka import KafkaSource
from jobrunner.sources.rabbitmq import check_reply_queue
from jobrunner.testing import MemoryJobClient

NS = "default"


class ReplySource:
    """A source that answers producers: takes ``metadata.reply_to``, records replies,
    refuses (or fails) as told."""

    def __init__(self) -> None:
        self.sent: list[tuple[ReplyAddress, Reply]] = []
        self.refuse: str = ""
        self.fail_times = 0

    def reply_address(self, message: Mapping[str, Any]) -> ReplyAddress | None:
        reply_to = (message.get("metadata") or {}).get("reply_to")
        if not reply_to:
            return None
        if reply_to == "evil":
            raise ReplyRefused("not allowed")
        corr = str((message.get("metadata") or {}).get("correlation_id") or "")
        return ReplyAddress(reply_to, corr, kind="queue")

    async def send_reply(self, address: ReplyAddress, reply: Reply) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("broker gone")
        if self.refuse:
            raise ReplyRefused(self.refuse)
        self.sent.append((address, reply))


def delivery(**metadata: str) -> Delivery:
    return Delivery(
        source="rabbitmq", identity="m-1", body=b"{}", message_id="m-1", metadata=metadata
    )


async def finished_job(
    jobs: MemoryJobClient, *, keep: Delivery | None = None, succeeded: bool = True
) -> str:
    annotations = {}
    if keep is not None:
        kept = {**original_fields(keep), "body": base64.b64encode(keep.body).decode()}
        annotations[ANNOTATION_ORIGINAL_MESSAGE] = json.dumps(kept)
    job = {
        "metadata": {"name": "work-1", "namespace": NS, "annotations": annotations},
        "spec": {"template": {"spec": {"containers": [{"name": "main"}]}}},
    }
    await jobs.create_job(job, None)
    await jobs.finish(
        NS,
        "work-1",
        succeeded=succeeded,
        exit_code=0 if succeeded else 2,
        termination_message='{"answer": 42}',
    )
    return "work-1"


def replies(jobs: MemoryJobClient, source: ReplySource, **kw: Any) -> Replies:
    assert isinstance(source, SendsReplies)
    return Replies(jobs=jobs, namespace=NS, scaledjob="work", source=source, **kw)


async def test_a_success_is_replied_with_outcome_exit_code_and_termination_message() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    name = await finished_job(jobs)
    message = original_fields(delivery(reply_to="amq.gen-1", correlation_id="c-1"))
    decision = await replies(jobs, source).before_settle(Decision.ack(name), message=message)
    assert decision == Decision.ack(name)
    [(address, reply)] = source.sent
    assert address.destination == "amq.gen-1"
    body = json.loads(reply.body)
    assert body == {
        "id": "work-1/reply/succeeded",
        "correlationId": "c-1",
        "messageId": "m-1",
        "scaledJob": "work",
        "jobName": "work-1",
        "outcome": "succeeded",
        "reason": "Completed",
        "exitCode": 0,
        "durationSeconds": body["durationSeconds"],
        "result": '{"answer": 42}',
        "resultTruncated": False,
    }
    assert reply.reply_id == reply.attributes["id"] == "work-1/reply/succeeded"
    assert reply.attributes["type"] == "dev.jobrunner.job.succeeded"
    assert jobs.job(NS, name)["metadata"]["annotations"][ANNOTATION_REPLIED] == reply.reply_id


async def test_a_settlement_run_again_after_the_record_replies_no_more() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    name = await finished_job(jobs, keep=delivery(reply_to="q-r"))
    hook = replies(jobs, source)
    await hook.before_settle(Decision.ack(name))  # from the Job's kept copy
    await hook.before_settle(Decision.ack(name))
    assert len(source.sent) == 1


async def test_a_crash_between_the_confirm_and_the_record_republishes_the_same_id() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    name = await finished_job(jobs, keep=delivery(reply_to="q-r"))
    crashing = replies(jobs, source, failpoints=Failpoints(["raise:after-reply-sent"]))
    with pytest.raises(InjectedFault):
        await crashing.before_settle(Decision.ack(name))
    await replies(jobs, source).before_settle(Decision.ack(name))
    assert [r.reply_id for _, r in source.sent] == ["work-1/reply/succeeded"] * 2


async def test_a_refused_reply_dead_letters_the_message_reply_failed_with_the_outcome() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    source.refuse = "no queue 'q-r' (returned unroutable)"
    name = await finished_job(jobs, succeeded=False)
    message = original_fields(delivery(reply_to="q-r"))
    failed = Decision.dead_letter("BackoffLimitExceeded", "exit 2", name)
    decision = await replies(jobs, source).before_settle(failed, message=message)
    assert decision.action is Action.DEAD_LETTER
    assert decision.reason == "ReplyFailed"
    assert "queue 'q-r'" in decision.detail
    assert "returned unroutable" in decision.detail
    assert "failed (BackoffLimitExceeded: exit 2)" in decision.detail
    assert ANNOTATION_REPLIED not in jobs.job(NS, name)["metadata"]["annotations"]


async def test_an_address_the_source_refuses_is_a_reply_failure_without_publishing() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    name = await finished_job(jobs)
    message = original_fields(delivery(reply_to="evil"))
    decision = await replies(jobs, source).before_settle(Decision.ack(name), message=message)
    assert (decision.action, decision.reason) == (Action.DEAD_LETTER, "ReplyFailed")
    assert source.sent == []


async def test_a_broker_that_stays_away_is_given_up_on_within_the_bound() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    source.fail_times = 1_000
    name = await finished_job(jobs)
    message = original_fields(delivery(reply_to="q-r"))
    hook = replies(jobs, source, give_up_seconds=0.5)
    decision = await hook.before_settle(Decision.ack(name), message=message)
    assert decision.reason == "ReplyFailed"
    assert "not published within 0.5 s" in decision.detail


async def test_a_passing_outage_is_retried_and_the_reply_goes_once() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    source.fail_times = 2
    name = await finished_job(jobs)
    message = original_fields(delivery(reply_to="q-r"))
    decision = await replies(jobs, source).before_settle(Decision.ack(name), message=message)
    assert decision == Decision.ack(name)
    assert len(source.sent) == 1


async def test_a_message_without_a_reply_address_costs_no_api_call() -> None:
    jobs, source = MemoryJobClient(), ReplySource()
    name = await finished_job(jobs)
    before = dict(jobs.calls)
    message = original_fields(delivery())
    assert await replies(jobs, source).before_settle(Decision.ack(name), message=message) == (
        Decision.ack(name)
    )
    assert jobs.calls == before


def test_a_result_over_the_bound_is_cut_and_said_so() -> None:
    result = JobResult(job_name="j", outcome=Outcome.SUCCEEDED, payload="é" * 4000)
    reply = reply_body(
        decision=Decision.ack("j"),
        result=result,
        address=ReplyAddress("q", "c" * 1000),
        message_id="m",
        scaledjob="s",
        namespace=NS,
    )
    body = json.loads(reply.body)
    assert len(body["result"].encode()) <= RESULT_LIMIT
    assert body["resultTruncated"] is True
    assert len(reply.correlation_id) == 256


def test_the_hooks_are_asked_in_order_and_none_is_none() -> None:
    assert chain(None, None) is None
    source = ReplySource()
    one = replies(MemoryJobClient(), source)
    assert chain(None, one) is one
    assert isinstance(chain(one, one), SettleHooks)


@pytest.mark.parametrize(
    ("reply_to", "why"),
    [
        ("amq.topic/tenant-b.orders", "no exchange"),
        ("amqp://other-broker/vhost", "no other broker"),
        ("amq.direct", "reserves"),
        ("work", "own queue"),
        ("work.dead-letter", "own queue"),
        ("x" * 256, "over 255"),
        ("a\nb", "control"),
    ],
)
def test_a_reply_to_that_is_not_a_plain_queue_of_the_vhost_is_refused(
    reply_to: str, why: str
) -> None:
    with pytest.raises(ReplyRefused, match=why):
        check_reply_queue(reply_to, own=("work", "work.dead-letter"))


@pytest.mark.parametrize("reply_to", ["amq.gen-Xy_12", "amq.rabbitmq.reply-to.g2dk", "replies-a"])
def test_server_named_direct_reply_to_and_plain_queues_are_reply_queues(reply_to: str) -> None:
    check_reply_queue(reply_to, own=("work",))


def kafka(reply_topics: tuple[str, ...]) -> KafkaSource:
    return KafkaSource(
        bootstrap_servers="localhost:9092",
        topic="orders",
        group_id="g",
        max_in_hand=1,
        dead_letter_topic="orders.dead-letter",
        reply_topics=reply_topics,
    )


def test_a_kafka_reply_topic_must_be_allowed_by_reply_topics() -> None:
    source = kafka(("replies.*", "answers"))
    ok = source.reply_address(
        {"headers": {"kafka_replyTopic": "replies.c1", "kafka_correlationId": "k"}}
    )
    assert ok == ReplyAddress("replies.c1", "k", kind="topic")
    assert source.reply_address({"headers": {"reply-topic": "answers"}}) is not None
    assert source.reply_address({"headers": {}}) is None
    for topic, why in [
        ("tenant-b.replies", "not one metadata.replyTopics allows"),
        ("answers-2", "not one metadata.replyTopics allows"),
        ("orders", "own topic"),
        ("replies./../x", "not one metadata.replyTopics allows"),
    ]:
        with pytest.raises(ReplyRefused, match=why):
            source.reply_address({"headers": {"reply-topic": topic}})
    with pytest.raises(ReplyRefused, match="allows none"):
        kafka(()).reply_address({"headers": {"reply-topic": "replies.c1"}})


def test_topic_patterns_are_names_or_prefixes_only() -> None:
    assert topic_allowed("replies.a", ("replies.*",))
    assert not topic_allowed("replies", ("replies.*",))
    assert not topic_allowed("bad topic", ("bad*",))
