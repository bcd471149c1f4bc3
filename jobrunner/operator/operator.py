"""One operator replica: watches ScaledJobs (and the TriggerAuthentications they refer
to), keeps its share of the bucket Leases, and has the registry run one dispatch unit
for each ScaledJob of the buckets it holds; writes their status and Events.

The desired state is recomputed from the local stores whenever anything changes (an
object, a Lease, a unit's state) and handed to the registry, which converges each key on
its own. Nothing is decided from a store that is not in sync: while the ScaledJob watch
is broken, units keep running as they are (only losing the Leases stops them).

Signals are the caller's: ``run`` returns when ``stop`` is set, after stopping every unit
(running Jobs are left running) and then giving up its Leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jobrunner.core.protocols import ApiRejected, JobClient, TransientError
from jobrunner.core.redaction import redact
from jobrunner.core.settings import OperatorSettings, Settings
from jobrunner.core.tasks import is_essential, start_guarded, stop_tasks
from jobrunner.manifest.triggers import Reach
from jobrunner.observability.httpserver import Heartbeat, HttpEndpoints
from jobrunner.observability.telemetry import Telemetry
from jobrunner.operator import api
from jobrunner.operator.api import ObjectClient
from jobrunner.operator.crd import NO_OPERATOR
from jobrunner.operator.informer import Informer
from jobrunner.operator.jobwatch import SharedJobs
from jobrunner.operator.leases import LeaseKeeper
from jobrunner.operator.registry import Phase, Registry, Slot
from jobrunner.operator.resources import (
    Key,
    Wanted,
    bucket_of,
    keda_paused,
    takeover_requested,
    wanted_from,
)
from jobrunner.operator.secrets import SecretVersions, refresh_loop
from jobrunner.operator.status import (
    EventRecorder,
    StatusWriter,
    desired_status,
    rejected_problem,
    rejection_summary,
    unserved_status,
)
from jobrunner.rendering.renderer import render_pool
from jobrunner.rendering.sandbox.pool import RenderPool
from jobrunner.runner import STARTING, DispatchUnit

logger = logging.getLogger(__name__)

UnitBuilder = Callable[[Wanted], Awaitable[DispatchUnit]]
TROUBLE_EVENT_SECONDS = 300.0
"""While a ScaledJob's dispatcher stays in the same trouble (SourceFailed, JobsRejected),
at most one Warning Event about it per this many seconds."""


class Wakeups:
    """What sets the reconcile loop going: ``poke`` when anything changed (an object, a
    Lease, a Secret), ``unit_changed`` when a unit started or stopped (which
    ``stop_buckets`` waits for). Shared by the collaborators that see the changes."""

    def __init__(self) -> None:
        self.dirty = asyncio.Event()
        self.units_moved = asyncio.Event()

    def poke(self) -> None:
        self.dirty.set()

    def unit_changed(self, _key: Key) -> None:
        self.units_moved.set()
        self.poke()


class EventTeller:
    """Events on ScaledJobs said without waiting: logged at once, then written by a short
    task of their own (``close`` lets the pending ones finish, briefly)."""

    def __init__(self, recorder: EventRecorder) -> None:
        self.recorder = recorder
        self._pending: set[asyncio.Task[Any]] = set()

    def __call__(self, wanted: Wanted, kind: str, reason: str, message: str) -> None:
        logger.info(
            "%s/%s: %s: %s",
            *wanted.key,
            reason,
            message,
            extra={"scaledjob": wanted.key[1]},
        )
        task = start_guarded(
            self.recorder.record(wanted, kind, reason, message),
            name=f"event-{reason}-{wanted.key[1]}",
            long_lived=False,
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        await stop_tasks(list(self._pending), grace=2.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitFactory:
    """Makes and starts the dispatch unit of one ScaledJob. Every unit of a replica shares
    one Job list+watch per namespace (``shared_jobs``), not one per ScaledJob, and one pool
    of render workers (``renders``, jobrunner.rendering.sandbox)."""

    settings: Settings
    telemetry: Telemetry
    shared_jobs: SharedJobs
    secrets: SecretVersions
    template_dirs: list[Path]
    reach: Reach
    renders: RenderPool

    @classmethod
    def create(
        cls,
        *,
        settings: Settings,
        telemetry: Telemetry,
        jobs: JobClient,
        secrets: SecretVersions,
        template_dirs: list[Path],
        reach: Reach,
    ) -> UnitFactory:
        """A factory whose units share a new Job watch over ``jobs`` and a new render pool."""
        return cls(
            settings=settings,
            telemetry=telemetry,
            shared_jobs=SharedJobs(jobs, backoff_ceiling=settings.kube.api_retry_max_seconds),
            secrets=secrets,
            template_dirs=template_dirs,
            reach=reach,
            renders=render_pool(settings.dispatcher),
        )

    async def build(self, wanted: Wanted) -> DispatchUnit:
        assert wanted.scaledjob is not None
        return await DispatchUnit.create(
            wanted.scaledjob,
            jobs=self.shared_jobs,
            settings=self.settings,
            telemetry=self.telemetry,
            authentications=wanted.authentications,
            read_secret=self.secrets.reader(wanted.key),
            base_dirs=self.template_dirs,
            reach=self.reach,
            renders=self.renders,
        )

    def start(self, unit: DispatchUnit) -> None:
        unit.start(settings=self.settings, telemetry=self.telemetry)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Watches:
    """The informers of one replica: jobrunner.dev ScaledJobs and TriggerAuthentications
    in each namespace served, and (with ``keda_takeover``) their keda.sh twins."""

    scaledjobs: list[Informer]
    authentications: list[Informer]
    keda_scaledjobs: list[Informer]
    keda_authentications: list[Informer]


def _watches(
    objects: ObjectClient, op: OperatorSettings, *, on_change: Callable[[], None]
) -> Watches:
    namespaces: list[str | None] = list(op.namespaces()) or [None]

    def informers(keda: bool) -> tuple[list[Informer], list[Informer]]:
        group = "keda.sh " if keda else ""
        scaledjobs = [
            Informer(
                objects,
                api.scaledjobs(ns, keda=keda),
                selector=op.label_selector,
                on_change=on_change,
                what=f"{group}ScaledJobs {_where(ns)}",
            )
            for ns in namespaces
        ]
        authentications = [
            Informer(
                objects,
                api.trigger_authentications(ns, keda=keda),
                on_change=on_change,
                what=f"{group}TriggerAuthentications {_where(ns)}",
            )
            for ns in namespaces
        ]
        return scaledjobs, authentications

    scaledjobs, authentications = informers(keda=False)
    keda_scaledjobs, keda_authentications = informers(keda=True) if op.keda_takeover else ([], [])
    return Watches(
        scaledjobs=scaledjobs,
        authentications=authentications,
        keda_scaledjobs=keda_scaledjobs,
        keda_authentications=keda_authentications,
    )


def _lease_keeper(
    objects: ObjectClient,
    op: OperatorSettings,
    *,
    identity: str,
    namespace: str,
    on_change: Callable[[], None],
    before_release: Callable[[frozenset[int]], Awaitable[None]],
) -> LeaseKeeper:
    """This replica's share of the bucket Leases, as the operator settings say."""
    return LeaseKeeper(
        api_client=objects,
        namespace=namespace,
        group=op.lease_group,
        identity=identity,
        buckets=op.buckets,
        duration=op.lease_duration_seconds,
        renew_every=op.renew_seconds,
        renew_deadline=op.renew_deadline_seconds,
        on_change=on_change,
        before_release=before_release,
    )


def _secret_versions(
    jobs: JobClient, op: OperatorSettings, *, on_change: Callable[[], None]
) -> SecretVersions:
    """The versions of the Secrets the units read, refreshed as the settings say."""
    return SecretVersions(
        jobs.read_secret,
        on_change=on_change,
        refresh_seconds=op.secret_refresh_seconds,
        failing_seconds=min(5.0, op.secret_refresh_seconds),
    )


def _where(ns: str | None) -> str:
    return f"in {ns}" if ns else "in all namespaces"


class Operator:
    """One replica, made of its collaborators (``assemble`` makes them from the settings
    and the two clients; tests may pass their own ``build``)."""

    def __init__(
        self,
        *,
        settings: Settings,
        identity: str,
        telemetry: Telemetry,
        wake: Wakeups,
        watches: Watches,
        leases: LeaseKeeper,
        registry: Registry,
        status: StatusWriter,
        tell: EventTeller,
        units: UnitFactory,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.reach = units.reach
        self._telemetry = telemetry
        self._wake = wake
        self.scaledjobs = watches.scaledjobs
        self.authentications = watches.authentications
        self.keda_scaledjobs = watches.keda_scaledjobs
        self.keda_authentications = watches.keda_authentications
        self.leases = leases
        self.registry = registry
        self.status = status
        self._event = tell
        self.events = tell.recorder
        self.secrets = units.secrets
        self.shared_jobs = units.shared_jobs
        self.renders = units.renders
        """Render workers shared by every unit of this replica (jobrunner.rendering.sandbox)."""
        self._all: dict[Key, Wanted] = {}
        self._objects_by_key: dict[Key, dict[str, Any]] = {}
        self._conflicts: set[Key] = set()
        self._parse_cache: dict[Key, tuple[tuple[Any, ...], Wanted]] = {}
        self._registered: list[Collector] = []
        self._told: dict[tuple[Key, str], tuple[str, str, float]] = {}
        """(key, Event reason) -> (the trouble last told, its message, when)."""

    @classmethod
    def assemble(
        cls,
        *,
        settings: Settings,
        objects: ObjectClient,
        jobs: JobClient,
        telemetry: Telemetry,
        identity: str,
        lease_namespace: str,
        build: UnitBuilder | None = None,
        template_dirs: list[Path] | None = None,
        reach: Reach | None = None,
    ) -> Operator:
        """A replica and its collaborators, made from the settings and the two clients.
        ``reach``: what tenants' ScaledJobs may use of this process (the command line
        passes ``Reach.for_tenants``); default: nothing. ``build``: how a unit is made
        (default: a ``UnitFactory``'s)."""
        op = settings.operator
        wake = Wakeups()
        units = UnitFactory.create(
            settings=settings,
            telemetry=telemetry,
            jobs=jobs,
            secrets=_secret_versions(jobs, op, on_change=wake.poke),
            template_dirs=template_dirs or [Path.cwd() / "job_templates"],
            reach=reach if reach is not None else Reach(),
        )
        tell = EventTeller(EventRecorder(objects, instance=identity))

        async def before_release(buckets: frozenset[int]) -> None:
            await operator.stop_buckets(buckets)  # the operator made below

        operator = cls(
            settings=settings,
            identity=identity,
            telemetry=telemetry,
            wake=wake,
            watches=_watches(objects, op, on_change=wake.poke),
            leases=_lease_keeper(
                objects,
                op,
                identity=identity,
                namespace=lease_namespace,
                on_change=wake.poke,
                before_release=before_release,
            ),
            registry=Registry(
                build=build or units.build,
                start=units.start,
                on_event=tell,
                on_change=wake.unit_changed,
            ),
            status=StatusWriter(objects, volatile_interval=op.status_interval_seconds),
            tell=tell,
            units=units,
        )
        return operator

    # ------------------------------------------------------------------ wiring
    def poke(self) -> None:
        self._wake.poke()

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in (*self.scaledjobs, *self.authentications))

    # ------------------------------------------------------------------ desired state
    def _collect(self) -> dict[Key, Wanted]:
        """Every ScaledJob this replica sees, whichever bucket it is in."""
        auths: dict[str, dict[str, dict[str, Any]]] = {}
        for informer in self.authentications:
            for (ns, name), obj in informer.store.items():
                auths.setdefault(ns, {})[name] = obj
        found: dict[Key, Wanted] = {}
        objects: dict[Key, dict[str, Any]] = {}
        for informer in self.scaledjobs:
            for obj in informer.store.values():
                want = self._parsed(obj, auths.get(_ns(obj), {}), keda=False)
                found[want.key] = want
                objects[want.key] = obj
        conflicts: set[Key] = set()
        keda_auths: dict[str, dict[str, dict[str, Any]]] = {}
        for informer in self.keda_authentications:
            for (ns, name), obj in informer.store.items():
                keda_auths.setdefault(ns, {})[name] = obj
        for informer in self.keda_scaledjobs:
            for obj in informer.store.values():
                if not takeover_requested(obj):
                    continue
                want = self._parsed(obj, keda_auths.get(_ns(obj), {}), keda=True)
                if want.key in found and not found[want.key].keda:
                    conflicts.add(want.key)
                    if want.key not in self._conflicts:
                        self._event(
                            want,
                            "Warning",
                            "NameConflict",
                            "a jobrunner.dev ScaledJob of the same name is served instead",
                        )
                    continue
                if not keda_paused(obj):
                    want = Wanted(
                        key=want.key,
                        generation=want.generation,
                        uid=want.uid,
                        keda=True,
                        invalid=(
                            "takeover asked, but KEDA still scales this ScaledJob: add the "
                            'annotation autoscaling.keda.sh/paused: "true" so that only '
                            "jobrunner runs its Jobs"
                        ),
                    )
                found[want.key] = want
                objects[want.key] = obj
        self._objects_by_key = objects
        self._conflicts = conflicts  # a conflict resolved and come back is told again
        for gone in set(self._parse_cache) - set(found):
            del self._parse_cache[gone]
        return found

    def _parsed(
        self, obj: dict[str, Any], auths: dict[str, dict[str, Any]], *, keda: bool
    ) -> Wanted:
        """``wanted_from``, parsed again only when what the user wrote changed (its
        generation, labels or annotations, or a TriggerAuthentication's version): a
        status write or a resync re-parses nothing."""
        meta = obj.get("metadata") or {}
        fingerprint = (
            keda,
            meta.get("uid"),
            meta.get("generation"),
            repr(sorted((meta.get("labels") or {}).items())),
            repr(sorted((meta.get("annotations") or {}).items())),
            repr(
                sorted(
                    (n, (a.get("metadata") or {}).get("resourceVersion")) for n, a in auths.items()
                )
            ),
        )
        key = (_ns(obj), str(meta.get("name") or ""))
        cached = self._parse_cache.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        want = wanted_from(obj, keda=keda, authentications=auths, reach=self.reach)
        self._parse_cache[key] = (fingerprint, want)
        return want

    def _reconcile(self) -> None:
        if not self.synced():
            return  # an empty or stale store must not stop anything
        self._all = self._collect()
        owned = self.leases.owned
        buckets = self.settings.operator.buckets
        wanted = {
            k: self._with_secrets(w) for k, w in self._all.items() if bucket_of(k, buckets) in owned
        }
        normal = self.settings.dispatcher.shutdown_grace_seconds
        op = self.settings.operator
        # A bucket lost because our renewals lapsed must be let go quickly: the others
        # may take it over at lease_duration.
        urgent = max(0.0, min(normal, (op.lease_duration_seconds - op.renew_deadline_seconds) / 2))

        def grace(key: Key) -> float:
            return normal if key not in self._all else urgent

        self.registry.reconcile(wanted, grace=grace)

    def _with_secrets(self, want: Wanted) -> Wanted:
        """``want`` with the epoch of its Secrets in its essence: a Secret that changed
        replaces the dispatcher (jobrunner.operator.secrets)."""
        epoch = self.secrets.epoch(want.key)
        if not epoch or want.scaledjob is None:
            return want
        return dataclasses.replace(want, essence=f"{want.essence}/secrets-{epoch}")

    def _serving(self) -> dict[Key, bool]:
        """Key -> True while its dispatcher consumes, for every unit of this replica."""
        return {
            key: slot.unit.readiness() is None
            for key, slot in self.registry.slots.items()
            if slot.unit is not None
        }

    async def stop_buckets(self, buckets: frozenset[int]) -> None:
        """Before a bucket is given up: its units stop first (stop before start, across
        replicas)."""
        n = self.settings.operator.buckets
        while True:
            self._wake.units_moved.clear()
            self._reconcile()
            if not any(
                slot.unit is not None and bucket_of(key, n) in buckets
                for key, slot in self.registry.slots.items()
            ):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.units_moved.wait()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.dirty.wait()
            await asyncio.sleep(0.05)  # a listing's burst of changes in one pass
            self._wake.dirty.clear()
            self._reconcile()

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.sync_status()

    async def sync_status(self) -> None:
        for key, slot in list(self.registry.slots.items()):
            want = slot.seen
            obj = self._objects_by_key.get(key)
            if want is None or want.keda or obj is None:
                continue
            current = obj.get("status") or {}
            jobs = None if slot.unit is not None else self.shared_jobs.active(*key)
            status = desired_status(
                want, slot, current=current, owner=self.identity, active_jobs=jobs
            )
            self._tell_trouble(key, want, slot)
            try:
                await self.status.sync(want, status, current, version=_version(obj))
            except (TransientError, ApiRejected) as exc:
                logger.info("could not write the status of %s/%s: %s", *key, exc)
        reported = await self._report_silent_owners()
        # Deleted ScaledJobs and buckets given up: nothing of theirs stays in memory.
        self.status.retain([*self.registry.slots, *reported])
        self.secrets.retain(self.registry.slots)
        for told in [t for t in self._told if t[0] not in self.registry.slots]:
            del self._told[told]

    async def _report_silent_owners(self) -> list[Key]:
        """The ScaledJobs of buckets whose holder stopped renewing its member Lease (a
        SIGKILL, a node lost): by its own rule it stopped serving them at its renew
        deadline, so their status must not go on saying Ready with it as the owner
        until a replica takes the bucket over at the lease duration. Every live replica
        that sees them may write this (the same status: the writer skips it when the
        object already shows it). Returns the keys reported."""
        buckets = self.settings.operator.buckets
        op = self.settings.operator
        reported: list[Key] = []
        for key, want in self._all.items():
            if key in self.registry.slots or want.keda:
                continue
            holder = self.leases.silent_holder(bucket_of(key, buckets))
            obj = self._objects_by_key.get(key)
            if holder is None or obj is None:
                continue
            current = obj.get("status") or {}
            if current.get("owner") != holder:
                continue  # not written by the silent one (or already reported)
            status = unserved_status(
                current,
                reason="OwnerGone",
                message=(
                    f"the replica {holder} serving it has not renewed its Lease for "
                    f"{op.renew_deadline_seconds:.0f}s, so it serves nothing now; another "
                    f"replica takes it over {op.lease_duration_seconds:.0f}s after its "
                    "last renewal"
                ),
            )
            status["owner"] = holder  # who it was: the takeover replaces it
            reported.append(key)
            try:
                await self.status.sync(want, status, current, version=_version(obj))
            except (TransientError, ApiRejected) as exc:
                logger.info("could not write the status of %s/%s: %s", *key, exc)
        return reported

    async def _report_stopped(self, served: list[Wanted]) -> None:
        """On a clean stop, after the units stopped and before the Leases are given up
        (so no successor has written yet): each ScaledJob served here shows Ready and
        Active Unknown, ``NoOperator``, and no owner — true until a replica takes it
        over, and for good after ``helm uninstall``. Bounded: 5 s for all."""

        async def one(want: Wanted) -> None:
            obj = self._objects_by_key.get(want.key) or {}
            current = obj.get("status") or {}
            status = unserved_status(
                current,
                reason=NO_OPERATOR,
                message=f"the replica {self.identity} that served it stopped; another "
                "replica takes it over if one runs",
            )
            try:
                await self.status.sync(want, status, current, version=_version(obj))
            except (TransientError, ApiRejected) as exc:
                logger.info("could not write the status of %s/%s: %s", *want.key, exc)

        if not served:
            return
        try:
            async with asyncio.timeout(5.0):
                await asyncio.gather(*(one(w) for w in served))
        except TimeoutError:
            logger.warning(
                "could not mark every ScaledJob served here as without an operator in 5s; "
                "the next owner writes their status"
            )

    def _tell_trouble(self, key: Key, want: Wanted, slot: Slot) -> None:
        """Warning Events on the ScaledJob (``kubectl describe jsj``) while its
        dispatcher runs but is in trouble, as KEDA's ``KEDAScalerFailed``: ``SourceFailed``
        when it cannot consume (the broker unreachable, credentials refused, the queue
        missing: the source's words, which are jobrunner's), ``JobsRejected`` while the
        API server refuses its Jobs (not on Jobs that do not exist). Each is told once
        when it starts or its words change, then at most once every
        TROUBLE_EVENT_SECONDS (with the count of refusals), as Kubernetes' own event
        aggregation would; a trouble that comes and goes within that time is not told
        again either."""
        unit = slot.unit
        troubles: dict[str, tuple[str, str]] = {}
        """Reason -> (what identifies it, the Event's message)."""
        if unit is not None:
            # Only what the source says is wrong: not a start, nor the Job watch's sync.
            problem = unit.problem or getattr(unit.source, "problem", None)
            if problem and problem != STARTING:
                why = redact(str(problem))
                troubles["SourceFailed"] = (why, f"{why}; messages wait in the source")
            rejection = unit.dispatcher.lifecycle.last_rejection
            if rejected_problem(unit) is not None and rejection is not None:
                summary = rejection_summary(rejection)
                count = unit.dispatcher.lifecycle.rejected_in_row
                troubles["JobsRejected"] = (
                    summary,
                    f"the API server refused {count} Jobs in a row ({summary}); their "
                    "messages were dead-lettered: fix the Job template",
                )
        now = time.monotonic()
        for reason in ("SourceFailed", "JobsRejected"):
            told = self._told.get((key, reason))
            if reason not in troubles:
                # Kept: a trouble that comes and goes is not told at every return.
                continue
            what, message = troubles[reason]
            if told is not None and told[0] == what:
                # Still in it later: told again (refusals only if there were more).
                recent = now - told[2] < TROUBLE_EVENT_SECONDS
                nothing_new = reason == "JobsRejected" and told[1] == message
                quiet = recent or nothing_new
            else:
                quiet = False
            if quiet:
                continue
            self._told[(key, reason)] = (what, message, now)
            self._event(want, "Warning", reason, message)

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for ``/readyz``, which anyone who reaches the port may read: ready
        while the ScaledJob and TriggerAuthentication watches are in sync and the member
        Lease is renewed. ``why`` tells this replica's own state and counts only — the
        watches' and the Lease's problems, buckets held, dispatchers and how many of them
        are not consuming — never a ScaledJob's name, namespace, broker or reason: those
        belong to the ScaledJob's author, who reads them in its status."""
        problems = [
            i.problem
            for i in (*self.scaledjobs, *self.authentications)
            if not i.synced.is_set() and i.problem
        ]
        lease_problem = self.leases.valid()
        if lease_problem is not None:
            problems.append(lease_problem)
        ready = not problems
        units = [s.unit for s in self.registry.slots.values() if s.unit is not None]
        waiting = sum(1 for u in units if u.readiness() is not None)
        failed = sum(
            1 for s in self.registry.slots.values() if s.phase in (Phase.FAILED, Phase.INVALID)
        )
        served = len(units) + failed
        detail = "; ".join(problems) or (
            f"ready: {len(self.leases.owned)} of {self.settings.operator.buckets} buckets, "
            f"{_count(served, 'ScaledJob')}: {len(units)} dispatching"
        )
        counts = [
            f"{waiting} of them not consuming" if waiting else "",
            f"{failed} failed or invalid" if failed else "",
        ]
        if any(counts) and not problems:
            detail += f", {', '.join(c for c in counts if c)} (each says why in its status)"
        return ready, detail

    def register_metrics(self, requests: Callable[[], dict[str, int]]) -> None:
        """The operator's own series on the process's registry (removed when ``run``
        ends); ``requests``: the API requests sent so far, by verb."""
        collector = _OperatorCollector(self, requests)
        self._telemetry.metrics.registry.register(collector)
        self._registered.append(collector)

    # ------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (or an essential task fails, which is raised)."""
        informers = [
            *self.scaledjobs,
            *self.authentications,
            *self.keda_scaledjobs,
            *self.keda_authentications,
        ]
        tasks = [
            start_guarded(i.run(), name=f"informer-{i.what}", essential=i in self.scaledjobs)
            for i in informers
        ]
        tasks += [
            start_guarded(self.leases.run(), name="leases"),
            start_guarded(self._reconcile_loop(), name="reconcile"),
            start_guarded(self._status_loop(), name="status", essential=False),
            start_guarded(
                refresh_loop(self.secrets, self._serving), name="secrets", essential=False
            ),
        ]
        selector = self.settings.operator.label_selector
        logger.info(
            "operator %s serving %s%s (lease group %s in %s, %d buckets)",
            self.identity,
            ", ".join(i.what for i in self.scaledjobs),
            f" labelled {selector}" if selector else "",
            self.settings.operator.lease_group,
            self.leases.namespace,
            self.settings.operator.buckets,
        )
        try:
            essential = [t for t in tasks if is_essential(t)]
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopper, *essential], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            logger.info("stopping: every dispatcher stops, running Jobs continue")
        finally:
            # Stop before release: the units end (messages undecided go back to the
            # broker, running Jobs run on) while the Leases still say they are ours;
            # only then are the Leases given up, and the next owner starts.
            await stop_tasks(
                [t for t in tasks if t.get_name() in ("reconcile", "status", "secrets")], grace=0
            )
            slots = self.registry.slots.values()
            served = [s.seen for s in slots if s.seen is not None and not s.seen.keda]
            await self.registry.close(grace=self.settings.dispatcher.shutdown_grace_seconds)
            await self._report_stopped(served)
            await self.renders.close()
            await self.shared_jobs.close()
            await stop_tasks([t for t in tasks if t.get_name() == "leases"], grace=0)
            await self.leases.release()
            await stop_tasks(tasks, grace=0)
            await self._event.close()
            for collector in self._registered:
                with contextlib.suppress(KeyError):
                    self._telemetry.metrics.registry.unregister(collector)
            logger.info("operator stopped")


@contextlib.asynccontextmanager
async def serve_http(
    operator: Operator, settings: Settings, telemetry: Telemetry
) -> AsyncIterator[None]:
    """/metrics, /healthz (the event loop beats) and /readyz (the watches are in sync
    and the member Lease renewed) while the body runs, when a port is set."""
    heartbeat = Heartbeat()

    async def beat() -> None:
        while True:
            heartbeat.beat()
            await asyncio.sleep(1.0)

    task = start_guarded(beat(), name="heartbeat", essential=False)
    http = None
    if settings.telemetry.http_port is not None:
        http = HttpEndpoints(
            registry=telemetry.metrics.registry, heartbeat=heartbeat, ready=operator.readiness
        )
        http.start(settings.telemetry.http_host, settings.telemetry.http_port)
    try:
        yield
    finally:
        await stop_tasks([task], grace=0)
        if http is not None:
            http.stop()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _version(obj: dict[str, Any]) -> int:
    """An object's resourceVersion as a number (0 when it has none or not a number)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _ns(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("namespace") or "default")


class _OperatorCollector(Collector):
    """The operator's own figures: units by phase, buckets held, live replicas, and the
    requests sent to the API server."""

    def __init__(self, operator: Operator, requests: Callable[[], dict[str, int]]) -> None:
        self._op = operator
        self._requests = requests

    def collect(self) -> Iterable[Any]:
        phases = GaugeMetricFamily(
            "jobrunner_operator_scaledjobs",
            "ScaledJobs this replica serves or reports, by phase.",
            labels=["phase"],
        )
        counts = {p.value: 0 for p in Phase}
        for slot in self._op.registry.slots.values():
            counts[slot.phase.value] += 1
        for phase, count in counts.items():
            phases.add_metric([phase], count)
        yield phases
        yield GaugeMetricFamily(
            "jobrunner_operator_buckets_owned",
            "Buckets (Leases) this replica holds.",
            value=len(self._op.leases.owned),
        )
        yield GaugeMetricFamily(
            "jobrunner_operator_live_replicas",
            "Replicas of the lease group alive, as this one sees them.",
            value=self._op.leases.live_members(),
        )
        requests = CounterMetricFamily(
            "jobrunner_kube_requests",
            "Requests sent to the Kubernetes API server, by verb (WATCH: a watch opened).",
            labels=["verb"],
        )
        for verb, count in sorted(self._requests().items()):
            requests.add_metric([verb], count)
        yield requests
