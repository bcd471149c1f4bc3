"""The admission policy that narrows a function's pod to its own Job's result, as the
chart ships it and as ``functions import`` writes it: the same rules in both (no drift),
the chart's opt-out and exemptions, and the invoker's Role reduced to what it uses.
(On the API server itself: tests/integration/test_functions_cluster.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.cli import main as cli
from jobrunner.functions import policy
from tests.helm import CHART, helm


def chart_policy(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "rel", str(CHART), "-n", "ops", *args).stdout
    return [
        d
        for d in yaml.safe_load_all(out)
        if d and d["kind"].startswith("ValidatingAdmissionPolicy")
    ]


def test_the_charts_rules_are_the_ones_functions_import_writes() -> None:
    vap, binding = chart_policy()
    assert vap["spec"]["variables"] == policy.VARIABLES
    assert vap["spec"]["validations"] == policy.VALIDATIONS
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert vap["spec"]["matchConstraints"]["objectSelector"] == {"matchLabels": policy.MANAGED_BY}
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    imported, _ = policy.invoker_policy("shop", "media")
    assert imported["spec"]["matchConstraints"] == vap["spec"]["matchConstraints"]


def test_the_chart_exempts_the_operator_and_the_accounts_named_and_binds_watched_namespaces() -> (
    None
):
    vap, binding = chart_policy(
        "--set",
        "watchNamespaces={media,etl}",
        "--set",
        "invokerPolicy.exemptServiceAccounts={system:serviceaccount:ci:cleaner}",
    )
    conditions = {c["name"]: c["expression"] for c in vap["spec"]["matchConditions"]}
    assert conditions["not-exempt"] == (
        '!(request.userInfo.username in ["system:serviceaccount:ops:rel-jobrunner",'
        '"system:serviceaccount:ci:cleaner"])'
    )
    assert "authentication.kubernetes.io/pod-name" in conditions["a-token-bound-to-a-pod"]
    (rule,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert rule == {
        "key": "kubernetes.io/metadata.name",
        "operator": "In",
        "values": ["media", "etl"],
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--kube-version", "1.29.0"), "invokerPolicy.enabled needs ValidatingAdmissionPolicy"),
        (
            ("--set", "invokerPolicy.enabled=false", "--set",
             "permissions.operator.restrict.secret=true"),
            "permissions.operator.restrict.secret needs invokerPolicy.enabled",
        ),
    ],
)  # fmt: skip
def test_the_chart_refuses_values_that_would_leave_function_results_unguarded(
    args: tuple[str, ...], message: str
) -> None:
    result = helm("template", "rel", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_chart_policy_can_be_turned_off_and_refuses_a_malformed_exemption() -> None:
    assert chart_policy("--set", "invokerPolicy.enabled=false") == []
    bad = helm(
        "template", "rel", str(CHART), "--set", "invokerPolicy.exemptServiceAccounts={cleaner}",
        check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "exemptServiceAccounts" in bad.stderr


@pytest.mark.parametrize("namespace", [None, "media"])
def test_functions_import_writes_a_patch_only_role_and_the_policy(
    namespace: str | None, tmp_path: Path
) -> None:
    app = tmp_path / "shop"
    (app / "Fn").mkdir(parents=True)
    (app / "host.json").write_text(
        '{"customHandler": {"description": {"defaultExecutablePath": "h"}}}'
    )
    (app / "Fn" / "function.json").write_text(
        '{"bindings": [{"type": "queueTrigger", "direction": "in", "name": "m", "queueName": "q"}]}'
    )
    out = tmp_path / "out"
    extra = ["-n", namespace] if namespace else []
    assert cli(["functions", "import", str(app), "-o", str(out), *extra]) == 0
    role = next(
        d for d in yaml.safe_load_all((out / "shop-rbac.yaml").read_text()) if d["kind"] == "Role"
    )
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["patch"]}]
    vap, binding = yaml.safe_load_all((out / "shop-policy.yaml").read_text())
    assert vap["spec"]["validations"] == policy.VALIDATIONS
    (condition,) = vap["spec"]["matchConditions"]
    if namespace:
        assert vap["metadata"]["name"] == "jobrunner-invoker.media.shop"
        assert condition["expression"] == (
            "request.userInfo.username == 'system:serviceaccount:media:shop-invoker'"
        )
        assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0][
            "values"
        ] == ["media"]
    else:
        assert vap["metadata"]["name"] == "jobrunner-invoker.shop"
        assert condition["expression"].endswith(".endsWith(':shop-invoker')")
        assert "matchResources" not in binding["spec"]


def test_two_apps_policies_never_share_a_name() -> None:
    """The policy is cluster-scoped: a name two (app, namespace) pairs share would let one
    import replace another's policy, leaving that app's invoker unconfined."""
    pairs = [("a-b", "c"), ("a", "b-c"), ("a-b-c", None), ("a", "b"), ("a-b", None)]
    names = [policy.invoker_policy(app, ns)[0]["metadata"]["name"] for app, ns in pairs]
    assert len(set(names)) == len(pairs)
    for (app, ns), name in zip(pairs, names, strict=True):
        assert name == policy.invoker_policy_name(app, ns)
        assert policy.invoker_policy(app, ns)[1]["spec"]["policyName"] == name
