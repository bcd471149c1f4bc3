"""One Job watch per namespace for every dispatch unit of an operator replica.

A unit's tracker lists and watches the Jobs of its ScaledJob (a label selector). With
hundreds of ScaledJobs in a process that would be hundreds of watches — a thread and a
connection each, and a re-opened watch every few minutes each. ``SharedJobs`` is a
``JobClient`` that passes every call through to the real one except ``list_jobs`` and
``watch_jobs``, which it serves from one list+watch per namespace of all of jobrunner's
Jobs (``app.kubernetes.io/managed-by=jobrunner``), kept as compact copies (metadata,
status, jobrunner's small annotations: what a tracker reads), with a local version
counter and a bounded log of changes:

* ``list_jobs`` answers from the copy (once it is in sync), at the current version;
* ``watch_jobs`` replays the log after the version given; a subscriber too far behind
  gets 410 (``WatchExpired``) and lists again, as with the API server;
* when the namespace's feed breaks (the API server unreachable), every watch on it ends
  with ``TransientError``, so trackers report "not in sync" and list again once the feed
  has listed again.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from jobrunner.core.admission import WorkloadView
from jobrunner.core.models import (
    LABEL_MANAGED_BY,
    LABEL_SCALEDJOB,
    MANAGED_BY,
    JobResult,
    TokenReview,
)
from jobrunner.core.protocols import (
    ApiRejected,
    JobClient,
    JobPage,
    ReadsResults,
    ReadsWorkloads,
    TransientError,
    WatchEvent,
    WatchExpired,
)
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.tracking.tracker import outcome_of

logger = logging.getLogger(__name__)

SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
LOG_SIZE = 20_000
"""Changes kept per namespace for watches that fall behind."""
_BULKY_ANNOTATIONS = ("jobrunner.dev/original-message",)
"""Up to ~100 KiB each, read with a GET when needed; never kept in the copy."""


def matches(labels: Mapping[str, str], selector: str) -> bool:
    """Equality-based label selectors (``a=b,c=d``), the form trackers use."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


def compact(job: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Job the shared feed keeps: whatever ``tracking.tracker.JobState``
    and the status views read (metadata, status, ``spec.suspend``), without the bulky
    copy of the message. A field the tracker reads and this drops reads as its default
    under the operator only (``spec.suspend`` once did: every queued Job looked
    admitted); tests/unit/test_operator_jobwatch.py checks the two agree."""
    meta = job.get("metadata") or {}
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k not in _BULKY_ANNOTATIONS
    }
    kept = {
        k: meta[k]
        for k in (
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "labels",
            "finalizers",
        )
        if k in meta
    }
    kept["annotations"] = annotations
    out: dict[str, Any] = {"metadata": kept, "status": copy.deepcopy(job.get("status") or {})}
    spec = job.get("spec") or {}
    if "suspend" in spec:
        # Kueue's admission state (jobrunner.core.admission): the tracker reads it.
        out["spec"] = {"suspend": spec["suspend"]}
    return out


class _Feed:
    def __init__(self, inner: JobClient, namespace: str, backoff_ceiling: float) -> None:
        self.inner = inner
        self.namespace = namespace
        self.jobs: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.log: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=LOG_SIZE)
        self.synced = asyncio.Event()
        self.epoch = 0
        """Bumped each time the feed breaks: watches opened before end."""
        self.changed = asyncio.Event()
        self._ceiling = backoff_ceiling

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        self.log.append((self.version, kind, obj))
        self._wake()

    def _wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def _apply(self, kind: str, raw: Mapping[str, Any]) -> None:
        obj = compact(raw)
        name = obj["metadata"].get("name", "")
        if kind == "DELETED":
            old = self.jobs.pop(name, None)
            self._emit("DELETED", obj if old is None else {**old, **obj})
            return
        old = self.jobs.get(name)
        if old is not None and old["metadata"].get("resourceVersion") == obj["metadata"].get(
            "resourceVersion"
        ):
            return
        self.jobs[name] = obj
        self._emit("ADDED" if old is None else "MODIFIED", obj)

    async def _list(self) -> str:
        seen: set[str] = set()
        token: str | None = None
        version = ""
        while True:
            page = await self.inner.list_jobs(self.namespace, SELECTOR, continue_token=token)
            version = version or page.resource_version
            for item in page.items:
                seen.add((item.get("metadata") or {}).get("name", ""))
                self._apply("MODIFIED", item)
            token = page.continue_token
            if not token:
                break
        for name in [n for n in self.jobs if n not in seen]:
            self._apply("DELETED", self.jobs[name])
        return version

    async def run(self) -> None:
        version: str | None = None
        delay = 0.0
        while True:
            try:
                if version is None:
                    version = await self._list()
                    self.synced.set()
                    self._wake()
                async for event in self.inner.watch_jobs(self.namespace, SELECTOR, version):
                    delay = 0.0
                    meta = event.object.get("metadata") or {}
                    version = meta.get("resourceVersion") or version
                    if event.type != "BOOKMARK":
                        self._apply(event.type, event.object)
            except WatchExpired:
                version = None
            except (TransientError, ApiRejected) as exc:
                self.synced.clear()
                self.epoch += 1
                self._wake()
                delay = min(self._ceiling, max(0.2, delay * 2))
                pause = delay * (0.5 + random.random() / 2)
                logger.warning(
                    "Job watch on %s broke (%s); listing again in %.1fs", self.namespace, exc, pause
                )
                await asyncio.sleep(pause)
                version = None


class SharedJobs:
    """A ``JobClient`` whose Job lists and watches come from one feed per namespace."""

    def __init__(self, inner: JobClient, *, backoff_ceiling: float = 30.0) -> None:
        self._inner = inner
        self._ceiling = backoff_ceiling
        self._feeds: dict[str, _Feed] = {}
        self._tasks: list[asyncio.Task[Any]] = []

    def _feed(self, namespace: str) -> _Feed:
        feed = self._feeds.get(namespace)
        if feed is None:
            feed = self._feeds[namespace] = _Feed(self._inner, namespace, self._ceiling)
            self._tasks.append(
                start_guarded(feed.run(), name=f"job-feed-{namespace}", essential=False)
            )
        return feed

    @property
    def namespaces(self) -> list[str]:
        return sorted(self._feeds)

    def active(self, namespace: str, scaledjob: str) -> int | None:
        """How many Jobs of ``scaledjob`` have not finished (tracker.outcome_of), from the
        namespace's copy (its feed is opened if it was not): what ``activeJobs`` shows
        while no dispatcher runs for it (paused, failing). None until in sync."""
        feed = self._feed(namespace)
        if not feed.synced.is_set():
            return None
        return sum(
            1
            for job in feed.jobs.values()
            if (job["metadata"].get("labels") or {}).get(LABEL_SCALEDJOB) == scaledjob
            and outcome_of(job) is None
        )

    async def list_jobs(
        self, namespace: str, selector: str, *, limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        feed = self._feed(namespace)
        await feed.synced.wait()
        items: list[Mapping[str, Any]] = [
            copy.deepcopy(job)
            for job in feed.jobs.values()
            if matches(job["metadata"].get("labels") or {}, selector)
        ]
        return JobPage(items=items, resource_version=str(feed.version), continue_token=None)

    async def watch_jobs(
        self, namespace: str, selector: str, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        feed = self._feed(namespace)
        epoch = feed.epoch
        after = int(resource_version or 0)
        while True:
            if feed.epoch != epoch:
                raise TransientError(f"the shared Job watch on {namespace} broke")
            if feed.log and after < feed.log[0][0] - 1:
                raise WatchExpired(f"too old resource version: {after} (410)")
            changed = feed.changed
            for version, kind, obj in list(feed.log):
                if version <= after:
                    continue
                after = version
                if matches(obj["metadata"].get("labels") or {}, selector):
                    yield WatchEvent(type=kind, object=copy.deepcopy(obj))
            if feed.version <= after and feed.epoch == epoch:
                await changed.wait()

    # ------------------------------------------------------------------ the rest: passed on
    async def create_job(
        self, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> tuple[Mapping[str, Any], bool]:
        return await self._inner.create_job(job, secret)

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return await self._inner.get_job(namespace, name)

    async def annotate_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any]:
        return await self._inner.annotate_job(namespace, name, annotations)

    async def delete_job(self, namespace: str, name: str) -> None:
        await self._inner.delete_job(namespace, name)

    async def release_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any] | None:
        return await self._inner.release_job(namespace, name, annotations)

    async def read_secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return await self._inner.read_secret(namespace, name)

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
        await self._inner.record_event(
            namespace=namespace,
            job_name=job_name,
            job_uid=job_uid,
            type=type,
            reason=reason,
            message=message,
        )

    async def review_token(self, token: str, *, audiences: tuple[str, ...] = ()) -> TokenReview:
        """The real client's TokenReview (protocols.TokenReviewer), for the HTTP trigger's
        ``auth: tokenReview``: without it the runner found no reviewer behind this
        wrapper and every ServiceAccount token was answered 503 under the operator."""
        review = getattr(self._inner, "review_token", None)
        if review is None:
            raise TransientError("this Job client cannot review tokens")
        verdict: TokenReview = await review(token, audiences=audiences)
        return verdict

    async def failure_detail(self, namespace: str, name: str) -> str:
        """The real client's, when it has one (see protocols.DescribesFailures)."""
        describe = getattr(self._inner, "failure_detail", None)
        if describe is None:
            return ""
        detail: str = await describe(namespace, name)
        return detail

    async def job_result(self, namespace: str, name: str) -> JobResult | None:
        """The real client's, when it has one (see protocols.ReadsResults)."""
        if not isinstance(self._inner, ReadsResults):
            return None
        return await self._inner.job_result(namespace, name)

    async def workload_of(self, namespace: str, job_uid: str) -> WorkloadView | None:
        """The real client's, when it has one (see protocols.ReadsWorkloads): without it
        the operator could not tell why Kueue does not admit a Job."""
        if not isinstance(self._inner, ReadsWorkloads):
            return None
        return await self._inner.workload_of(namespace, job_uid)

    async def close(self) -> None:
        """Stop the feeds (the real client is the caller's to close)."""
        await stop_tasks(self._tasks, grace=0)
        self._tasks.clear()
