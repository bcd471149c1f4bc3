"""Who may serve which ScaledJobs: every replica works, each ScaledJob has one owner.

ScaledJobs hash into ``B`` buckets (``resources.bucket_of``). Each bucket is a
``coordination.k8s.io`` Lease, ``<group>-bucket-<i>``, whose ``holderIdentity`` is the
replica serving it; each replica also keeps a *member* Lease, ``<group>-member-<hash>``,
which it renews every ``renew_every`` seconds. All Leases live in one namespace (the
release's), labelled ``jobrunner.dev/lease-group=<group>``, and every replica watches
them.

* **Liveness** is the member Lease alone: a bucket Lease is written only when it changes
  hands, so the steady cost is one write per replica per renewal, whatever ``B`` is.
  As in client-go, a member counts as gone when its Lease has not changed for
  ``duration`` seconds *as this replica observed it* (its own clock, no clock sync).
* **Fair share**: a replica holds at most ``ceil(B / live members)`` buckets; it takes
  buckets that are free (no holder, or a holder whose member Lease is gone or expired)
  by a compare-and-swap on the Lease's resourceVersion, and gives up its excess when
  members join: it first stops the dispatchers of those buckets, then clears the holder.
* **Safety**: a replica serves its buckets only while its last successful renewal is
  younger than ``renew_deadline`` (< ``duration``): one cut off from the API server stops
  its dispatchers before any other replica may decide it is gone. Overlap beyond that is
  made harmless by deterministic Job names (409 -> adopt) and the settled annotation, as
  in kopf's peering there are no per-object locks.
* **Exit** (SIGTERM): dispatchers stop, then the member Lease and the bucket Leases this
  replica holds are deleted (each only in the version it holds), so the others take over
  within one watch event, not one lease duration, and a group whose last replica stops
  cleanly (``helm uninstall``) leaves no Lease behind.
* **Clean-up**: a member Lease not renewed for ``STALE_MEMBER_FACTOR`` lease durations
  (60 s by default) is deleted by the survivors: identities carry a random suffix, so
  every crashed replica would otherwise leave one for good. A bucket Lease needs no
  clean-up: its holder is replaced when a survivor takes it over.
* **403** on this replica's own Leases (its Role gone, e.g. after ``helm uninstall``, or
  a lease namespace or group that is not the release's) is said as that, not as a
  failed renewal or a clean exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from jobrunner.core.protocols import ApiRejected, TransientError
from jobrunner.core.tasks import start_guarded, stop_tasks
from jobrunner.operator import api
from jobrunner.operator.api import ObjectClient
from jobrunner.operator.informer import Informer

logger = logging.getLogger(__name__)

LABEL_GROUP = "jobrunner.dev/lease-group"
LABEL_ROLE = "jobrunner.dev/lease-role"
STALE_MEMBER_FACTOR = 4
"""A member Lease not renewed for this many lease durations, as a survivor observed it,
is deleted by that survivor (its replica is long gone: it stopped serving at its renew
deadline and lost its buckets at one duration)."""


def forbidden(exc: BaseException, namespace: str) -> str | None:
    """What a 403 on the operator's own Leases means, in one line; None for another
    error."""
    if not isinstance(exc, ApiRejected) or exc.status != 403:
        return None
    return (
        f"the API server forbids this replica its Leases in namespace {namespace} (403): its "
        "RBAC is gone (helm uninstall?) or the lease namespace and group are not the "
        "release's (--lease-namespace, JOBRUNNER_OPERATOR__LEASE_GROUP)"
    )


def micro_time() -> str:
    """Now as a Kubernetes MicroTime."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _version(obj: dict[str, Any] | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def forbidden_hint(namespace: str, group: str) -> str:
    """What a 403 on the Leases means and what to do: the Role the identity lacks. The
    chart grants Leases by a Role ``<fullname>-leases`` in the release namespace only,
    and its replicas use the lease group ``<fullname>`` (truncated to 40 characters), so
    a replica run out of cluster as the chart's ServiceAccount needs both."""
    return (
        f"; this identity has no Role in namespace {namespace} granting get, list, watch, "
        "create, patch and delete on leases (coordination.k8s.io). The chart's Role for "
        "them is <release full name>-leases, in the release's namespace only: run with "
        "--lease-namespace <release namespace> and JOBRUNNER_OPERATOR__LEASE_GROUP=<release "
        f"full name> (this replica's group is {group}), or bind such a Role in {namespace}"
    )


class LeaseKeeper:
    def __init__(
        self,
        *,
        api_client: ObjectClient,
        namespace: str,
        group: str,
        identity: str,
        buckets: int,
        duration: float,
        renew_every: float,
        renew_deadline: float,
        on_change: Callable[[], None] = lambda: None,
        before_release: Callable[[frozenset[int]], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not renew_every < renew_deadline < duration:
            raise ValueError(
                f"lease timings must satisfy renew_every ({renew_every}) < renew_deadline "
                f"({renew_deadline}) < duration ({duration})"
            )
        self._api = api_client
        self.namespace = namespace
        self.group = group
        self.identity = identity
        self.buckets = buckets
        self.duration = duration
        self.renew_every = renew_every
        self.renew_deadline = renew_deadline
        self._on_change = on_change
        self._before_release = before_release
        self._clock = clock
        self._path = api.leases(namespace)
        self.member_name = f"{group}-member-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"
        self.informer = Informer(
            api_client,
            self._path,
            selector=f"{LABEL_GROUP}={group}",
            on_change=self._observed_change,
            what=f"Leases in {namespace}",
            forbidden=forbidden_hint(namespace, group),
        )
        self._seen: dict[str, tuple[int, float]] = {}
        """Lease name -> (resourceVersion, when this replica saw it change)."""
        self._held: dict[int, int] = {}
        """Bucket -> the resourceVersion of our write that took it."""
        self._releasing: set[int] = set()
        self._renewed_at: float | None = None
        self._registered_at: float | None = None
        self._wake = asyncio.Event()
        self._owned: frozenset[int] = frozenset()
        self.transitions = 0
        """Buckets taken or given up so far (for metrics and tests)."""

    # ------------------------------------------------------------------ what we own
    @property
    def owned(self) -> frozenset[int]:
        """The buckets whose ScaledJobs this replica may serve now."""
        return self._owned

    def bucket_name(self, bucket: int) -> str:
        return f"{self.group}-bucket-{bucket}"

    def valid(self) -> str | None:
        """None while this replica may serve (its member Lease renewed in time and the
        Lease watch in sync), else why not."""
        now = self._clock()
        if self._valid(now):
            return None
        if self._renewed_at is None:
            return "member Lease not created yet"
        if not self.informer.synced.is_set():
            return self.informer.problem or "Lease watch not in sync"
        return f"member Lease not renewed for {now - self._renewed_at:.0f}s"

    def _valid(self, now: float) -> bool:
        return (
            self._renewed_at is not None
            and now - self._renewed_at < self.renew_deadline
            and self.informer.synced.is_set()
        )

    def _refresh_owned(self) -> None:
        now = self._clock()
        owned = (
            frozenset(b for b in self._held if b not in self._releasing)
            if self._valid(now)
            else frozenset()
        )
        if owned != self._owned:
            if self._owned and not owned and not self._valid(now):
                logger.warning(
                    "no member Lease renewal for %.1fs (deadline %.0fs): stopping every "
                    "dispatcher of this replica until the API server answers again",
                    now - (self._renewed_at or now),
                    self.renew_deadline,
                )
            self._owned = owned
            self._on_change()

    def live_members(self) -> int:
        now = self._clock()
        count = 0
        for key, obj in self.informer.store.items():
            name = key[1]
            if (obj.get("metadata") or {}).get("labels", {}).get(LABEL_ROLE) != "member":
                continue
            if name == self.member_name:
                continue
            if self._alive(name, now):
                count += 1
        return count + (1 if self._valid(now) else 0)

    def fair_share(self) -> int:
        return math.ceil(self.buckets / max(1, self.live_members()))

    def _alive(self, lease_name: str, now: float) -> bool:
        seen = self._seen.get(lease_name)
        return seen is not None and now - seen[1] < self.duration

    def _member_of(self, holder: str) -> str:
        return f"{self.group}-member-{hashlib.sha256(holder.encode()).hexdigest()[:10]}"

    def holder(self, bucket: int) -> str:
        obj = self.informer.store.get((self.namespace, self.bucket_name(bucket)))
        return str(((obj or {}).get("spec") or {}).get("holderIdentity") or "")

    def silent_holder(self, bucket: int) -> str | None:
        """The holder of ``bucket`` when it is another replica whose member Lease this one
        has not seen renewed for ``renew_deadline`` seconds (or that has none): by its
        own rule it serves nothing any more (or is gone), though the bucket is not free
        before ``duration``. None otherwise, and while this replica's own view is not
        valid (one cut off from the API server must not judge the others)."""
        holder = self.holder(bucket)
        now = self._clock()
        if not holder or holder == self.identity or not self._valid(now):
            return None
        seen = self._seen.get(self._member_of(holder)) or self._seen.get(self.bucket_name(bucket))
        if seen is None or now - seen[1] < self.renew_deadline:
            return None
        return holder

    def _free(self, bucket: int, now: float) -> bool:
        holder = self.holder(bucket)
        if not holder:
            return True
        if holder == self.identity:
            return bucket not in self._held  # ours from before a restart of the same name
        member = self._member_of(holder)
        if (self.namespace, member) not in self.informer.store:
            # Its member Lease is gone: deleted on exit, or expired and cleaned up. Wait
            # a full duration from when we first saw the bucket, as for an expiry.
            return not self._alive(self.bucket_name(bucket), now)
        return not self._alive(member, now)

    # ------------------------------------------------------------------ watching
    def _observed_change(self) -> None:
        now = self._clock()
        present = set()
        for (_, name), obj in self.informer.store.items():
            present.add(name)
            version = _version(obj)
            seen = self._seen.get(name)
            if seen is None or seen[0] != version:
                self._seen[name] = (version, now)
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        # A bucket someone else now holds (they found our member Lease expired) is not
        # ours, whatever we last wrote — unless what we see is older than our write.
        for bucket, written in list(self._held.items()):
            lease = self.informer.store.get((self.namespace, self.bucket_name(bucket)))
            if lease is None or _version(lease) <= written:
                continue
            if self.holder(bucket) != self.identity:
                logger.warning(
                    "bucket %d was taken over by %s", bucket, self.holder(bucket) or "nobody"
                )
                del self._held[bucket]
        self._refresh_owned()
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Keep membership and buckets until cancelled (then call ``release``). Three
        loops: renewing the member Lease (never held up by the others: a slow drain of
        dispatchers must not let our membership lapse), a watchdog that withdraws
        everything once renewals are overdue, and the balancer that takes and gives up
        buckets."""
        tasks = [start_guarded(self.informer.run(), name="lease-informer")]
        try:
            await self.informer.synced.wait()
            tasks += [
                start_guarded(self._renewer(), name="lease-renewer"),
                start_guarded(self._watchdog(), name="lease-watchdog"),
            ]
            await self._balancer()
        finally:
            await stop_tasks(tasks, grace=0)

    def _hint(self, exc: Exception) -> str:
        if isinstance(exc, ApiRejected) and exc.status == 403:
            return forbidden_hint(self.namespace, self.group)
        return ""

    @property
    def _tick(self) -> float:
        return min(0.5, self.renew_every / 2)

    async def _renewer(self) -> None:
        while True:
            try:
                # A renewal that takes longer than the deadline is as good as none.
                async with asyncio.timeout(self.renew_deadline):
                    await self._renew_member()
                self._refresh_owned()
                self._wake.set()
                pause = self.renew_every * random.uniform(0.85, 1.0)
            except (TransientError, ApiRejected, TimeoutError) as exc:
                denied = forbidden(exc, self.namespace)
                if denied is not None:
                    logger.error("%s%s; serving nothing, trying again", denied, self._hint(exc))
                else:
                    logger.warning("renewing the member Lease failed (%s); trying again", exc)
                pause = min(1.0, self.renew_every / 2)
            await asyncio.sleep(pause)

    async def _watchdog(self) -> None:
        while True:
            self._refresh_owned()
            await asyncio.sleep(self._tick)

    async def _balancer(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._balance()
            except (TransientError, ApiRejected) as exc:
                logger.warning(
                    "taking or giving up buckets failed (%s%s); trying again", exc, self._hint(exc)
                )
            self._refresh_owned()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick):
                    await self._wake.wait()

    async def _balance(self) -> None:
        now = self._clock()
        if not self._valid(now) or self._registered_at is None:
            return
        await self._remove_stale_members(now)
        if now - self._registered_at < min(2.0, self.renew_every):
            return  # let the others' member Leases be seen before taking a share
        share = self.fair_share()
        held = sorted(b for b in self._held if b not in self._releasing)
        if len(held) > share:
            await self._give_up(frozenset(held[share:]), why=f"fair share is {share}")
            return
        if len(held) < share:
            free = [b for b in range(self.buckets) if b not in self._held and self._free(b, now)]
            random.shuffle(free)
            for bucket in free[: share - len(held)]:
                await self._take(bucket)

    async def _remove_stale_members(self, now: float) -> None:
        """Delete the member Leases of replicas gone for STALE_MEMBER_FACTOR durations
        (each only in the version seen: one renewed meanwhile stays)."""
        bound = STALE_MEMBER_FACTOR * self.duration
        for (_, name), obj in list(self.informer.store.items()):
            labels = (obj.get("metadata") or {}).get("labels") or {}
            if labels.get(LABEL_ROLE) != "member" or name == self.member_name:
                continue
            seen = self._seen.get(name)
            if seen is None or now - seen[1] < bound:
                continue
            try:
                await self._api.delete(
                    api.item(self._path, name, what="Lease name"),
                    resource_version=str(_version(obj)),
                )
            except ApiRejected as exc:
                if exc.status != 409:
                    raise
                continue  # renewed after all
            holder = (obj.get("spec") or {}).get("holderIdentity") or name
            logger.info(
                "removed the member Lease of %s (not renewed for %.0fs)", holder, now - seen[1]
            )

    async def _renew_member(self) -> None:
        sent = self._clock()
        path = api.item(self._path, self.member_name, what="Lease name")
        spec = {"renewTime": micro_time()}
        try:
            await self._api.patch(path, {"spec": spec})
        except ApiRejected as exc:
            if exc.status != 404:
                raise
            await self._api.create(
                self._path,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.member_name,
                        "labels": {LABEL_GROUP: self.group, LABEL_ROLE: "member"},
                    },
                    "spec": {
                        "holderIdentity": self.identity,
                        "leaseDurationSeconds": math.ceil(self.duration),
                        "acquireTime": micro_time(),
                        **spec,
                    },
                },
            )
            logger.info("joined lease group %s as %s", self.group, self.identity)
        self._renewed_at = sent
        if self._registered_at is None:
            self._registered_at = sent

    async def _take(self, bucket: int) -> None:
        name = self.bucket_name(bucket)
        # Decide on the very version the write is conditioned on (no await in between):
        # a bucket found free a moment ago may have been taken since, and a
        # compare-and-swap on the newer version would then succeed against its holder.
        current = self.informer.store.get((self.namespace, name))
        if not self._valid(self._clock()) or not self._free(bucket, self._clock()):
            return
        now = micro_time()
        try:
            if current is None:
                result = await self._api.create(
                    self._path,
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {
                            "name": name,
                            "labels": {LABEL_GROUP: self.group, LABEL_ROLE: "bucket"},
                        },
                        "spec": {
                            "holderIdentity": self.identity,
                            "leaseDurationSeconds": math.ceil(self.duration),
                            "acquireTime": now,
                            "renewTime": now,
                            "leaseTransitions": 0,
                        },
                    },
                )
            else:
                spec = current.get("spec") or {}
                result = await self._api.patch(
                    api.item(self._path, name, what="Lease name"),
                    {
                        "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                        "spec": {
                            "holderIdentity": self.identity,
                            "acquireTime": now,
                            "renewTime": now,
                            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + 1,
                        },
                    },
                )
        except ApiRejected as exc:
            if exc.status in (409, 404):
                return  # someone was quicker; the watch shows who
            raise
        previous = str(((current or {}).get("spec") or {}).get("holderIdentity") or "")
        self._held[bucket] = _version(result)
        self.transitions += 1
        logger.info("took bucket %d%s", bucket, f" (from {previous}, gone)" if previous else "")
        self._refresh_owned()

    async def _give_up(self, buckets: frozenset[int], *, why: str) -> None:
        """Stop serving ``buckets`` (the caller's dispatchers first), then clear them."""
        self._releasing |= buckets
        self._refresh_owned()
        try:
            if self._before_release is not None:
                await self._before_release(buckets)
            for bucket in sorted(buckets):
                await self._clear(bucket)
                logger.info("gave up bucket %d (%s)", bucket, why)
        finally:
            self._releasing -= buckets

    async def _clear(self, bucket: int) -> None:
        written = self._held.pop(bucket, None)
        if written is None:
            return
        self.transitions += 1
        name = self.bucket_name(bucket)
        current = self.informer.store.get((self.namespace, name))
        version = str(written)
        if current is not None and _version(current) >= written:
            if self.holder(bucket) != self.identity:
                return  # already someone else's
            version = current["metadata"]["resourceVersion"]
        try:
            await self._api.patch(
                api.item(self._path, name, what="Lease name"),
                {"metadata": {"resourceVersion": version}, "spec": {"holderIdentity": None}},
            )
        except ApiRejected as exc:
            if exc.status not in (404, 409):
                raise

    async def _delete_bucket(self, bucket: int) -> None:
        """Delete a bucket Lease we hold, in the version we hold it (409: someone took it
        meanwhile, and it is theirs)."""
        written = self._held.pop(bucket, None)
        if written is None:
            return
        self.transitions += 1
        current = self.informer.store.get((self.namespace, self.bucket_name(bucket)))
        version = str(written)
        if current is not None and _version(current) >= written:
            if self.holder(bucket) != self.identity:
                return  # already someone else's
            version = current["metadata"]["resourceVersion"]
        try:
            await self._api.delete(
                api.item(self._path, self.bucket_name(bucket), what="Lease name"),
                resource_version=version,
            )
        except ApiRejected as exc:
            if exc.status != 409:
                raise

    async def release(self) -> None:
        """On exit, after the dispatchers stopped: delete our member Lease and the bucket
        Leases we hold, so the others take them over at once and a clean stop leaves
        nothing behind. Best effort; what could not be removed is said, with why."""
        self._owned = frozenset()
        problems: list[str] = []
        held = sorted(self._held)
        try:
            await self._api.delete(api.item(self._path, self.member_name, what="Lease name"))
        except (TransientError, ApiRejected) as exc:
            problems.append(forbidden(exc, self.namespace) or f"member Lease: {exc}")
        for bucket in held:
            try:
                await self._delete_bucket(bucket)
            except (TransientError, ApiRejected) as exc:
                if not problems or forbidden(exc, self.namespace) is None:
                    problems.append(forbidden(exc, self.namespace) or f"bucket {bucket}: {exc}")
        if problems:
            logger.error(
                "leaving lease group %s, its Leases in %s could not all be removed (%s); a "
                "replica of the group removes a stale member Lease, or: kubectl delete lease "
                "-n %s -l %s=%s",
                self.group,
                self.namespace,
                "; ".join(dict.fromkeys(problems)),
                self.namespace,
                LABEL_GROUP,
                self.group,
            )
            return
        logger.info(
            "left lease group %s: member Lease and %d bucket Lease(s) removed",
            self.group,
            len(held),
        )


def default_identity(pod_name: str | None, hostname: str) -> str:
    """This process's identity in the lease group: the pod's name (or the host's) with a
    random suffix, so a restarted container never passes for its dead predecessor."""
    base = re.sub(r"[^a-z0-9.-]+", "-", (pod_name or hostname).lower()).strip("-.")[:50]
    return f"{base or 'jobrunner'}-{random.getrandbits(24):06x}"
