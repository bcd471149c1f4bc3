"""The Helm chart, offline: `helm lint --strict`, and what `helm template` renders for
the values that matter (RBAC scope, least privilege, probes, security context)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
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
    # The same words from both: a template's refusal (lint prints it in its log and its
    # [ERROR] line), or the schema's "- at '/field': ..." line.
    lines = template.stderr.splitlines()
    if lines[0].startswith("Error: execution error"):
        said = lines[0].split("): ", 1)[1]
    else:
        said = next(line for line in lines if line.startswith("- at "))
    assert said in lint.stdout + lint.stderr, (said, lint.stdout + lint.stderr)
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
        ("resources.requests.cpu=-1", "at '/resources/requests/cpu': minimum: got -1, want 0"),
        ("resources.request.cpu=1", "additional properties 'request' not allowed"),
        ("resources.requests=lots", "at '/resources/requests': got string, want object"),
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
    (pdb,) = of_kind(
        render("podDisruptionBudget.maxUnavailable=2", "replicaCount=3"), "PodDisruptionBudget"
    )
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


# Values that pass the schema's types and would install, and then not work: each refused
# by the templates, so that `helm lint`, `helm template` and `helm install` (the same
# render; tests/integration/test_operator_rbac.py runs it on the cluster) all refuse it
# with the same one line.
INSTALLS_AND_CANNOT_WORK: list[tuple[tuple[str, ...], str]] = [
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
    (
        ("podDisruptionBudget.maxUnavailable=3",),
        "podDisruptionBudget.maxUnavailable (3) lets a drain evict 3 pod(s) at once, every one "
        "of the 2 replica(s), leaving none to take their ScaledJobs over; use at most 1",
    ),
    (
        ("podDisruptionBudget.maxUnavailable=2",),
        "podDisruptionBudget.maxUnavailable (2) lets a drain evict 2 pod(s) at once",
    ),
    (
        ("podDisruptionBudget.maxUnavailable=100%", "replicaCount=4"),
        "podDisruptionBudget.maxUnavailable (100%) lets a drain evict 4 pod(s) at once",
    ),
    (
        ("podDisruptionBudget.maxUnavailable=2", "replicaCount=1"),
        "evict 2 pod(s) at once, every one of the 1 replica(s), leaving none to take their "
        "ScaledJobs over; use at most 1",
    ),
    (
        ("leases.buckets=2", "replicaCount=3"),
        "leases.buckets (2) must be at least replicaCount (3): a replica serves the ScaledJobs "
        "of the buckets it holds, one holder each, so 1 replica(s) would hold none",
    ),
    (
        ("labelSelector=team in (a",),
        'labelSelector "team in (a" is not a Kubernetes label selector',
    ),
    (("labelSelector=team in ()",), "is not a Kubernetes label selector"),
    (("labelSelector=team=a b",), "is not a Kubernetes label selector"),
    (("labelSelector==media",), "is not a Kubernetes label selector"),
    (("labelSelector=Team_/x=a",), "is not a Kubernetes label selector"),
    (("labelSelector=team=a\\,",), "is not a Kubernetes label selector"),
    (
        ("resources.requests.memory=lots",),
        "resources.requests.memory (lots) is not a Kubernetes quantity: write e.g. 128Mi",
    ),
    (("resources.limits.memory=512MB",), "resources.limits.memory (512MB) is not a"),
    (("resources.requests.cpu=-1m",), "resources.requests.cpu (-1m) is not a Kubernetes"),
    (("resources.requests.cpu=1 core",), "resources.requests.cpu (1 core) is not a"),
    (
        ("resources.requests.memory=1Gi",),
        "resources.requests.memory (1Gi) exceeds resources.limits.memory (512Mi): Kubernetes "
        "refuses such a pod",
    ),
    (
        ("resources.requests.cpu=1500m", "resources.limits.cpu=1"),
        "resources.requests.cpu (1500m) exceeds resources.limits.cpu (1)",
    ),
    (
        ("resources.requests.memory=0.6G",),
        "resources.requests.memory (0.6G) exceeds resources.limits.memory (512Mi)",
    ),
]


@pytest.mark.parametrize(("bad", "message"), INSTALLS_AND_CANNOT_WORK)
def test_values_that_would_install_and_not_work_are_refused(
    bad: tuple[str, ...], message: str
) -> None:
    assert message in refused(*bad)


@pytest.mark.parametrize(
    "good",
    [
        ("labelSelector=team=media",),
        ("labelSelector=team==media",),
        ("labelSelector=team in (a\\,b)\\,!legacy",),
        ("labelSelector=app.kubernetes.io/part-of notin (x)",),
        ("labelSelector=team",),
        ("labelSelector=team=",),
        ("resources.requests.memory=512Mi",),
        ("resources.requests.memory=536870912",),
        ("resources.requests.cpu=0.5", "resources.limits.cpu=500m"),
        ("resources.requests.memory=1e3",),
        ("leases.buckets=3", "replicaCount=3"),
        ("podDisruptionBudget.maxUnavailable=2", "replicaCount=3"),
        ("podDisruptionBudget.maxUnavailable=50%",),
        ("podDisruptionBudget.maxUnavailable=100%", "replicaCount=1"),
        ("replicaCount=0",),
    ],
)
def test_values_next_to_the_refused_ones_render(good: tuple[str, ...]) -> None:
    assert of_kind(render(*good), "Deployment")


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


def grants_of(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> every verb a rule grants on it (any name or some)."""
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_rbac_is_least_privilege() -> None:
    docs = render()
    (cluster_role,) = of_kind(docs, "ClusterRole")
    grants = grants_of(cluster_role)
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
    assert grants[("kueue.x-k8s.io", "workloads")] == {"list"}, "Kueue's reasons, nothing more"
    assert not any(g == "kueue.x-k8s.io" and r != "workloads" for g, r in grants)
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


def test_http_trigger_is_off_by_default_no_port_and_no_token_reviews() -> None:
    docs = render()
    assert all("tokenreview" not in d["metadata"]["name"] for d in docs)
    (service,) = of_kind(docs, "Service")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    env = operator_env(docs)
    assert "JOBRUNNER_HTTP__LISTEN_ADDRESS" not in env


def test_http_trigger_gets_its_port_and_a_cluster_wide_token_review_right_only() -> None:
    docs = render("httpTrigger.enabled=true", "replicaCount=1", "watchNamespaces={media}")
    (deployment,) = of_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "http-events": 8081}
    assert operator_env(docs)["JOBRUNNER_HTTP__LISTEN_ADDRESS"] == "0.0.0.0:8081"
    (service,) = of_kind(docs, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8080, "http"),
        "http-events": (8081, "http-events"),
    }
    roles = {r["metadata"]["name"]: r for r in of_kind(docs, "ClusterRole")}
    review = roles["rel-jobrunner-tokenreview"]
    assert review["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        }
    ]
    assert ("authentication.k8s.io", "tokenreviews") not in grants_of(roles["rel-jobrunner"])
    # A TokenReview is cluster-scoped: a RoleBinding in the watched namespace cannot grant
    # it, so it is bound cluster-wide even when namespaces are watched.
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "rel-jobrunner-tokenreview"
    assert binding["subjects"][0]["name"] == "rel-jobrunner"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (("httpTrigger.enabled=true", "replicaCount=1", "httpTrigger.port=8080"),
         "httpTrigger.port is service.port"),
        (("httpTrigger.enabled=true",), "httpTrigger.enabled needs replicaCount: 1"),
    ],
)  # fmt: skip
def test_http_trigger_values_that_cannot_work_are_refused(
    bad: tuple[str, ...], message: str
) -> None:
    assert message in refused(*bad)


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


def test_service_monitor_renders_without_a_cluster_when_asked_for() -> None:
    # `helm template` (GitOps renders, CI diffs) sees no cluster CRDs: a check there would
    # refuse what installs fine; on a cluster without the CRD, `helm install` refuses it
    # (tests/integration/test_operator_rbac.py).
    assert of_kind(render(), "ServiceMonitor") == []
    lint = helm("lint", "--strict", str(CHART), "--set", "serviceMonitor.enabled=true")
    assert "0 chart(s) failed" in lint.stdout
    (monitor,) = of_kind(render("serviceMonitor.enabled=true"), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "rel"


@pytest.mark.parametrize(
    "name", ["scaledjobs.jobrunner.dev.yaml", "triggerauthentications.jobrunner.dev.yaml"]
)
def test_chart_installs_the_generated_crds(name: str) -> None:
    assert (CHART / "crds" / name).read_text() == (CHART.parents[1] / "crds" / name).read_text()


# ---------------------------------------------------------------- a shared cluster


def secret_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (cluster_role,) = of_kind(docs, "ClusterRole")
    return [r for r in cluster_role["rules"] if "secrets" in r["resources"]]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str | None]:
    deployment = of_kind(docs, "Deployment")[0]
    return {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_default_lets_the_operator_get_any_secret_by_name_and_read_message_secrets() -> None:
    docs = render()
    unnamed = {v for r in secret_rules(docs) if "resourceNames" not in r for v in r["verbs"]}
    assert "get" in unnamed
    assert not {"list", "watch"} & unnamed
    assert operator_env(docs)["JOBRUNNER_DISPATCHER__READ_MESSAGE_SECRETS"] == "true"


def test_restrict_secret_grants_get_on_the_allow_listed_names_only() -> None:
    docs = render(
        "permissions.operator.restrict.secret=true",
        "permissions.operator.restrict.namesAllowList={broker,kafka-creds}",
    )
    rules = secret_rules(docs)
    getters = [r for r in rules if "get" in r["verbs"]]
    assert getters == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get"],
            "resourceNames": ["broker", "kafka-creds"],
        }
    ]
    # What no name can narrow stays: creating the per-Job message Secret. Nothing that
    # returns a Secret's data without a name (get/list/watch) is left.
    # (`patch` returns the object too, so it reads as much as `get`: it goes once the
    # message Secret is created with its owner, and then this set is {"create"}.)
    unnamed = {v for r in rules if "resourceNames" not in r for v in r["verbs"]}
    assert "create" in unnamed
    assert unnamed <= {"create", "patch"}
    # The operator is told it cannot read its message Secrets back.
    assert operator_env(docs)["JOBRUNNER_DISPATCHER__READ_MESSAGE_SECRETS"] == "false"


def test_restrict_secret_with_no_names_grants_no_get_at_all() -> None:
    rules = secret_rules(render("permissions.operator.restrict.secret=true"))
    assert all("get" not in r["verbs"] for r in rules)
    assert any("create" in r["verbs"] for r in rules)


def test_restrict_applies_through_watched_namespace_bindings_too() -> None:
    docs = render(
        "permissions.operator.restrict.secret=true",
        "permissions.operator.restrict.namesAllowList={broker}",
        "watchNamespaces={media}",
    )
    assert of_kind(docs, "ClusterRoleBinding") == []
    (getter,) = [r for r in secret_rules(docs) if "get" in r["verbs"]]
    assert getter["resourceNames"] == ["broker"]


def test_an_allow_list_without_restrict_is_refused_as_narrowing_nothing() -> None:
    message = refused("permissions.operator.restrict.namesAllowList={broker}")
    assert "permissions.operator.restrict.namesAllowList (broker) narrows nothing" in message
    assert "set restrict.secret=true" in message


NETPOL = (
    "networkPolicy.enabled=true",
    "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
)
DESTINATIONS = json.dumps(
    [
        {"name": "rabbitmq", "cidr": "10.20.0.0/24", "except": ["10.20.0.9/32"],
         "ports": [{"port": 5672}, {"port": 15672}]},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "brokers"}},
         "podSelector": {}, "ports": [{"port": 9092, "endPort": 9094}]},
        {"podSelector": {"matchLabels": {"app": "nats"}},
         "ports": [{"port": "client", "protocol": "TCP"}]},
    ]
)  # fmt: skip


def test_network_policy_is_off_by_default() -> None:
    assert of_kind(render(), "NetworkPolicy") == []


def test_network_policy_allows_dns_the_api_server_and_the_listed_brokers_only() -> None:
    docs = render(*NETPOL, extra=("--set-json", f"networkPolicy.destinations={DESTINATIONS}"))
    (policy,) = of_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "jobrunner",
        "app.kubernetes.io/instance": "rel",
    }
    assert spec["policyTypes"] == ["Egress"], "ingress (metrics, probes) is left alone"
    dns, api, rabbit, kafka, nats = spec["egress"]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert api == {
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
        "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 6443}],
    }
    assert rabbit["to"] == [{"ipBlock": {"cidr": "10.20.0.0/24", "except": ["10.20.0.9/32"]}}]
    assert [p["port"] for p in rabbit["ports"]] == [5672, 15672]
    # An empty selector is kept: {} means every pod of the selected namespaces.
    assert kafka["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "brokers"}},
            "podSelector": {},
        }
    ]
    assert kafka["ports"] == [{"protocol": "TCP", "port": 9092, "endPort": 9094}]
    assert nats["to"] == [{"podSelector": {"matchLabels": {"app": "nats"}}}]
    assert nats["ports"] == [{"protocol": "TCP", "port": "client"}]
    # Nothing else: no rule without a destination (that would allow everything).
    assert all(rule.get("to") for rule in spec["egress"])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("networkPolicy.enabled=true", "networkPolicy.apiServer.cidrs={10.0.0.1/32}"),
            "networkPolicy.enabled with no networkPolicy.destinations",
        ),
        (
            ("networkPolicy.enabled=true", "networkPolicy.destinations[0].cidr=10.0.0.9/32",
             "networkPolicy.destinations[0].ports[0].port=5672"),
            "the API server's addresses are not known: set networkPolicy.apiServer.cidrs",
        ),
    ],
)  # fmt: skip
def test_a_network_policy_that_would_cut_the_operator_off_is_refused(
    sets: tuple[str, ...], message: str
) -> None:
    assert message in refused(*sets)


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ({"cidr": "10.0.0.0/8"}, "missing property 'ports'"),
        ({"cidr": "10.0.0.0/8", "ports": []}, "minItems"),
        ({"ports": [{"port": 5672}]}, "oneOf"),
        (
            {"cidr": "10.0.0.0/8", "podSelector": {}, "ports": [{"port": 5672}]},
            "oneOf",
        ),
        ({"cidr": "10.0.0.0", "ports": [{"port": 5672}]}, "does not match pattern"),
        ({"cidr": "10.0.0.0/8", "ports": [{"port": 70000}]}, "maximum"),
        (
            {"cidr": "10.0.0.0/8", "ports": [{"port": 1, "protocol": "ICMP"}]},
            "value must be one of",
        ),
        (
            {"podSelector": {"matchLabel": {"a": "b"}}, "ports": [{"port": 1}]},
            "additional properties 'matchLabel' not allowed",
        ),
    ],
)
def test_schema_refuses_network_destinations_kubernetes_would_not_take(
    destination: dict[str, Any], message: str
) -> None:
    args = [
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
    ]
    args += ["--set-json", f"networkPolicy.destinations={json.dumps([destination])}"]
    result = helm("template", "rel", str(CHART), *args, check=False)
    assert result.returncode != 0, destination
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def jobs_policy(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """This policy's objects (not the invoker policy's, tests/unit/test_invoker_policy.py)."""
    return [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith("-jobs")]


def policy_and_binding(*sets: str) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = render("admissionPolicy.enabled=true", *sets)
    (policy,) = jobs_policy(docs, "ValidatingAdmissionPolicy")
    (binding,) = jobs_policy(docs, "ValidatingAdmissionPolicyBinding")
    return policy, binding


def test_admission_policy_is_off_by_default() -> None:
    docs = render()
    assert jobs_policy(docs, "ValidatingAdmissionPolicy") == []
    assert jobs_policy(docs, "ValidatingAdmissionPolicyBinding") == []


def test_admission_policy_judges_the_jobs_the_operators_service_account_creates() -> None:
    policy, binding = policy_and_binding()
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"],
         "resources": ["jobs"]}
    ], "CREATE only: the operator must still patch and release Jobs made before it"  # fmt: skip
    (condition,) = spec["matchConditions"]
    assert (
        condition["expression"]
        == 'request.userInfo.username == "system:serviceaccount:jr-system:rel-jobrunner"'
    )
    rules = " ".join(v["expression"] for v in spec["variables"])
    for field in ("privileged", "allowPrivilegeEscalation", "capabilities.add", "hostNetwork",
                  "hostPID", "hostIPC", "hostPath", "initContainers"):  # fmt: skip
        assert field in rules, field
    assert all(v["reason"] == "Forbidden" and v["messageExpression"] for v in spec["validations"])
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] == "rel-jobrunner-jobs"
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "jobrunner.dev/allow-privileged-jobs", "operator": "NotIn", "values": ["true"]}
        ]
    }


def test_admission_policy_follows_the_service_account_and_the_values() -> None:
    policy, binding = policy_and_binding(
        "serviceAccount.name=ops",
        "admissionPolicy.optInLabel=example.com/privileged",
        "admissionPolicy.allowedCapabilities={NET_BIND_SERVICE}",
        "admissionPolicy.validationActions={Warn,Audit}",
    )
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"].endswith('"system:serviceaccount:jr-system:ops"')
    caps = next(v for v in policy["spec"]["variables"] if v["name"] == "allowedCapabilities")
    assert caps["expression"] == '["NET_BIND_SERVICE"]'
    assert binding["spec"]["validationActions"] == ["Warn", "Audit"]
    (expr,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert expr["key"] == "example.com/privileged"


@pytest.mark.parametrize(
    ("sets", "extra", "message"),
    [
        ((), ("--kube-version", "1.29.0"), "needs ValidatingAdmissionPolicy"),
        (("admissionPolicy.validationActions={Deny,Warn}",), (), "Deny and Warn cannot be used"),
    ],
)  # fmt: skip
def test_an_admission_policy_the_cluster_would_not_take_is_refused(
    sets: tuple[str, ...], extra: tuple[str, ...], message: str
) -> None:
    args = ["--set", "admissionPolicy.enabled=true", *extra]
    for item in sets:
        args += ["--set", item]
    result = helm("template", "rel", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("permissions.operator.restrict.namesAllowList={../kube-system}", "does not match pattern"),
        ("permissions.operator.restrict.namesAllowList={Broker}", "does not match pattern"),
        ("permissions.operator.restrict.secret=maybe", "got string, want boolean"),
        ("admissionPolicy.validationActions={Block}", "value must be one of"),
        ("admissionPolicy.optInLabel=not a label", "does not match pattern"),
        ("admissionPolicy.allowedCapabilities={cap_sys_admin}", "does not match pattern"),
        ("networkPolicy.apiServer.cidrs={10.0.0.1}", "does not match pattern"),
        ("networkPolicy.apiServer.ports=null", "missing property 'ports'"),
    ],
)
def test_schema_refuses_bad_shared_cluster_values(bad: str, message: str) -> None:
    stderr = refused(bad)
    assert "values don't meet the specifications of the schema" in stderr
    assert message in stderr


def test_every_switch_on_passes_helm_lint_strict() -> None:
    args = [
        "--set", "permissions.operator.restrict.secret=true",
        "--set", "permissions.operator.restrict.namesAllowList={broker}",
        "--set", "watchNamespaces={media}",
        "--set", "admissionPolicy.enabled=true",
        "--set", "networkPolicy.enabled=true",
        "--set", "networkPolicy.apiServer.cidrs={10.0.0.1/32}",
        "--set-json", f"networkPolicy.destinations={DESTINATIONS}",
        "--set", "httpTrigger.enabled=true",
        "--set", "replicaCount=1",
    ]  # fmt: skip
    result = helm("lint", "--strict", str(CHART), *args)
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout


def notes(tmp_path: Path, *sets: str, extra: tuple[str, ...] = ()) -> str:
    """NOTES.txt as `helm install` would print it. `helm template` drops NOTES.txt, so a
    copy of the chart renders it into a document of its own."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    text = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_for_test.tpl").write_text(
        '{{- define "test.notes" -}}\n' + text + "{{- end }}\n"
    )
    (chart / "templates" / "notes-for-test.yaml").write_text(
        'kind: Notes\nnotes: {{ include "test.notes" . | toJson }}\n'
    )
    args = ["template", "rel", str(chart), "-n", "jr-system"]
    for item in sets:
        args += ["--set", item]
    args += ["--show-only", "templates/notes-for-test.yaml", *extra]
    return str(yaml.safe_load(helm(*args).stdout)["notes"])


def test_notes_say_what_the_default_grants_and_warn_of_cluster_wide_secret_reads(
    tmp_path: Path,
) -> None:
    text = notes(tmp_path)
    assert "What the operator may do in EVERY namespace (a ClusterRoleBinding)" in text
    assert "get any Secret by name" in text
    assert "list the namespaces to serve instead" in text
    assert "WARNING: the operator may read any Secret of any namespace" in text


@pytest.mark.parametrize(
    ("sets", "grants"),
    [
        (("watchNamespaces={media,etl}",), "get any Secret by name"),
        (
            ("permissions.operator.restrict.secret=true",
             "permissions.operator.restrict.namesAllowList={broker}"),
            "get only broker",
        ),
    ],
)  # fmt: skip
def test_notes_do_not_warn_once_secrets_are_narrowed(
    tmp_path: Path, sets: tuple[str, ...], grants: str
) -> None:
    text = notes(tmp_path, *sets)
    assert grants in text
    assert "WARNING: the operator may read" not in text


def test_notes_say_whether_the_crds_are_there_and_how_to_apply_them_from_anywhere(
    tmp_path: Path,
) -> None:
    # `helm template` has no cluster: no CRDs (as after --skip-crds on a cluster without).
    absent = notes(tmp_path / "a")
    assert "WARNING: the jobrunner.dev CRDs are not in the cluster" in absent
    assert "were installed" not in absent
    present = notes(tmp_path / "b", extra=("--api-versions", "jobrunner.dev/v1alpha1/ScaledJob"))
    assert "The jobrunner.dev CRDs are in the cluster" in present
    assert "WARNING: the jobrunner.dev CRDs" not in present
    for text in (absent, present):
        # No path relative to a directory the reader may not be in (`kubectl apply -f crds/`).
        assert "-f crds/" not in text
        assert "helm show crds CHART --version 0.1.0 | kubectl apply -f -" in text


def test_helm_show_crds_gives_the_generated_crds() -> None:
    shown = [d for d in yaml.safe_load_all(helm("show", "crds", str(CHART)).stdout) if d]
    assert sorted(d["metadata"]["name"] for d in shown) == [
        "scaledjobs.jobrunner.dev",
        "triggerauthentications.jobrunner.dev",
    ]


def test_notes_warn_that_a_bare_scaledjob_is_jobrunners_where_kedas_crds_are_too(
    tmp_path: Path,
) -> None:
    keda = notes(tmp_path / "a", extra=("--api-versions", "keda.sh/v1alpha1/ScaledJob"))
    assert "kubectl resolves a bare\n`scaledjob` or `triggerauthentication` to jobrunner.dev's" in (
        keda
    )
    assert "KEDA's:      kubectl get sj / ta, scaledjobs.keda.sh" in keda
    assert "KEDA's CRDs" not in notes(tmp_path / "b")


def test_without_helm_the_chart_tests_say_how_to_get_it_not_to_start_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests import helm as found

    monkeypatch.setenv("JOBRUNNER_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no helm, no go
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        found.helm_binary()
    said = str(skipped.value)
    assert f"no {tmp_path}/helm-{found.HELM_VERSION}/bin/helm and no helm on PATH" in said
    assert "put helm on PATH, or install Go and run `make helm`" in said
    assert "stack-up" not in said


def test_reading_kueue_workloads_can_be_turned_off() -> None:
    (cluster_role,) = of_kind(render("rbac.readKueueWorkloads=false"), "ClusterRole")
    assert not any(g == "kueue.x-k8s.io" for g, _ in grants_of(cluster_role))
