"""In-memory twins of the dispatcher's two protocols, shipped beside the real ones (as
httpx ships its mock transport) so that code built on the dispatcher — the operator's
reconcile loop above all — is tested against the real interfaces without a cluster, a
broker or a subprocess.

* ``MemoryJobClient`` is a ``JobClient``: Jobs are dicts kept by (namespace, name), with
  the API server's behaviours the dispatcher relies on: 409 on a second create of the
  same name (the existing Job is returned, ``created=False``), ``deletionTimestamp`` while
  a finalizer remains, a resourceVersion per change, list by equality label selector,
  and watches that replay every change after the version they start from. Tests end a
  Job with ``finish``.
* ``MemoryObjects`` is an API server's object store (custom resources with a status
  subresource, Leases, Events) behind the operator's ``ObjectClient`` interface, one
  ``client()`` per replica under test, each of which can be cut off.
* ``MemoryBroker`` holds queues; ``MemorySource`` is a ``MessageSource`` consuming one of
  them with a prefetch, as a RabbitMQ consumer does: messages in hand when the source
  closes go back to the queue marked redelivered, so a replaced dispatcher adopts
  their Jobs. ``MemoryBroker.down`` makes ``start`` fail as an unreachable broker does.

Core only: no broker or Kubernetes library.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobrunner.core import apipath
from jobrunner.core.models import FINALIZER, Action, Decision, Delivery, JobResult
from jobrunner.core.naming import message_identity
from jobrunner.core.protocols import (
    ApiRejected,
    JobPage,
    SourceError,
    TransientError,
    WatchEvent,
    WatchExpired,
)
from jobrunner.core.timestamps import now_rfc3339
from jobrunner.rendering import messagesecret
from jobrunner.tracking.results import Ended, result_of

__all__ = [
    "MemoryBroker",
    "MemoryHandle",
    "MemoryJobClient",
    "MemoryObjectClient",
    "MemoryObjects",
    "MemorySource",
    "Settled",
    "matches",
    "merge_patch",
]


def matches(labels: Mapping[str, str], selector: str) -> bool:
    """Whether ``labels`` satisfy an equality-based selector (``a=b,c=d``; ``a!=b``;
    a bare key for existence), the forms jobrunner uses."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, _, value = term.partition("=")
            if labels.get(key.strip().rstrip("=")) != value.strip():
                return False
        elif term not in labels:
            return False
    return True


class MemoryJobClient:
    """A ``JobClient`` over dicts. ``calls`` counts requests by method name."""

    def __init__(self, *, history: int = 10_000) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.terminated: dict[tuple[str, str], Ended] = {}
        """How each finished Job's container ended, when ``finish`` was told."""
        self.calls: dict[str, int] = {}
        self._version = itertools.count(1)
        self._rv = 0
        self._log: list[tuple[int, str, str, dict[str, Any]]] = []
        """(resourceVersion, namespace, event type, object) of every change."""
        self._history = history
        self._changed = asyncio.Event()
        """Replaced by a fresh one at each change, after setting it: wakes the watchers."""
        self.fail_next: dict[str, BaseException] = {}
        """Method name -> an exception its next call raises (once)."""

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        failure = self.fail_next.pop(name, None)
        if failure is not None:
            raise failure

    async def _record(self, kind: str, job: dict[str, Any]) -> None:
        self._rv = next(self._version)
        job["metadata"]["resourceVersion"] = str(self._rv)
        self._log.append((self._rv, job["metadata"]["namespace"], kind, copy.deepcopy(job)))
        del self._log[: -self._history]
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ------------------------------------------------------------------ JobClient
    async def create_job(
        self, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> tuple[Mapping[str, Any], bool]:
        """The Job, then its Secret owned by it, by the rules the real clients follow
        (``jobrunner.rendering.messagesecret``); a Secret that is there already and holds another
        body is refused (409), the Job made for it removed."""
        self._count("create_job")
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        existing = self.jobs.get(key)
        digest = messagesecret.job_digest(job)
        skey = (meta["namespace"], str((secret or {}).get("metadata", {}).get("name")))
        if existing is None:
            found = self.secrets.get(skey) if secret is not None else None
            check = messagesecret.check_existing(
                found, job_name=meta["name"], job_uid=None, digest=digest
            )
            if check.verdict is messagesecret.Verdict.REFUSE:
                raise messagesecret.conflict(check)
            stored = copy.deepcopy(dict(job))
            stored["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
            stored.setdefault("status", {})
            self.jobs[key] = stored
            await self._record("ADDED", stored)
            if secret is not None and found is None:
                self.secrets[skey] = copy.deepcopy(messagesecret.owned_by(secret, stored))
            return copy.deepcopy(stored), True
        if secret is not None and messagesecret.job_digest(existing) == digest:
            check = messagesecret.check_existing(
                self.secrets.get(skey),
                job_name=meta["name"],
                job_uid=existing["metadata"]["uid"],
                digest=digest,
            )
            if check.verdict is messagesecret.Verdict.REFUSE:
                await self._remove(*key)
                raise messagesecret.conflict(check)
            if check.verdict is messagesecret.Verdict.CREATE:
                self.secrets[skey] = copy.deepcopy(messagesecret.owned_by(secret, existing))
        return copy.deepcopy(existing), False

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        self._count("get_job")
        apipath.name(name, field="Job name")  # as the real client: refused unsent
        job = self.jobs.get((namespace, name))
        return copy.deepcopy(job) if job is not None else None

    async def job_result(self, namespace: str, name: str) -> JobResult | None:
        """``ReadsResults``, from the Job alone (no pods here): ``terminated`` set by
        ``finish`` stands for the pod's container."""
        self._count("job_result")
        job = self.jobs.get((namespace, name))
        if job is None:
            return None
        ended = self.terminated.get((namespace, name))
        return result_of(job, [ended] if ended is not None else [])

    def _existing(self, namespace: str, name: str) -> dict[str, Any]:
        job = self.jobs.get((namespace, name))
        if job is None:
            raise ApiRejected(404, "NotFound", f'jobs.batch "{name}" not found')
        return job

    async def annotate_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any]:
        self._count("annotate_job")
        job = self._existing(namespace, name)
        job["metadata"].setdefault("annotations", {}).update(annotations)
        await self._record("MODIFIED", job)
        return copy.deepcopy(job)

    async def delete_job(self, namespace: str, name: str) -> None:
        self._count("delete_job")
        job = self.jobs.get((namespace, name))
        if job is None:
            return
        if job["metadata"].get("finalizers"):
            if not job["metadata"].get("deletionTimestamp"):
                job["metadata"]["deletionTimestamp"] = now_rfc3339()
                await self._record("MODIFIED", job)
            return
        await self._remove(namespace, name)

    async def _remove(self, namespace: str, name: str) -> None:
        job = self.jobs.pop((namespace, name))
        await self._record("DELETED", job)

    async def release_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any] | None:
        self._count("release_job")
        job = self.jobs.get((namespace, name))
        if job is None:
            return None
        meta = job["metadata"]
        meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        meta.setdefault("annotations", {}).update(annotations)
        await self._record("MODIFIED", job)
        if meta.get("deletionTimestamp") and not meta["finalizers"]:
            await self._remove(namespace, name)
            return None
        return copy.deepcopy(job)

    async def read_secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        self._count("read_secret")
        apipath.name(name, field="Secret name")  # as the real client: refused unsent
        secret = self.secrets.get((namespace, name))
        return None if secret is None else dict(secret.get("data") or {})

    async def record_event(
        self,
        *,
        namespace: str,
        job_name: str,
        job_uid: str | None,
        type: str,
        reason: str,
        message: str,
    ) -> None:
        self._count("record_event")
        self.events.append(
            {
                "namespace": namespace,
                "job": job_name,
                "type": type,
                "reason": reason,
                "message": message,
            }
        )

    async def list_jobs(
        self, namespace: str, selector: str, *, limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        self._count("list_jobs")
        items: list[Mapping[str, Any]] = [
            copy.deepcopy(job)
            for (ns, _), job in sorted(self.jobs.items())
            if ns == namespace and matches(job["metadata"].get("labels") or {}, selector)
        ]
        start = int(continue_token or 0)
        page = items[start : start + limit]
        more = start + limit < len(items)
        return JobPage(
            items=page,
            resource_version=str(self._rv),
            continue_token=str(start + limit) if more else None,
        )

    async def watch_jobs(
        self, namespace: str, selector: str, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        self._count("watch_jobs")
        after = int(resource_version or 0)
        if self._log and after < self._log[0][0] - 1:
            raise WatchExpired(f"too old resource version: {after}")
        while True:
            for rv, ns, kind, obj in list(self._log):
                if rv <= after:
                    continue
                after = rv
                if ns == namespace and matches(obj["metadata"].get("labels") or {}, selector):
                    yield WatchEvent(type=kind, object=copy.deepcopy(obj))
            if self._rv <= after:
                await self._changed.wait()

    async def close(self) -> None:
        pass

    # ------------------------------------------------------------------ for tests
    async def finish(
        self,
        namespace: str,
        name: str,
        *,
        succeeded: bool = True,
        reason: str = "",
        exit_code: int | None = None,
        termination_message: str = "",
    ) -> None:
        """End a Job as the Job controller would: a ``Complete`` or ``Failed`` condition;
        ``exit_code`` and ``termination_message``: what its pod's container ended with
        (for ``job_result``)."""
        job = self._existing(namespace, name)
        if exit_code is not None or termination_message:
            self.terminated[(namespace, name)] = Ended("main", exit_code, termination_message)
        kind = "Complete" if succeeded else "Failed"
        now = now_rfc3339()
        job["status"] = {
            "conditions": [
                {
                    "type": kind,
                    "status": "True",
                    "reason": reason or ("Completed" if succeeded else "BackoffLimitExceeded"),
                    "lastTransitionTime": now,
                }
            ],
            **({"completionTime": now} if succeeded else {}),
        }
        await self._record("MODIFIED", job)

    def names(self, namespace: str, selector: str = "") -> list[str]:
        return sorted(
            name
            for (ns, name), job in self.jobs.items()
            if ns == namespace and matches(job["metadata"].get("labels") or {}, selector)
        )

    def running(self, namespace: str, selector: str = "") -> list[str]:
        """Jobs with no Complete/Failed condition yet."""
        return [
            name
            for name in self.names(namespace, selector)
            if not (self.jobs[(namespace, name)].get("status") or {}).get("conditions")
        ]

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        return self._existing(namespace, name)


# ---------------------------------------------------------------------- messages
@dataclass
class _Message:
    body: bytes
    message_id: str | None
    headers: dict[str, str]
    redelivered: bool = False
    published_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Settled:
    """What became of a message: the action, and for a dead letter its reason."""

    queue: str
    message_id: str | None
    body: bytes
    action: str
    reason: str = ""
    job: str | None = None


class _Queue:
    def __init__(self) -> None:
        self.ready: list[_Message] = []
        self.available = asyncio.Condition()


class MemoryBroker:
    """Queues of messages shared by any number of ``MemorySource`` consumers."""

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.settled: list[Settled] = []
        self.down = False
        """While True, ``MemorySource.start`` fails like an unreachable broker."""
        self.missing: set[str] = set()
        """Queues that do not exist: ``start`` on them fails (until removed from here)."""
        self.consumers: dict[str, int] = {}

    def queue(self, name: str) -> _Queue:
        return self.queues.setdefault(name, _Queue())

    async def publish(
        self,
        queue: str,
        body: bytes | str,
        *,
        message_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        q = self.queue(queue)
        data = body.encode() if isinstance(body, str) else body
        q.ready.append(_Message(data, message_id, dict(headers or {})))
        async with q.available:
            q.available.notify_all()

    async def _requeue(self, queue: str, messages: Iterable[_Message]) -> None:
        q = self.queue(queue)
        back = [_Message(m.body, m.message_id, m.headers, True, m.published_at) for m in messages]
        q.ready[:0] = back
        async with q.available:
            q.available.notify_all()

    def depth(self, queue: str) -> int:
        return len(self.queue(queue).ready)

    def acked(self, queue: str | None = None) -> list[Settled]:
        return [s for s in self.settled if s.action == "ack" and queue in (None, s.queue)]

    def dead_letters(self, queue: str | None = None) -> list[Settled]:
        return [s for s in self.settled if s.action == "dead-letter" and queue in (None, s.queue)]


@dataclass
class MemoryHandle:
    delivery: Delivery
    message: _Message
    source: MemorySource
    settled: bool = False


class MemorySource:
    """A ``MessageSource`` on one queue of a ``MemoryBroker``, with a prefetch."""

    name = "memory"

    def __init__(self, broker: MemoryBroker, queue: str, *, prefetch: int) -> None:
        self.broker = broker
        self.queue = queue
        self.prefetch = prefetch
        self.problem: str | None = None
        self._started = False
        self._consuming = False
        self._in_hand: list[MemoryHandle] = []
        self._freed = asyncio.Event()

    async def start(self) -> None:
        if self.broker.down:
            raise SourceError(f"memory broker: queue {self.queue!r} unreachable (broker down)")
        if self.queue in self.broker.missing:
            raise SourceError(f"memory broker: queue {self.queue!r} does not exist; declare it")
        self._started = self._consuming = True
        self.broker.consumers[self.queue] = self.broker.consumers.get(self.queue, 0) + 1

    async def deliveries(self) -> AsyncIterator[MemoryHandle]:
        q = self.broker.queue(self.queue)
        while True:
            while len(self._in_hand) >= self.prefetch or not self._consuming:
                self._freed.clear()
                await self._freed.wait()
            async with q.available:
                while not q.ready or not self._consuming:
                    await q.available.wait()
                message = q.ready.pop(0)
            handle = MemoryHandle(
                delivery=Delivery(
                    source=self.name,
                    identity=message_identity(message.message_id, message.body, message.headers),
                    body=message.body,
                    message_id=message.message_id,
                    headers=message.headers,
                    redelivered=message.redelivered,
                    metadata={"queue": self.queue},
                    received_at=time.monotonic(),
                    published_at=message.published_at,
                ),
                message=message,
                source=self,
            )
            self._in_hand.append(handle)
            yield handle

    @property
    def connected(self) -> bool:
        return self._started and not self.broker.down

    @property
    def in_hand(self) -> int:
        return len(self._in_hand)

    async def depth(self) -> int | None:
        return self.broker.depth(self.queue)

    async def stop_consuming(self) -> None:
        self._consuming = False

    async def settle(self, handle: Any, decision: Decision) -> bool:
        if not isinstance(handle, MemoryHandle) or handle not in self._in_hand:
            return False  # its "channel" is gone: it went back to the queue
        self._in_hand.remove(handle)
        self._freed.set()
        if decision.action is Action.REQUEUE:
            await self.broker._requeue(self.queue, [handle.message])
            return True
        handle.settled = True
        self.broker.settled.append(
            Settled(
                queue=self.queue,
                message_id=handle.message.message_id,
                body=handle.message.body,
                action=decision.action.value,
                reason=decision.reason,
                job=decision.job_name,
            )
        )
        return True

    def is_durable(self, handle: Any) -> bool:
        return True

    async def dead_letter_copy(self, original: Mapping[str, Any], decision: Decision) -> None:
        body = original.get("body", b"")
        self.broker.settled.append(
            Settled(
                queue=self.queue,
                message_id=original.get("message_id"),
                body=body if isinstance(body, bytes) else str(body).encode(),
                action=Action.DEAD_LETTER.value,
                reason=decision.reason,
                job=decision.job_name,
            )
        )

    async def close(self) -> None:
        """Like a closed channel: every message still in hand goes back, redelivered."""
        held, self._in_hand = self._in_hand, []
        if held:
            await self.broker._requeue(self.queue, [h.message for h in held])
        if self._started:
            self.broker.consumers[self.queue] -= 1
        self._started = self._consuming = False


# ---------------------------------------------------------------------- API objects
def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _parse_path(path: str) -> tuple[str, str | None, str | None, str | None]:
    """(group/version/resource, namespace, name, subresource) of an API path; InvalidName
    for one the real client would refuse unsent (``apipath.check_path``)."""
    apipath.check_path(path)
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        gv, rest = parts[1], parts[2:]
    else:
        gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    namespace = None
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource = f"{gv}/{rest[0]}"
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return resource, namespace, name, sub


class MemoryObjects:
    """An API server's object store in memory, for the operator's unit tests: objects by
    path, resourceVersions, optimistic concurrency (409 on a stale version), generation
    bumped when ``spec`` changes, a ``status`` subresource, label selectors and watches.
    Each replica under test talks through its own ``client()``, which a test can cut off
    (``down``) like a partition."""

    def __init__(self, *, history: int = 10_000) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self._version = itertools.count(1)
        self._rv = 0
        self._log: list[tuple[int, str, str | None, str, dict[str, Any]]] = []
        self._history = history
        self._changed = asyncio.Event()

    def client(self, name: str = "client") -> MemoryObjectClient:
        return MemoryObjectClient(self, name)

    async def _record(self, kind: str, resource: str, namespace: str | None, obj: Any) -> None:
        self._rv = next(self._version)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._log.append((self._rv, resource, namespace, kind, copy.deepcopy(obj)))
        del self._log[: -self._history]
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def find(self, path: str) -> dict[str, Any] | None:
        resource, namespace, name, _ = _parse_path(path)
        assert name is not None
        return self.objects.get((resource, namespace, name))

    def items(self, path: str) -> list[dict[str, Any]]:
        resource, namespace, _, _ = _parse_path(path)
        return [
            obj
            for (r, ns, _), obj in sorted(self.objects.items(), key=lambda kv: str(kv[0]))
            if r == resource and (namespace is None or ns == namespace)
        ]


class MemoryObjectClient:
    """One replica's connection to a ``MemoryObjects`` store (an ``ObjectClient``)."""

    def __init__(self, store: MemoryObjects, name: str) -> None:
        self.store = store
        self.name = name
        self._down = False
        self.requests: dict[str, int] = {}

    @property
    def down(self) -> bool:
        """While True every request fails as an unreachable API server does, and open
        watches break."""
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        changed, self.store._changed = self.store._changed, asyncio.Event()
        changed.set()  # open watches look again

    def _check(self, verb: str) -> None:
        self.requests[verb] = self.requests.get(verb, 0) + 1
        if self.down:
            raise TransientError(f"API server unreachable from {self.name}")

    async def list(
        self, path: str, *, selector: str = "", limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        self._check("LIST")
        items: list[Mapping[str, Any]] = [
            copy.deepcopy(o)
            for o in self.store.items(path)
            if matches(o["metadata"].get("labels") or {}, selector)
        ]
        start = int(continue_token or 0)
        more = start + limit < len(items)
        return JobPage(
            items=items[start : start + limit],
            resource_version=str(self.store._rv),
            continue_token=str(start + limit) if more else None,
        )

    async def watch(
        self, path: str, *, selector: str = "", resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        self._check("WATCH")
        resource, namespace, _, _ = _parse_path(path)
        store = self.store
        after = int(resource_version or 0)
        if store._log and after < store._log[0][0] - 1:
            raise WatchExpired(f"too old resource version: {after}")
        while True:
            if self.down:
                raise TransientError(f"watch from {self.name} broke")
            for rv, r, ns, kind, obj in list(store._log):
                if rv <= after:
                    continue
                after = rv
                if r != resource or (namespace is not None and ns != namespace):
                    continue
                if matches(obj["metadata"].get("labels") or {}, selector):
                    yield WatchEvent(type=kind, object=copy.deepcopy(obj))
            if store._rv <= after:
                await store._changed.wait()

    async def get(self, path: str) -> dict[str, Any] | None:
        self._check("GET")
        found = self.store.find(path)
        return copy.deepcopy(found) if found is not None else None

    async def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        self._check("POST")
        resource, namespace, _, _ = _parse_path(path)
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = (resource, namespace, meta["name"])
        if key in self.store.objects:
            raise ApiRejected(409, "AlreadyExists", f"{resource} {meta['name']!r} already exists")
        if namespace:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        self.store.objects[key] = new
        await self.store._record("ADDED", resource, namespace, new)
        return copy.deepcopy(new)

    def _current(self, path: str) -> tuple[tuple[str, str | None, str], dict[str, Any], str | None]:
        resource, namespace, name, sub = _parse_path(path)
        assert name is not None
        key = (resource, namespace, name)
        current = self.store.objects.get(key)
        if current is None:
            raise ApiRejected(404, "NotFound", f"{resource} {name!r} not found")
        return key, current, sub

    async def _write(
        self,
        key: tuple[str, str | None, str],
        old: dict[str, Any],
        new: dict[str, Any],
        sub: str | None,
    ) -> dict[str, Any]:
        wanted_rv = (new.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise ApiRejected(409, "Conflict", "the object has been modified")
        if sub == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
        else:
            result = copy.deepcopy(new)
            result["metadata"] = {**old["metadata"], **(new.get("metadata") or {})}
            for fixed in ("uid", "creationTimestamp", "generation", "name", "namespace"):
                if fixed in old["metadata"]:
                    result["metadata"][fixed] = old["metadata"][fixed]
            if "status" in old:
                result["status"] = old["status"]
            else:
                result.pop("status", None)
            if result.get("spec") != old.get("spec"):
                result["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self.store.objects[key] = result
        await self.store._record("MODIFIED", key[0], key[1], result)
        return copy.deepcopy(result)

    async def replace(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        self._check("PUT")
        key, current, sub = self._current(path)
        return await self._write(key, current, copy.deepcopy(dict(obj)), sub)

    async def patch(self, path: str, patch: Any, *, json_patch: bool = False) -> dict[str, Any]:
        self._check("PATCH")
        if json_patch:
            raise NotImplementedError("MemoryObjects takes merge patches only")
        key, current, sub = self._current(path)
        merged = merge_patch(current, patch)
        if "resourceVersion" not in ((patch or {}).get("metadata") or {}):
            merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return await self._write(key, current, merged, sub)

    async def delete(self, path: str, *, resource_version: str | None = None) -> None:
        self._check("DELETE")
        resource, namespace, name, _ = _parse_path(path)
        assert name is not None
        key = (resource, namespace, name)
        current = self.store.objects.get(key)
        if current is None:
            return
        if resource_version and resource_version != current["metadata"]["resourceVersion"]:
            raise ApiRejected(409, "Conflict", "the object has been modified")
        del self.store.objects[key]
        await self.store._record("DELETED", resource, namespace, current)
