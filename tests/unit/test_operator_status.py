"""jobrunner.operator.status: what a ScaledJob's status says (issue 21 §7)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from jobrunner.core.protocols import ApiRejected
from jobrunner.kube.client import _rejection
from jobrunner.operator import api
from jobrunner.operator.resources import wanted_from
from jobrunner.operator.status import (
    REJECTED_NOT_READY,
    StatusWriter,
    rejected_problem,
    rejection_summary,
    unserved_status,
)
from jobrunner.testing import MemoryObjects
from tests.unit.test_operator import NS
from tests.unit.test_operator_registry import scaledjob_object

INVALID = {
    "kind": "Status",
    "status": "Failure",
    "message": 'Job.batch "x" is invalid: spec.template.spec.containers[0].name: Invalid '
    'value: "Report_1": a lowercase RFC 1123 label must consist of ...',
    "reason": "Invalid",
    "details": {
        "name": "x",
        "kind": "Job",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: "Report_1": a lowercase RFC 1123 label',
                "field": "spec.template.spec.containers[0].name",
            },
            {"reason": "not a cause type!", "field": "spec.x"},
            {"reason": "FieldValueRequired", "field": 'has spaces and "quotes"'},
        ],
    },
    "code": 422,
}


def test_a_refusal_is_told_by_its_status_reason_and_fields_without_the_servers_text() -> None:
    exc = _rejection(422, "Unprocessable Entity", json.dumps(INVALID).encode())
    assert isinstance(exc, ApiRejected)
    summary = rejection_summary(exc)
    assert summary == "422 Invalid: spec.template.spec.containers[0].name (FieldValueInvalid)"
    assert rejection_summary(ApiRejected(403, "Forbidden", "jobs is forbidden: User ...")) == (
        "403 Forbidden"
    )


def test_only_refusals_in_a_row_make_a_consuming_scaledjob_not_ready() -> None:
    exc = ApiRejected(422, "Invalid", "text", causes=(("spec.a", "FieldValueInvalid"),))
    lifecycle = SimpleNamespace(rejected_in_row=1, last_rejection=exc)
    unit = SimpleNamespace(dispatcher=SimpleNamespace(lifecycle=lifecycle))
    assert rejected_problem(unit) is None
    unit.dispatcher.lifecycle.rejected_in_row = REJECTED_NOT_READY
    first = rejected_problem(unit)
    assert first is not None
    assert "422 Invalid: spec.a (FieldValueInvalid)" in first
    unit.dispatcher.lifecycle.rejected_in_row += 5
    assert rejected_problem(unit) == first  # the condition does not change with the count
    unit.dispatcher.lifecycle.rejected_in_row = 0  # a Job accepted since
    assert rejected_problem(unit) is None


def test_a_scaledjob_nobody_serves_keeps_its_history_but_claims_nothing() -> None:
    current = {
        "observedGeneration": 3,
        "owner": "op-a",
        "activeJobs": 2,
        "lastError": {"message": "old", "time": "2026-01-01T00:00:00Z"},
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "DispatcherReady", "message": "m"},
            {"type": "Active", "status": "True", "reason": "JobsActive", "message": "m"},
            {"type": "Paused", "status": "False", "reason": "ScaledJobUnpaused", "message": "m"},
        ],
    }
    status = unserved_status(current, reason="NoOperator", message="op-a stopped")
    by_type = {c["type"]: c for c in status["conditions"]}
    assert (by_type["Ready"]["status"], by_type["Ready"]["reason"]) == ("Unknown", "NoOperator")
    assert by_type["Active"]["status"] == "Unknown"
    assert by_type["Paused"] == current["conditions"][2]
    assert status["owner"] is None
    assert status["activeJobs"] is None
    assert status["lastError"] == current["lastError"]
    assert status["observedGeneration"] == 3


async def test_a_status_another_replica_wrote_meanwhile_is_written_over() -> None:
    """A survivor may write OwnerGone on a ScaledJob whose owner was only slow: when
    the owner sees an object newer than its own write with another status, it writes
    again; an object not newer than its write (a lagging watch) is not written over."""
    store = MemoryObjects()
    owner, survivor = store.client("owner"), store.client("survivor")
    body = scaledjob_object("work", queue="q")
    created = await owner.create(api.scaledjobs(NS), body)
    want = wanted_from(created)
    writer = StatusWriter(owner)
    ready = {"owner": "op-a", "conditions": [{"type": "Ready", "status": "True"}]}
    assert await writer.sync(want, ready, {}, version=int(created["metadata"]["resourceVersion"]))
    path = api.item(api.scaledjobs(NS), "work", "status", what="ScaledJob name")
    gone = {"owner": "op-a", "conditions": [{"type": "Ready", "status": "Unknown"}]}
    stale = int(created["metadata"]["resourceVersion"])
    assert not await writer.sync(want, ready, {}, version=stale), "a lagging watch: no write"
    newer = await survivor.patch(path, {"status": gone})
    version = int(newer["metadata"]["resourceVersion"])
    assert await writer.sync(want, ready, gone, version=version)
    assert (store.find(api.item(api.scaledjobs(NS), "work", what="n")) or {})["status"][
        "conditions"
    ] == ready["conditions"]
