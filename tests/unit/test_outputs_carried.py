"""A function's outputs handed to a source that publishes them in its settle transaction
(jobrunner.dispatch.outputs, ``CarriesOutputs``): only for a live message, only when the source
carries every output still to publish, and then nothing is published beforehand."""

from __future__ import annotations

from jobrunner.core.models import Action, Decision, OutputMessage
from jobrunner.core.protocols import CarriesOutputs, MessageSink
from jobrunner.dispatch.outputs import FunctionResults
from jobrunner.testing import MemoryJobClient
from tests.unit.test_function_marks import NS, RESULT, SUCCESS, Sink, function_job, signed

KEY = b"k" * 32


class Carrier:
    def __init__(self, *carried: MessageSink) -> None:
        self.carried = carried

    def carries(self, sink: MessageSink) -> bool:
        return sink in self.carried


async def hook(carrier: Carrier | None) -> tuple[FunctionResults, Sink]:
    jobs, sink = MemoryJobClient(), Sink()
    job = await function_job(jobs, "fn-b", KEY)
    await jobs.annotate_job(NS, "fn-b", signed(KEY, job, RESULT, SUCCESS))
    results = FunctionResults(jobs=jobs, namespace=NS, function="Fn", sinks={"out": sink})
    assert isinstance(Carrier(), CarriesOutputs)
    results.carrier = carrier
    return results, sink


async def test_a_live_messages_outputs_go_to_the_source_that_carries_them() -> None:
    results, sink = await hook(None)
    carrier = Carrier(sink)
    results.carrier = carrier
    decision = await results.before_settle(Decision.ack("fn-b"), live=True)
    assert decision.action is Action.ACK
    assert decision.outputs == (OutputMessage(sink, b"genuine", "fn-b/out/0"),)
    assert sink.published == [], "published by the source, in its transaction"


async def test_a_kept_copy_or_a_sink_the_source_cannot_carry_is_published_here() -> None:
    for carrier, live in ((Carrier(), True), (None, True)):
        results, sink = await hook(carrier)
        decision = await results.before_settle(Decision.ack("fn-b"), live=live)
        assert decision.outputs == ()
        assert sink.published == [(b"genuine", "fn-b/out/0")]
    results, sink = await hook(None)
    results.carrier = Carrier(sink)
    # No live message (the Job keeps it): no transaction to publish them in.
    decision = await results.before_settle(Decision.ack("fn-b"))
    assert decision.outputs == ()
    assert sink.published == [(b"genuine", "fn-b/out/0")]
