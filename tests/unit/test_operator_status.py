"""jobrunner.operator.status: what a ScaledJob's status says (issue 21 §7)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from jobrunner.kube.client import _rejection
from jobrunner.operator.status import (
    REJECTED_NOT_READY,
    rejected_problem,
    rejection_summary,
    unserved_status,
)
from jobrunner.protocols import ApiRejected

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
            {"reason": "FieldValueRequired", "field": "has spaces and \"quotes\""},
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
    unit = SimpleNamespace(dispatcher=SimpleNamespace(rejected_in_row=1, last_rejection=exc))
    assert rejected_problem(unit) is None
    unit.dispatcher.rejected_in_row = REJECTED_NOT_READY
    first = rejected_problem(unit)
    assert first is not None
    assert "422 Invalid: spec.a (FieldValueInvalid)" in first
    unit.dispatcher.rejected_in_row += 5
    assert rejected_problem(unit) == first  # the condition does not change with the count
    unit.dispatcher.rejected_in_row = 0  # a Job accepted since
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
