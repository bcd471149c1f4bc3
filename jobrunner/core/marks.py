"""Authenticated marks on a function's Jobs: what a Job's own pod can write is trusted
only when it carries a MAC made with that Job's key.

The in-Job invoker records the function's result on its own Job, so the pod of a function
ScaledJob holds rights to annotate Jobs (``patch`` on ``jobs`` in its namespace: RBAC
cannot say "its own Job"). A compromised function could otherwise write a result, an
outputs count or a settlement onto any Job of the namespace, and the dispatcher would
publish outputs or drop a message on its word. So every such mark is authenticated:

* **the key**: 32 random bytes made by the renderer for each Job of a ScaledJob with
  ``spec.function``, kept as the data entry ``function-key`` of the Job's own message
  Secret (written by the dispatcher, never writable by a pod), mounted (that entry alone)
  into the containers that get the message, i.e. the invoker's. Another Job's pod never
  sees it. The verifier reads it from the Secret that exists (a Secret made by an earlier
  attempt at the same Job is the one its pod mounted), never from what it rendered;
* **the MAC**: ``v1:`` and the hex HMAC-SHA256, under that key, of
  ``jobrunner.dev/mark/v1``, the Job's namespace, name and uid, the annotation's key and
  its value, joined by newlines (none of the first five can hold one, so the value,
  last, cannot be shifted into them). It sits in ``<annotation>-mac``. A mark copied from
  another Job, or from an earlier Job of the same name (another uid), or made with any
  other key, does not verify;
* **which marks**: the function's result (``jobrunner.dev/function-result``, written by
  the invoker), the outputs count (``jobrunner.dev/outputs-published``) and the settlement
  (``jobrunner.dev/settled``), written by the dispatcher with the same key. A mark that
  does not verify is ignored, with a Warning Event ``UnverifiedMark`` on the Job and a
  log line, once per mark;
* **a dispatcher that may not read message Secrets** (``read_message_secrets`` false,
  the chart's ``permissions.operator.restrict.secret``) cannot know the keys: it trusts
  marks as they are, says so once at start, and leaves the guard to the admission policy
  (the chart refuses that restriction with its ``invokerPolicy`` off);
* **Jobs from before keys** (made by an earlier jobrunner: their pod template mounts no
  key, and a Job's template cannot be changed) keep being trusted as they were, so an
  upgrade neither dead-letters the Jobs running through it nor settles old ones again.

What a MAC cannot do: prove that a mark was *removed*, or protect labels, the finalizer
and the spec, which a pod with ``patch`` on Jobs can also change (and so make another
Job fail or vanish from its dispatcher's view). Those are closed by the admission policy
shipped with the chart and written by ``functions import`` (a pod may change only its own
Job's result). The marks that stay unauthenticated are harmless when forged: a Job
claiming to keep its message (``ack-policy``, ``handed-over``) is then settled from the
copy in its Secret and from its verified result, so what it does changes only who
settles the message, never how.

The MAC is the standard library's hmac/hashlib; the in-Job invoker (which may import
nothing of jobrunner) computes the same one, and a test checks that both agree.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jobrunner.core.models import ANNOTATION_SETTLED
from jobrunner.core.naming import message_secret_name
from jobrunner.core.protocols import ApiRejected, JobClient

logger = logging.getLogger(__name__)

KEY_DATA = "function-key"
"""The message Secret's data entry holding the Job's key (32 raw bytes)."""
KEY_BYTES = 32
KEY_VOLUME = "jobrunner-function-key"
KEY_MOUNT = "/var/run/jobrunner/function-key"
KEY_FILE_ENV = "JOBRUNNER_FUNCTION_KEY_FILE"
"""Where the invoker finds the key: ``KEY_MOUNT``/``KEY_DATA`` (the invoker's default)."""
UID_ENV = "JOBRUNNER_JOB_UID"
"""The Job's uid, from the pod's ``batch.kubernetes.io/controller-uid`` label (the Job
controller sets it on every pod of a Job, Kubernetes >= 1.27)."""
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
RESULT_ANNOTATION = "jobrunner.dev/function-result"
PUBLISHED_ANNOTATION = "jobrunner.dev/outputs-published"
MAC_SUFFIX = "-mac"
DOMAIN = "jobrunner.dev/mark/v1"
EVENT_REASON = "UnverifiedMark"
POD_WRITABLE = (RESULT_ANNOTATION, RESULT_ANNOTATION + MAC_SUFFIX)
"""The only annotations a Job's own processes may write (the admission policy's rule,
and the local executor's)."""
SCREENED = (ANNOTATION_SETTLED,)
"""Marks the Job watch drops unless verified, so nothing downstream (settling, history
cleanup, listings) ever acts on a forged one."""
_CACHE_MAX = 4096


def mac_annotation(annotation: str) -> str:
    """The annotation holding ``annotation``'s MAC."""
    return annotation + MAC_SUFFIX


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def mark_mac(
    *, key: bytes, namespace: str, name: str, uid: str, annotation: str, value: str
) -> str:
    """The MAC of one mark (see the module text); ``v1:`` + 64 hex digits."""
    message = "\n".join((DOMAIN, namespace, name, uid, annotation, value)).encode()
    return "v1:" + hmac.new(key, message, hashlib.sha256).hexdigest()


def mark_problem(
    *,
    key: bytes | None,
    namespace: str,
    name: str,
    uid: str,
    annotation: str,
    value: str,
    mac: str | None,
) -> str | None:
    """None when ``mac`` authenticates ``annotation=value`` on the Job (namespace, name,
    uid) under ``key``; otherwise why not, in words for an Event."""
    if key is None:
        return f"the Job's Secret {message_secret_name(name)} holds no {KEY_DATA}"
    if not mac:
        return f"it has no {mac_annotation(annotation)}"
    if not uid:
        return "the Job's uid is unknown"
    expected = mark_mac(
        key=key, namespace=namespace, name=name, uid=uid, annotation=annotation, value=value
    )
    if not hmac.compare_digest(expected.encode(), mac.encode()):
        return (
            f"its {mac_annotation(annotation)} was not made with this Job's key for this Job "
            "(forged, or copied from another Job or an earlier Job of this name)"
        )
    return None


# ---------------------------------------------------------------------- rendering
def equip(
    spec: dict[str, Any],
    secret: dict[str, Any],
    *,
    containers: list[str] | None,
    key: bytes,
) -> None:
    """Give a function's Job its key: the data entry ``function-key`` of its message
    ``secret``, and, in each of the pod's containers that get the message
    (``containers``; None: all), that entry alone mounted at ``KEY_MOUNT``, with
    ``JOBRUNNER_FUNCTION_KEY_FILE`` naming the file and ``JOBRUNNER_JOB_UID`` the Job's
    uid (downward API). ``spec`` is the JobSpec, changed in place."""
    secret.setdefault("data", {})[KEY_DATA] = base64.b64encode(key).decode()
    pod = spec["template"]["spec"]
    pod.setdefault("volumes", []).append(
        {
            "name": KEY_VOLUME,
            "secret": {
                "secretName": secret["metadata"]["name"],
                "items": [{"key": KEY_DATA, "path": KEY_DATA}],
            },
        }
    )
    env = [
        {"name": KEY_FILE_ENV, "value": f"{KEY_MOUNT}/{KEY_DATA}"},
        {
            "name": UID_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{CONTROLLER_UID_LABEL}']"}},
        },
    ]
    for container in pod["containers"]:
        if containers is not None and container.get("name") not in containers:
            continue
        container["env"] = [*copy.deepcopy(env), *(container.get("env") or [])]
        container.setdefault("volumeMounts", []).append(
            {"name": KEY_VOLUME, "mountPath": KEY_MOUNT, "readOnly": True}
        )


# ---------------------------------------------------------------------- verifying
@dataclass(frozen=True)
class Mark:
    """One annotation of a Job as verified: ``value`` (None when absent) and, when it is
    present but not authenticated, ``problem`` saying why."""

    value: str | None
    problem: str | None = None

    @property
    def trusted(self) -> str | None:
        """The value when it is authenticated, else None."""
        return self.value if self.problem is None else None


class _Lru(OrderedDict[Any, Any]):
    def remember(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _CACHE_MAX:
            self.popitem(last=False)


class JobMarks:
    """Signs and verifies the marks of one ScaledJob's Jobs (see the module text).

    Keys are read from each Job's message Secret the first time they are needed and kept
    per (Job name, uid): while a Job exists nothing changes its Secret's data (pods
    cannot write Secrets, the dispatcher never patches one). Verdicts are kept per
    (uid, annotation, value, MAC), so a mark is checked, and an Event about it recorded,
    once. Both caches hold at most 4096 entries."""

    def __init__(self, *, jobs: JobClient, namespace: str, reads_secrets: bool = True) -> None:
        """``reads_secrets`` False: this dispatcher may not read message Secrets
        (``dispatcher.read_message_secrets``, the chart's
        ``permissions.operator.restrict.secret``), so it cannot know a Job's key: marks
        are then trusted as they are, and only the admission policy keeps other pods from
        writing them (the chart refuses that restriction without its invokerPolicy)."""
        self._jobs = jobs
        self.namespace = namespace
        self.reads_secrets = reads_secrets
        self._keys: _Lru = _Lru()
        self._verdicts: _Lru = _Lru()

    async def key(self, name: str, uid: str) -> bytes | None:
        """The key of Job ``name`` (uid ``uid``) from its Secret; None when the Secret or
        its entry is missing. TransientError when the API is down."""
        cached = self._keys.get((name, uid))
        if cached is not None:
            return bytes(cached)
        try:
            data = await self._jobs.read_secret(self.namespace, message_secret_name(name))
        except ApiRejected as exc:  # 403: the dispatcher may not read it; nothing verifies
            logger.warning("cannot read the key of Job %s: %s", name, exc)
            return None
        raw = (data or {}).get(KEY_DATA)
        if not raw:
            return None
        try:
            key = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            return None
        self._keys.remember((name, uid), key)
        return key

    async def sign(self, name: str, uid: str, annotations: Mapping[str, str]) -> dict[str, str]:
        """``annotations`` with a MAC beside each, for Job ``name``. Without a key (a Job
        made before keys, or its Secret gone) they go unsigned, and will not be trusted."""
        signed = dict(annotations)
        if not self.reads_secrets:
            return signed
        key = await self.key(name, uid) if uid else None
        if key is None:
            logger.debug("Job %s has no key: its marks go unsigned", name, extra={"job_name": name})
            return signed
        for annotation, value in annotations.items():
            mac = mark_mac(
                key=key,
                namespace=self.namespace,
                name=name,
                uid=uid,
                annotation=annotation,
                value=value,
            )
            signed[mac_annotation(annotation)] = mac
            self._verdicts.remember((uid, annotation, value, mac), None)
        return signed

    async def verify(self, job: Mapping[str, Any], annotation: str) -> Mark:
        """``annotation`` of ``job`` as verified; an unauthenticated one is reported (a
        Warning Event on the Job and a log line) the first time it is seen."""
        meta = job.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        value = annotations.get(annotation)
        if value is None or not self.reads_secrets:
            return Mark(value)
        name = str(meta.get("name", ""))
        uid = str(meta.get("uid", ""))
        mac = annotations.get(mac_annotation(annotation))
        cache_key = (uid, annotation, value, mac)
        if cache_key in self._verdicts:
            return Mark(value, self._verdicts[cache_key])
        key = await self.key(name, uid) if uid else None
        if key is None and not await self._has_key_volume(job):
            # Made before Jobs had keys (an earlier jobrunner): trusted as it was then, or
            # an upgrade would dead-letter every Job running through it. A Job made since
            # always mounts its key, and a Job's pod template cannot be changed.
            self._verdicts.remember(cache_key, None)
            return Mark(value)
        problem = mark_problem(
            key=key,
            namespace=self.namespace,
            name=name,
            uid=uid,
            annotation=annotation,
            value=value,
            mac=mac,
        )
        self._verdicts.remember(cache_key, problem)
        if problem is not None:
            await self._report(name, uid, annotation, value, problem)
        return Mark(value, problem)

    async def _has_key_volume(self, job: Mapping[str, Any]) -> bool:
        """Whether the Job's pod template mounts a key (the operator's watch keeps no
        spec: then the Job is read). A Job that is gone counts as having one."""
        spec = job.get("spec")
        if spec is None:
            name = str((job.get("metadata") or {}).get("name", ""))
            full = await self._jobs.get_job(self.namespace, name)
            if full is None:
                return True
            spec = full.get("spec") or {}
        volumes = ((spec.get("template") or {}).get("spec") or {}).get("volumes") or []
        return any(v.get("name") == KEY_VOLUME for v in volumes)

    async def screen(self, job: Mapping[str, Any]) -> Mapping[str, Any]:
        """``job`` with every screened mark (the settlement) that does not verify
        removed, so the tracker never sees it; ``job`` itself when nothing is removed."""
        annotations = (job.get("metadata") or {}).get("annotations") or {}
        doomed = [a for a in SCREENED if a in annotations and (await self.verify(job, a)).problem]
        if not doomed:
            return job
        cleaned = dict(job)
        meta = dict(cleaned.get("metadata") or {})
        meta["annotations"] = {
            k: v
            for k, v in annotations.items()
            if k not in doomed and k not in {mac_annotation(a) for a in doomed}
        }
        cleaned["metadata"] = meta
        return cleaned

    async def _report(self, name: str, uid: str, annotation: str, value: str, problem: str) -> None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        text = f"annotation {annotation}={shown!r} is not trusted: {problem}; it is ignored"
        logger.warning("Job %s: %s", name, text, extra={"job_name": name})
        try:
            await self._jobs.record_event(
                namespace=self.namespace,
                job_name=name,
                job_uid=uid or None,
                type="Warning",
                reason=EVENT_REASON,
                message=text,
            )
        except Exception as exc:  # an Event is a courtesy: never in the way of settling
            logger.info("could not record %s event on Job %s: %s", EVENT_REASON, name, exc)
