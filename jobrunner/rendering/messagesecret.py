"""The rules of a Job's message Secret, one copy for every JobClient (the Kubernetes
client, the local executor, the in-memory twin), so they cannot drift apart.

The Secret (``<job>-message``: the body a pod mounts, and the message kept for a later
dead letter) is made **after** its Job, with its ownerReference to the Job set in the
create itself. So a Job the API server refuses (a 422, a ResourceQuota's 403) leaves no
Secret, and no Secret ever exists without an owner: the garbage collector deletes it with
its Job. A Secret of that name that is already there when a Job needs it was not
necessarily made for that Job (a leftover of an earlier Job of the same name, one made by
an older jobrunner that created Secrets first, or one someone else created): it is used
only when it holds this very body, compared by the SHA-256 of its ``body`` entry with the
Job's ``jobrunner.dev/body-sha256``. Only the body is compared: other entries (a per-Job
key, say) may differ between two renders of the same message, and the stored ones are the
ones the pod sees.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobrunner.core.models import ANNOTATION_BODY_DIGEST
from jobrunner.core.protocols import ApiRejected

CONFLICT_REASON = "MessageSecretConflict"
"""The ``reason`` of the ApiRejected (409) a refused Secret gives; the dispatcher
dead-letters the message with it in the detail."""


def owner_reference(job: Mapping[str, Any]) -> dict[str, Any]:
    """The reference that makes a Job own an object (its message Secret): garbage
    collected with the Job, never blocking its deletion (``blockOwnerDeletion: false``
    also needs no rights on the Job's finalizers)."""
    meta = job["metadata"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "blockOwnerDeletion": False,
        "controller": False,
    }


def owned_by(secret: Mapping[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    """``secret`` as it is created: owned by ``job`` (which exists: it has a uid)."""
    out = dict(secret)
    out["metadata"] = {**secret["metadata"], "ownerReferences": [owner_reference(job)]}
    return out


def job_digest(job: Mapping[str, Any]) -> str:
    """The body digest a Job was made for (its ``jobrunner.dev/body-sha256``), "" if none."""
    return str(
        ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_BODY_DIGEST, "")
    )


def body_digest(secret: Mapping[str, Any]) -> str | None:
    """SHA-256 (hex) of what the Secret's ``body`` entry holds, as a pod would read it;
    None when it has none (or it is not base64)."""
    data = secret.get("data") or {}
    if "body" in data:
        try:
            return hashlib.sha256(base64.b64decode(data["body"], validate=True)).hexdigest()
        except (binascii.Error, ValueError):
            return None
    string_data = secret.get("stringData") or {}
    if "body" in string_data:
        return hashlib.sha256(str(string_data["body"]).encode()).hexdigest()
    return None


class Verdict(enum.Enum):
    CREATE = "create"
    """No Secret of that name: create it, owned by the Job."""
    USE = "use"
    """It is the Job's own (or holds exactly its body): nothing to do."""
    WAIT = "wait"
    """It belongs to an earlier Job of the same name, which is gone: the garbage
    collector deletes it shortly; try again then (on a cluster)."""
    REFUSE = "refuse"
    """It holds another body, or belongs to another object: never mounted."""


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    why: str = ""
    """For WAIT and REFUSE, what is wrong; for USE, a warning when there is one."""


def check_existing(
    secret: Mapping[str, Any] | None, *, job_name: str, job_uid: str | None, digest: str
) -> Check:
    """What to do with the Secret found under the name a Job's message Secret has.

    ``job_name`` is the Job's name, ``job_uid`` its uid when it exists now (None before it
    is created), ``digest`` the SHA-256 of the message's body.

    The body is what decides: a Secret holding another body is refused whoever owns it
    (its ``jobrunner.dev/body-sha256`` annotation, when given, must agree with its data
    too). One with the same body is used when the Job owns it, or when nothing owns it
    (made by a jobrunner older than this rule, which created Secrets before their Jobs:
    it cannot be made owned now, since jobrunner has no ``patch`` on Secrets, and is left
    for a person to delete); one owned by an earlier Job of the same name waits for the
    garbage collector; one owned by anything else is refused (its owner's deletion would
    take the body away)."""
    if secret is None:
        return Check(Verdict.CREATE)
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace', '')}/{meta.get('name', '')}"
    held = body_digest(secret)
    claimed = (meta.get("annotations") or {}).get(ANNOTATION_BODY_DIGEST)
    if held != digest or (claimed is not None and claimed != digest):
        shown = f"sha256 {held[:12]}…" if held else "no readable body"
        return Check(
            Verdict.REFUSE,
            f"{where} already exists and holds another body ({shown}) than this message "
            f"(sha256 {digest[:12]}…): it was not made for this message and is not "
            f"mounted. Delete it (kubectl delete secret -n {meta.get('namespace', '')} "
            f"{meta.get('name', '')}) and replay the dead letter",
        )
    owners = list(meta.get("ownerReferences") or [])
    if not owners:
        return Check(
            Verdict.USE,
            f"{where} holds this message's body but has no owner (made by an older "
            "jobrunner, which created Secrets before their Jobs): used as it is, and not "
            "deleted with the Job; delete it by hand once the Job is gone",
        )
    if job_uid and any(r.get("uid") == job_uid for r in owners):
        return Check(Verdict.USE)
    earlier = [r for r in owners if r.get("kind") == "Job" and r.get("name") == job_name]
    if earlier and len(earlier) == len(owners):
        return Check(
            Verdict.WAIT,
            f"{where} belongs to an earlier Job of that name (uid {earlier[0].get('uid')}), "
            "which is gone; waiting for the garbage collector to delete it",
        )
    kinds = ", ".join(f"{r.get('kind')} {r.get('name')}" for r in owners)
    return Check(
        Verdict.REFUSE,
        f"{where} already exists and is owned by {kinds}, not by this message's Job: it "
        "is not used (its owner's deletion would take the body away). Give the message "
        "another id, or delete that Secret and replay the dead letter",
    )


def conflict(check: Check) -> ApiRejected:
    """The refusal for a REFUSE check, dead-lettered by the dispatcher with its text."""
    return ApiRejected(409, CONFLICT_REASON, check.why)
