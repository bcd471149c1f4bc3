"""The message Secret's rules (jobrunner.rendering.messagesecret), and the in-memory twin
following them."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from jobrunner.core.protocols import ApiRejected
from jobrunner.rendering.messagesecret import CONFLICT_REASON, Verdict, check_existing
from jobrunner.testing import MemoryJobClient
from tests.unit.test_rendering import delivery, manifest

BODY = b'{"task": "t"}'
DIGEST = hashlib.sha256(BODY).hexdigest()


def secret(body: bytes = BODY, *, owners: list[dict[str, Any]] | None = None, **notes: str) -> Any:
    return {
        "metadata": {
            "name": "j-message",
            "namespace": "ns",
            "annotations": notes,
            **({"ownerReferences": owners} if owners is not None else {}),
        },
        "data": {"body": base64.b64encode(body).decode(), "hmac-key": "ZGlmZmVycw=="},
    }


def owner(uid: str, name: str = "j", kind: str = "Job") -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": kind, "name": name, "uid": uid}


@pytest.mark.parametrize(
    ("found", "uid", "verdict"),
    [
        (None, None, Verdict.CREATE),
        # Only the body counts: its other entries (a per-Job key) are not compared.
        (secret(owners=[owner("u1")]), "u1", Verdict.USE),
        (secret(b"another", owners=[owner("u1")]), "u1", Verdict.REFUSE),
        (secret(b"another"), None, Verdict.REFUSE),
        (
            secret(owners=[owner("u1")], **{"jobrunner.dev/body-sha256": "0" * 64}),
            "u1",
            Verdict.REFUSE,
        ),
        # Owned by an earlier Job of the name, which is gone: the garbage collector's.
        (secret(owners=[owner("u0")]), "u1", Verdict.WAIT),
        (secret(owners=[owner("u0")]), None, Verdict.WAIT),
        # Owned by something else: its deletion would take the body away.
        (secret(owners=[owner("u0", name="other")]), None, Verdict.REFUSE),
        (secret(owners=[owner("u0", kind="ConfigMap", name="j")]), None, Verdict.REFUSE),
        # No owner, same body: made by a jobrunner that created Secrets first.
        (secret(), None, Verdict.USE),
    ],
)
def test_an_existing_secret_is_used_only_when_it_holds_this_body(
    found: Any, uid: str | None, verdict: Verdict
) -> None:
    check = check_existing(found, job_name="j", job_uid=uid, digest=DIGEST)
    assert check.verdict is verdict, check.why
    if verdict is Verdict.REFUSE:
        assert "Secret ns/j-message" in check.why


def test_a_refusal_says_what_is_there_and_what_to_do() -> None:
    check = check_existing(secret(b"another"), job_name="j", job_uid=None, digest=DIGEST)
    assert f"sha256 {hashlib.sha256(b'another').hexdigest()[:12]}" in check.why
    assert f"sha256 {DIGEST[:12]}" in check.why
    assert "kubectl delete secret -n ns j-message" in check.why


async def test_the_twin_refuses_a_secret_with_another_body_and_owns_what_it_makes() -> None:
    from jobrunner.manifest.loader import parse_scaledjob
    from jobrunner.rendering.renderer import Renderer

    renderer = Renderer(parse_scaledjob(manifest(messageDelivery={"mode": "file"})))
    jobs = MemoryJobClient()
    hostile = renderer.render(delivery(b'{"task": "hostile"}', message_id="x"))
    genuine = renderer.render(delivery(BODY, message_id="x"))
    assert hostile.secret is not None
    assert genuine.secret is not None
    key = ("media", hostile.secret["metadata"]["name"])
    jobs.secrets[key] = hostile.secret  # left without a Job
    with pytest.raises(ApiRejected) as refused:
        await jobs.create_job(genuine.job, genuine.secret)
    assert refused.value.reason == CONFLICT_REASON
    assert jobs.jobs == {}
    del jobs.secrets[key]
    job, created = await jobs.create_job(genuine.job, genuine.secret)
    assert created
    [ref] = jobs.secrets[key]["metadata"]["ownerReferences"]
    assert ref["uid"] == job["metadata"]["uid"]
