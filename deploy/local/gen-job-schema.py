#!/usr/bin/env python3
"""Writes jobrunner/schemas/batch-v1-job.json from a real API server's OpenAPI v3
document for batch/v1: every type reachable from io.k8s.api.batch.v1.Job, each property
reduced to what jobrunner checks (type, referenced type, items, map values, enum).

Usage: gen-job-schema.py --kubeconfig PATH [--out FILE | --check FILE]
``--check`` exits 1 when FILE differs from what the server publishes (the test suite
runs it so the schema can never drift from the server the project runs against).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = "io.k8s.api.batch.v1.Job"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
INT_OR_STRING = "io.k8s.apimachinery.pkg.util.intstr.IntOrString"
OUT = Path(__file__).resolve().parents[2] / "jobrunner" / "schemas" / "batch-v1-job.json"


def fetch(kubeconfig: str) -> tuple[dict[str, Any], str]:
    from kubernetes import config

    api = config.new_client_from_config(config_file=kubeconfig)

    def get(path: str) -> Any:
        method, url, headers, _body, _post = api.param_serialize(
            "GET", path, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
        )
        response = api.call_api(method, url, headers)
        response.read()
        if response.status != 200:
            sys.exit(f"GET {path}: {response.status} {response.data[:200]!r}")
        return json.loads(response.data)

    version = get("/version")["gitVersion"]
    return get("/openapi/v3/apis/batch/v1"), version


def _ref_name(node: dict[str, Any]) -> str | None:
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[-1]
    for wrapper in ("allOf", "oneOf", "anyOf"):
        for part in node.get(wrapper) or []:
            if "$ref" in part:
                return str(part["$ref"]).rsplit("/", 1)[-1]
    return None


def reduce(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    types: dict[str, Any] = {}
    pending = [ROOT]

    def prop(node: dict[str, Any]) -> dict[str, Any]:
        ref = _ref_name(node)
        if ref == QUANTITY:
            return {"type": "quantity"}
        if ref == INT_OR_STRING or node.get("x-kubernetes-int-or-string"):
            return {"type": "int-or-string"}
        if ref is not None:
            target = schemas[ref]
            if target.get("type") == "object" and not target.get("properties"):
                return {"type": "any"}  # free-form (FieldsV1, RawExtension)
            if target.get("type") == "object" or "properties" in target:
                pending.append(ref)
                return {"type": "object", "ref": ref}
            return prop(target)  # a named scalar (Time, MicroTime, ...)
        kind = node.get("type")
        out: dict[str, Any]
        if kind == "array":
            out = {"type": "array", "items": prop(node.get("items") or {})}
        elif kind == "object" and "additionalProperties" in node:
            extra = node["additionalProperties"]
            out = {"type": "map", "values": prop(extra if isinstance(extra, dict) else {})}
        elif kind in ("string", "integer", "number", "boolean"):
            out = {"type": kind}
        else:
            out = {"type": "any"}
        if node.get("enum"):
            out["enum"] = list(node["enum"])
        return out

    while pending:
        name = pending.pop()
        if name in types:
            continue
        node = schemas[name]
        types[name] = {}  # placeholder against cycles
        properties = {k: prop(v) for k, v in sorted((node.get("properties") or {}).items())}
        entry: dict[str, Any] = {"properties": properties}
        if node.get("required"):
            entry["required"] = sorted(node["required"])
        types[name] = entry
    return {"root": ROOT, "types": dict(sorted(types.items()))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", type=Path, default=OUT)
    group.add_argument("--check", type=Path)
    args = parser.parse_args()
    document, version = fetch(args.kubeconfig)
    reduced = {"source": f"kube-apiserver {version} /openapi/v3/apis/batch/v1", **reduce(document)}
    text = json.dumps(reduced, indent=1, sort_keys=False) + "\n"
    if args.check:
        if args.check.read_text() != text:
            print(
                f"{args.check} differs from what the API server ({version}) publishes; "
                f"run {Path(__file__).name} --kubeconfig ... to regenerate it",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check}: matches the API server ({version})")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text)} bytes, {len(reduced['types'])} types) from {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
