"""The CRDs of operator mode: generated from the pydantic models (never drifting), small
enough for a client-side apply, structural, and faithful to what the models accept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from jobrunner.manifest.scaledjob import ScaledJobSpec
from jobrunner.operator.crd import render, scaledjob_crd, trigger_authentication_crd

ROOT = Path(__file__).resolve().parents[2]
LAST_APPLIED_LIMIT = 262144
"""Total size of an object's annotations; client-side apply stores the whole object in one."""


def test_crd_files_are_what_the_models_generate() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/crds/generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_scaledjob_crd_fits_a_client_side_apply_with_room_to_spare() -> None:
    for name, text in render().items():
        applied = json.dumps(yaml.safe_load(text), separators=(",", ":"))
        assert len(applied.encode()) < LAST_APPLIED_LIMIT / 10, (name, len(applied))


def _untyped(node: dict[str, Any], path: str = "") -> list[str]:
    """Paths where a structural schema lacks a type (or preserve-unknown-fields)."""
    problems = []
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(path or "/")
    for key, child in (node.get("properties") or {}).items():
        problems += _untyped(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        problems += _untyped(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _untyped(node["additionalProperties"], f"{path}{{}}")
    for banned in ("$ref", "anyOf", "oneOf", "allOf", "default", "title"):
        # The status's defaults are on purpose (Ready=Unknown NoOperator until a
        # replica writes); the spec stays as the user wrote it.
        if banned == "default" and (path == ".status" or path == ".status.conditions"):
            continue
        if banned in node:
            problems.append(f"{path}: {banned}")
    return problems


def test_schemas_are_structural() -> None:
    for crd in (scaledjob_crd(), trigger_authentication_crd()):
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert _untyped(schema) == []


def test_every_spec_field_of_the_model_is_in_the_schema_and_no_other() -> None:
    spec = scaledjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(spec["properties"]) == set(ScaledJobSpec.model_fields)
    assert spec["properties"]["jobTargetRef"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "x-kubernetes-preserve-unknown-fields" not in spec, "unknown spec fields are refused"
    assert spec["required"] == ["triggers"]


def test_scaledjob_crd_has_status_subresource_and_the_printer_columns() -> None:
    version = scaledjob_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Max"] == ".spec.maxReplicaCount"
    assert columns["Active"] == ".status.activeJobs"
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Paused"] == '.status.conditions[?(@.type=="Paused")].status'
    assert columns["Triggers"] == ".status.triggersTypes"
    assert columns["Age"] == ".metadata.creationTimestamp"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    condition = status["conditions"]["items"]["properties"]
    assert set(condition) == {
        "type",
        "status",
        "observedGeneration",
        "lastTransitionTime",
        "reason",
        "message",
    }
    assert condition["status"]["enum"] == ["True", "False", "Unknown"]


def test_bounds_and_enums_of_the_models_become_openapi_bounds() -> None:
    spec = scaledjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    assert props["maxReplicaCount"]["type"] == "integer"
    assert props["maxReplicaCount"]["minimum"] == 1
    delivery = props["messageDelivery"]["properties"]
    assert delivery["maxMessageBytes"]["exclusiveMinimum"] is True
    assert delivery["mode"]["enum"] == ["auto", "env", "file", "args"]
    assert props["triggers"]["items"]["properties"]["metadata"]["additionalProperties"] == {
        "type": "string"
    }
    rule = spec["x-kubernetes-validations"][0]["rule"]
    assert rule == "has(self.jobTargetRef) != has(self.jobTemplate)"
