"""jobrunner's CRDs beside KEDA's on one API server: both groups serve `scaledjobs` and
`triggerauthentications`, and kubectl resolves a bare `scaledjob` to the group listed
first in discovery — CRD groups all have the same priority and are listed by name, so
jobrunner.dev's comes before keda.sh's. The README and NOTES.txt say so and name the
unambiguous forms: `scaledjobs.jobrunner.dev` / `jsj` (and the category `jobrunner`),
`scaledjobs.keda.sh` / `sj`. These tests hold the server to what those texts say."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.services import program

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("jobrunner_crds", "keda_crds")]


def discovery(kube_api: client.ApiClient, path: str) -> Any:
    method, url, headers, body, _ = kube_api.param_serialize(
        "GET", path, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
    )
    response = kube_api.call_api(method, url, headers, body)
    response.read()
    return json.loads(response.data)


def resources(kube_api: client.ApiClient) -> list[tuple[str, dict[str, Any]]]:
    """(group, resource) for every resource the API server serves, groups in discovery
    order (the preferred version of each)."""
    out = []
    core = discovery(kube_api, "/api/v1")
    out += [("", r) for r in core["resources"]]
    for group in discovery(kube_api, "/apis")["groups"]:
        version = group["preferredVersion"]["groupVersion"]
        out += [(group["name"], r) for r in discovery(kube_api, f"/apis/{version}")["resources"]]
    return [(g, r) for g, r in out if "/" not in r["name"]]


def test_short_names_and_the_category_name_only_jobrunners_resources(
    kube_api: client.ApiClient,
) -> None:
    served = resources(kube_api)
    claims: dict[str, list[str]] = {}
    for group, resource in served:
        for short in resource.get("shortNames") or []:
            claims.setdefault(short, []).append(f"{resource['name']}.{group}")
    assert claims["jsj"] == ["scaledjobs.jobrunner.dev"]
    assert claims["jta"] == ["triggerauthentications.jobrunner.dev"]
    assert claims["sj"] == ["scaledjobs.keda.sh"]
    in_category = sorted(
        f"{r['name']}.{g}" for g, r in served if "jobrunner" in (r.get("categories") or [])
    )
    assert in_category == ["scaledjobs.jobrunner.dev", "triggerauthentications.jobrunner.dev"]


def test_a_bare_scaledjob_is_jobrunners_as_the_readme_says(kube_api: client.ApiClient) -> None:
    groups = [g["name"] for g in discovery(kube_api, "/apis")["groups"]]
    assert groups.index("jobrunner.dev") < groups.index("keda.sh"), groups


@pytest.mark.parametrize(
    ("typed", "resolved"),
    [
        ("scaledjob", "jobrunner.dev"),
        ("scaledjobs", "jobrunner.dev"),
        ("ScaledJob", "jobrunner.dev"),
        ("jsj", "jobrunner.dev"),
        ("scaledjobs.jobrunner.dev", "jobrunner.dev"),
        ("sj", "keda.sh"),
        ("scaledjobs.keda.sh", "keda.sh"),
        ("triggerauthentication", "jobrunner.dev"),
        ("jta", "jobrunner.dev"),
        ("ta", "keda.sh"),
    ],
)
def test_kubectl_resolves_each_name_as_documented(
    kubeconfig: Path, namespace: str, typed: str, resolved: str
) -> None:
    kubectl = program(
        "kubectl",
        setting="JOBRUNNER_TEST_KUBECTL",
        how="`make stack-up` builds it with the control plane",
    )
    # kubectl's log at -v=6 names each URL it asked for: the group it resolved to.
    listing = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), "get", typed, "-n", namespace, "-v=6"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    urls = [line for line in listing.stderr.splitlines() if f"/namespaces/{namespace}/" in line]
    assert urls, listing.stderr
    assert f"/apis/{resolved}/v1alpha1/namespaces/{namespace}/" in urls[-1], urls[-1]
