"""Kueue's CRDs and webhook configurations rewritten for a manager that runs out of cluster.

Kueue's own manifests point every webhook at an in-cluster Service and leave the CA bundle
to its cert rotation. The local stack runs the manager as a process on this machine
(deploy/local/kueue.sh), so the API server calls it by url, trusting a CA made for it.
Only the webhooks for batch/v1 Jobs and Kueue's own kinds are kept: the stack enables the
batch/job integration alone, and a webhook for a kind nobody serves would only fail.

Usage: kueue-manifests.py SOURCE_DIR OUT_DIR URL CA_FILE
  SOURCE_DIR: build-kueue.sh's manifests (crd/, crd-patches/, webhook/manifests.yaml)
  OUT_DIR: gets crds/<name>.json, mutating.json and validating.json (one object each)
  URL: the webhook server's base url, https://127.0.0.1:PORT
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import yaml

KUEUE_GROUP = "kueue.x-k8s.io"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
# The names Kueue's release manifests give them (kustomize's `kueue-` prefix).
CONFIG_NAMES = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}


def is_batch_job(webhook: dict[str, Any]) -> bool:
    return all(
        rule.get("apiGroups") == ["batch"] and rule.get("resources") == ["jobs"]
        for rule in webhook["rules"]
    )


def is_kueue_kind(webhook: dict[str, Any]) -> bool:
    return all(rule.get("apiGroups") == [KUEUE_GROUP] for rule in webhook["rules"])


def local_webhook(webhook: dict[str, Any], url: str, ca_bundle: str) -> dict[str, Any]:
    path = webhook["clientConfig"]["service"]["path"]
    out = dict(webhook, clientConfig={"url": url + path, "caBundle": ca_bundle})
    if is_batch_job(webhook):
        # Only Jobs that ask for Kueue pass through its webhook: the rest of the test
        # suite's Jobs never wait on it, and a Kueue outage (failurePolicy Fail) cannot
        # block them. Kueue ignores unlabelled Jobs anyway (manageJobsWithoutQueueName
        # false), so nothing is lost.
        out["objectSelector"] = {
            "matchExpressions": [{"key": QUEUE_NAME_LABEL, "operator": "Exists"}]
        }
    return out


def webhook_configs(source: Path, url: str, ca_bundle: str) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all((source / "webhook" / "manifests.yaml").read_text()):
        if not doc:
            continue
        kept = [
            local_webhook(w, url, ca_bundle)
            for w in doc["webhooks"]
            if is_batch_job(w) or is_kueue_kind(w)
        ]
        name = CONFIG_NAMES[doc["kind"]]
        configs[doc["kind"]] = dict(doc, metadata={"name": name}, webhooks=kept)
    return configs


def crds(source: Path, url: str, ca_bundle: str) -> dict[str, dict[str, Any]]:
    """Every CRD, with a conversion webhook where Kueue's own kustomization patches one in
    (the kinds whose v1beta1 and v1beta2 differ; ResourceFlavor's patch is commented out
    there, and its webhook refuses to convert)."""
    patches = source / "crd-patches"
    kustomization = yaml.safe_load((patches / "kustomization.yaml").read_text())
    converted = set()
    for entry in kustomization.get("patches") or []:
        patch = patches / Path(entry["path"]).name
        converted.add(yaml.safe_load(patch.read_text())["metadata"]["name"])
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((source / "crd").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        if name in converted:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": url + "/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        out[name] = crd
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    source, out, url, ca_file = Path(argv[1]), Path(argv[2]), argv[3], Path(argv[4])
    ca_bundle = base64.b64encode(ca_file.read_bytes()).decode()
    (out / "crds").mkdir(parents=True, exist_ok=True)
    for name, crd in crds(source, url, ca_bundle).items():
        (out / "crds" / f"{name}.json").write_text(json.dumps(crd))
    configs = webhook_configs(source, url, ca_bundle)
    (out / "mutating.json").write_text(json.dumps(configs["MutatingWebhookConfiguration"]))
    (out / "validating.json").write_text(json.dumps(configs["ValidatingWebhookConfiguration"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
