"""The rules between a JobSpec's fields that the API server adds to its schema
(batch/v1 JobSpec validation rules): refused at start for a template as written, naming
the field, on a cluster and locally alike, instead of a 422 for every message."""

from __future__ import annotations

from typing import Any

import pytest

from jobrunner.manifest import jobschema

POD = {"template": {"spec": {"containers": [{"name": "work", "image": "x", "command": ["r"]}]}}}


def policy(**rule: Any) -> dict[str, Any]:
    return {"podFailurePolicy": {"rules": [{"action": "FailJob", **rule}]}}


EXIT_42 = {"onExitCodes": {"operator": "In", "values": [42]}}


def with_restart(policy: str) -> dict[str, Any]:
    pod = {"spec": {**POD["template"]["spec"], "restartPolicy": policy}}
    return {"template": pod}


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        ({"completionMode": "Indexed"}, "completions", "required when completionMode is Indexed"),
        (
            {"completionMode": "NonIndexed", "backoffLimitPerIndex": 1},
            "backoffLimitPerIndex",
            "requires completionMode: Indexed",
        ),
        (
            {"completionMode": "NonIndexed", "successPolicy": {"rules": []}},
            "successPolicy",
            "requires completionMode: Indexed",
        ),
        (
            {**policy(**EXIT_42), **with_restart("OnFailure")},
            "template.spec.restartPolicy",
            "only Never is supported when podFailurePolicy is specified",
        ),
        (
            {**policy(**EXIT_42), "podReplacementPolicy": "TerminatingOrFailed"},
            "podReplacementPolicy",
            "must be Failed when podFailurePolicy is used",
        ),
        (
            policy(action="FailIndex", **EXIT_42),
            "podFailurePolicy.rules[0].action",
            "FailIndex requires backoffLimitPerIndex",
        ),
        (
            policy(onExitCodes={"operator": "In", "values": [1], "containerName": "wrok"}),
            "podFailurePolicy.rules[0].onExitCodes.containerName",
            "'wrok' is not a container of the pod template (it has work)",
        ),
        (
            policy(**EXIT_42, onPodConditions=[{"type": "DisruptionTarget", "status": "True"}]),
            "podFailurePolicy.rules[0]",
            "give onExitCodes or onPodConditions, not both",
        ),
    ],
)
def test_rules_between_job_fields_are_refused_naming_the_field(
    spec: dict[str, Any], field: str, says: str
) -> None:
    template = {**POD, **spec}
    problems = {p.field(): p.text for p in jobschema.check_template(template)}
    assert field in problems, problems
    assert says in problems[field]
    # A rendered Job is held to the same rules.
    rendered = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j"},
        "spec": template,
    }
    assert any(p.field() == f"spec.{field}" for p in jobschema.check_object(rendered))


@pytest.mark.parametrize(
    "spec",
    [
        {"completionMode": "Indexed", "completions": 1},
        {**policy(**EXIT_42), "podReplacementPolicy": "Failed", **with_restart("Never")},
        policy(onExitCodes={"operator": "In", "values": [1], "containerName": "work"}),
        {"completionMode": "{{ message.json.mode }}", "backoffLimitPerIndex": 1},
        policy(onExitCodes={"operator": "In", "values": [1], "containerName": "{{ x }}"}),
    ],
)
def test_what_the_api_server_accepts_passes(spec: dict[str, Any]) -> None:
    assert jobschema.check_template({**POD, **spec}) == []
