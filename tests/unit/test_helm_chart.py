"""The Helm chart, offline: `helm lint --strict`, and what `helm template` renders for
the values that matter (RBAC scope, least privilege, probes, security context)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.helm import CHART, helm


def render(
    *sets: str, namespace: str = "jr-system", extra: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "-n", namespace, *extra]
    for item in sets:
        args += ["--set", item]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_chart_passes_helm_lint_strict() -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout


def test_lint_strict_fails_on_values_the_schema_refuses() -> None:
    for bad in ("replicaCount=-1", "leases.buckets=0", "watchNamespace=typo", "logLevel=LOUD"):
        result = helm("lint", "--strict", str(CHART), "--set", bad, check=False)
        assert result.returncode != 0, bad
        assert "values don't meet the specifications of the schema" in result.stdout + result.stderr


def refused(*sets: str) -> str:
    """What `helm lint --strict` and `helm template` say refusing these values (both
    must refuse them); the template's message."""
    args = [arg for item in sets for arg in ("--set", item)]
    lint = helm("lint", "--strict", str(CHART), *args, check=False)
    assert lint.returncode != 0, (sets, lint.stdout)
    template = helm("template", "rel", str(CHART), *args, check=False)
    assert template.returncode != 0, sets
    return template.stderr


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("podDisruptionBudget.maxUnavailable=abc", "'abc' does not match pattern"),
        ("podDisruptionBudget.maxUnavailable=101%", "'101%' does not match pattern"),
        ("podDisruptionBudget.maxUnavailable=-1", "minimum: got -1, want 0"),
        ("podDisruptionBudget.maxUnavailable=null", "missing property 'maxUnavailable'"),
        ("leases.durationSeconds=-3", "exclusiveMinimum: got -3, want 0"),
        ("leases.renewSeconds=soon", "'soon' does not match pattern"),
        ("shutdownGraceSeconds=-1", "minimum: got -1, want 0"),
        ("fullnameOverride=Job_Runner", "'Job_Runner' does not match pattern"),
        ("nameOverride=job.runner", "'job.runner' does not match pattern"),
        ("serviceMonitor.scrapeTimeout=10 seconds", "'10 seconds' does not match pattern"),
    ],
)
def test_schema_refuses_what_kubernetes_or_the_operator_would(bad: str, message: str) -> None:
    stderr = refused(bad)
    assert "values don't meet the specifications of the schema" in stderr
    assert message in stderr


def test_names_and_durations_the_schema_checks_still_render() -> None:
    docs = render(
        "fullnameOverride=ops-jobrunner",
        "serviceMonitor.enabled=true",
        "serviceMonitor.interval=1m30s",
        "serviceMonitor.scrapeTimeout=10s",
        extra=("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"),
    )
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["name"] == "ops-jobrunner"
    assert monitor["spec"]["endpoints"][0]["interval"] == "1m30s"
    assert monitor["spec"]["endpoints"][0]["scrapeTimeout"] == "10s"


def test_pdb_takes_an_integer_or_a_percentage() -> None:
    (pdb,) = of_kind(render("podDisruptionBudget.maxUnavailable=50%"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "50%"
    (pdb,) = of_kind(render("podDisruptionBudget.maxUnavailable=2"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 2


def test_decimal_seconds_pass_through_set_as_the_operator_takes_them() -> None:
    # `--set` passes decimals as strings; the operator's settings are floats.
    deployment = of_kind(
        render("leases.durationSeconds=15.5", "shutdownGraceSeconds=2.5"), "Deployment"
    )[0]
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["JOBRUNNER_OPERATOR__LEASE_DURATION_SECONDS"] == "15.5"
    assert env["JOBRUNNER_DISPATCHER__SHUTDOWN_GRACE_SECONDS"] == "2.5"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            ("leases.renewSeconds=20",),
            "0 < renewSeconds (20) < renewDeadlineSeconds (10) < durationSeconds (15) must hold",
        ),
        (
            ("leases.renewDeadlineSeconds=15",),
            "0 < renewSeconds (3) < renewDeadlineSeconds (15) < durationSeconds (15) must hold",
        ),
        (
            ("leases.durationSeconds=9.5",),
            "renewDeadlineSeconds (10) < durationSeconds (9.5) must hold",
        ),
        (
            ("terminationGracePeriodSeconds=5",),
            "terminationGracePeriodSeconds (5) must exceed shutdownGraceSeconds (20)",
        ),
        (
            ("shutdownGraceSeconds=40.5",),
            "terminationGracePeriodSeconds (40) must exceed shutdownGraceSeconds (40.5)",
        ),
        (
            ("podDisruptionBudget.maxUnavailable=0",),
            "podDisruptionBudget.maxUnavailable (0) must allow at least one eviction",
        ),
        (
            ("podDisruptionBudget.maxUnavailable=0%",),
            "podDisruptionBudget.maxUnavailable (0%) must allow at least one eviction",
        ),
    ],
)
def test_values_that_would_install_and_not_work_are_refused(
    bad: tuple[str, ...], message: str
) -> None:
    assert message in refused(*bad)


def test_the_cross_field_rules_let_good_values_through() -> None:
    docs = render(
        "leases.renewSeconds=1.5",
        "leases.renewDeadlineSeconds=4",
        "leases.durationSeconds=6",
        "shutdownGraceSeconds=5",
        "terminationGracePeriodSeconds=6",
    )
    assert (
        of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 6
    )
    disabled = render("podDisruptionBudget.enabled=false", "podDisruptionBudget.maxUnavailable=0")
    assert of_kind(disabled, "PodDisruptionBudget") == []


def test_default_install_watches_every_namespace_with_one_cluster_binding() -> None:
    docs = render()
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "rel-jobrunner"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-jobrunner", "namespace": "jr-system"}
    ]
    deployment = of_kind(docs, "Deployment")[0]
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["JOBRUNNER_OPERATOR__WATCH_NAMESPACES"] == ""
    assert env["JOBRUNNER_OPERATOR__LEASE_NAMESPACE"] == "jr-system"
    assert env["JOBRUNNER_OPERATOR__LEASE_GROUP"] == "rel-jobrunner"


def test_watched_namespaces_get_a_rolebinding_each_and_no_cluster_binding() -> None:
    docs = render("watchNamespaces={media,etl}")
    assert of_kind(docs, "ClusterRoleBinding") == []
    bindings = {
        d["metadata"]["namespace"]: d
        for d in of_kind(docs, "RoleBinding")
        if d["roleRef"]["kind"] == "ClusterRole"
    }
    assert set(bindings) == {"media", "etl"}
    deployment = of_kind(docs, "Deployment")[0]
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["JOBRUNNER_OPERATOR__WATCH_NAMESPACES"] == "media,etl"


def test_rbac_is_least_privilege() -> None:
    docs = render()
    (cluster_role,) = of_kind(docs, "ClusterRole")
    grants = {
        (group, resource): set(rule["verbs"])
        for rule in cluster_role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert ("", "pods") not in grants
    assert ("", "pods/log") not in grants
    assert grants[("", "secrets")] == {"get", "create"}, (
        "no list or watch of Secrets, nor patch or delete: a message Secret is created "
        "owned by its Job"
    )
    assert grants[("jobrunner.dev", "scaledjobs")] == {"get", "list", "watch"}
    assert grants[("jobrunner.dev", "scaledjobs/status")] == {"patch"}
    assert ("keda.sh", "scaledjobs") not in grants
    assert not any(group == "coordination.k8s.io" for group, _ in grants), "Leases: release ns only"
    (role,) = of_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "jr-system"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        }
    ]


def test_opt_ins_add_exactly_their_rights() -> None:
    (cluster_role,) = of_kind(render("kedaTakeover=true", "rbac.readPodLogs=true"), "ClusterRole")
    resources = {
        (g, r)
        for rule in cluster_role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {("keda.sh", "scaledjobs"), ("keda.sh", "triggerauthentications")} <= resources
    assert {("", "pods"), ("", "pods/log")} <= resources


def test_deployment_has_probes_security_context_spread_and_a_pdb() -> None:
    docs = render()
    deployment = of_kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["operator"]
    assert container["image"] == "jobrunner:0.1.0"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert deployment["spec"]["replicas"] == 2
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    # Unready replicas (informers unsynced: CRDs missing, RBAC wrong) must not block a drain.
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ):
            assert key in labels, (doc["kind"], key)


def test_service_monitor_renders_only_where_its_crd_exists() -> None:
    assert of_kind(render(), "ServiceMonitor") == []
    result = helm(
        "template", "rel", str(CHART), "--set", "serviceMonitor.enabled=true", check=False
    )
    assert result.returncode != 0
    assert "ServiceMonitor CRD" in result.stderr
    docs = render(
        "serviceMonitor.enabled=true",
        extra=("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"),
    )
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize(
    "name", ["scaledjobs.jobrunner.dev.yaml", "triggerauthentications.jobrunner.dev.yaml"]
)
def test_chart_installs_the_generated_crds(name: str) -> None:
    assert (CHART / "crds" / name).read_text() == (CHART.parents[1] / "crds" / name).read_text()
