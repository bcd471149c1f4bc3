"""File mode (``jobrunner run -f FILE``): the ScaledJobs of one manifest file, served the
way the operator serves its custom resources, through the same registry
(jobrunner.operator.registry) and the same reading of an object (the pause annotations
and the *essence*, jobrunner.operator.resources):

* ``autoscaling.keda.sh/paused`` or ``jobrunner.dev/paused`` (KEDA's rule: a Go bool,
  anything else counts as paused) pauses a ScaledJob: nothing is consumed; running Jobs
  continue;
* the file is read again on SIGHUP (the caller sets ``reload``) and when it changes (its
  size, modification time or content, polled every ``watch_seconds``; the Job template
  files it names are watched too). A change of the trigger, the template, the delivery
  or a TriggerAuthentication or Secret of the file replaces that ScaledJob's dispatcher
  (stop consuming, settle what is decided within the grace, release the rest); a change
  of limits only (``maxReplicaCount``, history limits) is applied live; a ScaledJob
  removed from the file is stopped. Running Jobs are never touched, and every change is
  logged;
* an edit that cannot be served (YAML, a field, a template the schema refuses, a Secret
  that is not there) is refused as a whole, logged with the file, line and field, and
  what was loaded before keeps running.

At start, the first reading must work: a mistake in it is raised (the command line's
exit 2), and so is the failure of a dispatcher's essential task at any time (exit 1),
as before reloads existed.

Layer: above the operator (it uses its registry), below the command line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.core.settings import Settings
from jobrunner.core.tasks import is_essential, start_guarded, stop_tasks
from jobrunner.manifest.loader import ManifestSet
from jobrunner.manifest.scaledjob import ManifestError, ScaledJob
from jobrunner.manifest.triggers import FileSecrets, Reach, ResolveContext, resolve_trigger
from jobrunner.observability.httpserver import Heartbeat, HttpEndpoints
from jobrunner.observability.telemetry import Telemetry
from jobrunner.operator.registry import Phase, Registry
from jobrunner.operator.resources import Key, Wanted, essence, paused_by
from jobrunner.rendering.renderer import Renderer, render_pool, template_dirs
from jobrunner.runner import DispatchUnit, job_client, shutdown_summary

logger = logging.getLogger(__name__)

__all__ = ["WATCH_SECONDS", "FileMode", "run", "wanted_of"]

WATCH_SECONDS = 2.0
"""How often the manifest file (and its template files) are looked at for a change: a
stat each, and a read only when the size or modification time moved."""

Stamp = tuple[int, int]
"""(size, modification time in ns) of a watched file; (-1, -1) when it is not there."""


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def template_file(scaledjob: ScaledJob, base_dirs: list[Path]) -> Path | None:
    """The template file a ScaledJob of a file names (``spec.jobTemplate``), found as
    jobrunner.rendering.renderer finds it; None for ``jobTargetRef`` or a file not found (then
    building the dispatcher says so)."""
    name = scaledjob.spec.jobTemplate
    if name is None:
        return None
    wanted = Path(name).expanduser()
    for candidate in [wanted] if wanted.is_absolute() else [d / wanted for d in base_dirs]:
        if candidate.is_file():
            return candidate
    return None


def _file_digest(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def wanted_of(
    manifests: ManifestSet,
    *,
    base_dirs: list[Path],
    before: Mapping[Key, Wanted] | None = None,
) -> dict[Key, Wanted]:
    """What a manifest file asks for, in the operator's terms: one ``Wanted`` per
    ScaledJob, paused by the operator's rule, with an essence that also covers what a
    file holds beside the ScaledJob (its TriggerAuthentications' content and the Secrets
    of the file they name, the content of its template file). ``before``: the last
    reading; a ScaledJob whose spec or metadata changed gets the next ``generation``
    (what the registry takes for "apply the new limits")."""
    wanted: dict[Key, Wanted] = {}
    for scaledjob in manifests.scaledjobs:
        key = (scaledjob.namespace, scaledjob.name)
        versions: dict[str, str] = {}
        refs = [t.authenticationRef for t in scaledjob.spec.triggers]
        if scaledjob.spec.function is not None:
            refs += [o.authenticationRef for o in scaledjob.spec.function.outputs]
        for ref in refs:
            if ref is None:
                continue
            auth = manifests.authentications.get(ref.key)
            if auth is None:
                versions[ref.key] = "missing"
                continue
            named = {item.name for item in auth.spec.secretTargetRef}
            secrets = {f"{ns}/{n}": s for (ns, n), s in manifests.secrets.items() if n in named}
            versions[ref.key] = _digest([auth.model_dump(mode="json"), secrets])
        versions[" template file"] = _file_digest(template_file(scaledjob, base_dirs))
        digest = essence(scaledjob, versions)
        old = (before or {}).get(key)
        generation = 1
        if old is not None and old.scaledjob is not None:
            generation = old.generation
            if old.essence != digest or _written(old.scaledjob) != _written(scaledjob):
                generation += 1
        wanted[key] = Wanted(
            key=key,
            generation=generation,
            # The registry replaces a unit whose uid changed (an object deleted and made
            # again): a ScaledJob of a file is the same one for as long as it is there.
            uid=str(manifests.path),
            scaledjob=scaledjob,
            paused=paused_by(scaledjob.metadata.annotations),
            essence=digest,
            authentications=manifests.authentications,
        )
    return wanted


def _written(scaledjob: ScaledJob) -> str:
    """What the author wrote of a ScaledJob (not where: line numbers move with edits
    elsewhere in the file)."""
    return _digest(
        [scaledjob.metadata.model_dump(mode="json"), scaledjob.spec.model_dump(mode="json")]
    )


def _stamp(path: Path) -> Stamp:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


@dataclass
class _Watched:
    """The files one reading came from, as they were then."""

    content: str
    """The manifest file's content digest."""
    stamps: dict[Path, Stamp]


class FileMode:
    """The ScaledJobs of one file, kept as the file says (see the module docstring)."""

    def __init__(
        self,
        manifests: ManifestSet,
        *,
        load: Callable[[], ManifestSet],
        settings: Settings,
        telemetry: Telemetry,
        reach: Reach,
        jobs: Any,
        renders: Any,
    ) -> None:
        self.manifests = manifests
        self._load = load
        self._settings = settings
        self._telemetry = telemetry
        self._reach = reach
        self._jobs = jobs
        self._renders = renders
        self._base_dirs = template_dirs(manifests.path)
        self.wanted: dict[Key, Wanted] = {}
        self._watched = self._watch_state(manifests)
        self._build_errors: dict[Key, BaseException] = {}
        self._changed = asyncio.Event()
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done when a dispatcher's essential task ended: its exception, if any."""
        self.reloads = 0
        """Readings applied after the first (tests wait on it)."""
        self.refusals = 0
        """Edits refused (tests wait on it)."""
        self._serving = False
        """True once the first reading is served (``start`` returned)."""
        self._paused_marks: dict[Key, Any] = {}
        """The PausedMark held for each paused ScaledJob of an embedded queue."""
        self.registry = Registry(
            build=self._build,
            start=self._start,
            on_event=self._event,
            on_change=lambda _key: self._changed.set(),
            # A running dispatcher's failure ends `run` (exit 1; see ``_start``), and so
            # does one that cannot be built at start (see ``start``).
            gives_up=lambda what: what == "unit" or not self._serving,
        )

    # ------------------------------------------------------------------ registry hooks
    async def _build(self, wanted: Wanted) -> DispatchUnit:
        assert wanted.scaledjob is not None
        try:
            unit = await DispatchUnit.build(
                wanted.scaledjob,
                manifests=self.manifests,
                jobs=self._jobs,
                settings=self._settings,
                telemetry=self._telemetry,
                reach=self._reach,
                renders=self._renders,
            )
        except Exception as exc:
            self._build_errors[wanted.key] = exc
            raise
        self._build_errors.pop(wanted.key, None)
        return unit

    def _start(self, unit: DispatchUnit) -> None:
        unit.start(settings=self._settings, telemetry=self._telemetry)
        key = (unit.scaledjob.namespace, unit.name)

        def ended(task: asyncio.Task[Any]) -> None:
            slot = self.registry.slots.get(key)
            # A unit being stopped (paused, replaced, removed) ends its tasks on purpose.
            if task.cancelled() or slot is None or slot.unit is not unit or self.fatal.done():
                return
            exc = task.exception()
            if exc is None:
                self.fatal.set_result(None)
            else:
                self.fatal.set_exception(exc)

        for task in unit.tasks:
            if is_essential(task):
                task.add_done_callback(ended)

    def _event(self, wanted: Wanted, kind: str, reason: str, message: str) -> None:
        log = logger.warning if kind == "Warning" else logger.info
        log(
            "%s: %s/%s: %s: %s",
            self.manifests.path,
            *wanted.key,
            reason,
            message,
            extra={"scaledjob": wanted.key[1]},
        )

    # ------------------------------------------------------------------ readings
    def _watch_state(self, manifests: ManifestSet) -> _Watched:
        paths = [manifests.path]
        for scaledjob in manifests.scaledjobs:
            found = template_file(scaledjob, self._base_dirs)
            if found is not None:
                paths.append(found)
        return _Watched(content=_file_digest(manifests.path), stamps={p: _stamp(p) for p in paths})

    def file_changed(self) -> bool:
        """True when a watched file's size or modification time moved and the manifest's
        content (or a template file's stamp) differs from the last reading. A touch
        that changes nothing is taken in silently."""
        now = {p: _stamp(p) for p in self._watched.stamps}
        if now == self._watched.stamps:
            return False
        templates_moved = any(
            now[p] != s for p, s in self._watched.stamps.items() if p != self.manifests.path
        )
        if not templates_moved and _file_digest(self.manifests.path) == self._watched.content:
            self._watched.stamps = now
            return False
        return True

    async def start(self) -> None:
        """Serve the first reading; raise what keeps a ScaledJob of it from starting
        (ManifestError for a mistake in the file), as ``jobrunner run`` did before."""
        self.wanted = wanted_of(self.manifests, base_dirs=self._base_dirs)
        self.registry.reconcile(self.wanted, grace=self._grace)
        self.mark_paused()
        while True:
            for key, slot in self.registry.slots.items():
                error = self._build_errors.get(key)
                if error is not None and slot.phase is Phase.FAILED:
                    raise error
            if all(s.phase in (Phase.RUNNING, Phase.PAUSED) for s in self.registry.slots.values()):
                self._serving = True
                return
            self._changed.clear()
            await self._changed.wait()

    async def reload(self, why: str) -> bool:
        """Read the file again and serve what it says now; False (logged, nothing
        changed) when the new reading is refused."""
        path = self.manifests.path
        try:
            manifests = await asyncio.to_thread(self._load)
            wanted = wanted_of(manifests, base_dirs=self._base_dirs, before=self.wanted)
            await self._check(manifests, wanted)
        except (ManifestError, OSError) as exc:
            self.refusals += 1
            # Not refused again at every look: the next change is looked at.
            self._watched = self._watch_state(self.manifests)
            text = str(exc).replace("\n", "; ")
            logger.error(
                "%s (%s): the edit is refused, what was loaded before keeps running: %s",
                path,
                why,
                text,
            )
            return False
        added = sorted(k[1] for k in wanted.keys() - self.wanted.keys())
        removed = sorted(k[1] for k in self.wanted.keys() - wanted.keys())
        changed = sorted(
            k[1]
            for k in wanted.keys() & self.wanted.keys()
            if wanted[k].generation != self.wanted[k].generation
        )
        self.manifests = manifests
        self._watched = self._watch_state(manifests)
        self.reloads += 1
        if added or removed or changed:
            parts = [
                f"{what}: {', '.join(names)}"
                for what, names in (("added", added), ("removed", removed), ("changed", changed))
                if names
            ]
            logger.info(
                "%s (%s): reloaded; %s; running Jobs are not touched", path, why, "; ".join(parts)
            )
        else:
            logger.info("%s (%s): reloaded; no ScaledJob changed", path, why)
        self.wanted = wanted
        self.registry.reconcile(wanted, grace=self._grace)
        self.mark_paused()
        return True

    def mark_paused(self) -> None:
        """Hold the paused mark of each paused ScaledJob's embedded queue, and release
        those no longer paused (or gone): a paused dispatcher consumes nothing, so holds
        no consumer lock, and ``status`` and ``publish`` would take the queue for one no
        dispatcher serves (naming the last pid that consumed it) and tell the user to
        start a second dispatcher. ``release_all`` at stop."""
        from jobrunner.manifest.triggers.sqlite import sqlite_location
        from jobrunner.sources.sqlite import PausedMark

        for key, want in self.wanted.items():
            trigger = want.scaledjob.spec.triggers[0] if want.scaledjob is not None else None
            held = self._paused_marks.get(key)
            if want.paused is None or trigger is None or trigger.type != "sqlite":
                if held is not None:
                    held.release()
                    del self._paused_marks[key]
                continue
            if held is None:
                where = sqlite_location(trigger.metadata, self._settings.local.state_dir)
                mark = PausedMark.hold(where.path, where.queue, annotation=want.paused)
                if mark is not None:
                    self._paused_marks[key] = mark
        for key in self._paused_marks.keys() - self.wanted.keys():
            self._paused_marks.pop(key).release()

    def release_all(self) -> None:
        for mark in self._paused_marks.values():
            mark.release()
        self._paused_marks.clear()

    async def _check(self, manifests: ManifestSet, wanted: Mapping[Key, Wanted]) -> None:
        """What building a dispatcher would refuse in the new reading, found before the
        running one is stopped for it: its template (against the batch/v1 schema) and its
        trigger, resolved with its TriggerAuthentication and Secrets. ManifestError."""
        secrets = FileSecrets(getattr(self._jobs, "read_secret", None), manifests.secrets)
        for key, want in wanted.items():
            old = self.wanted.get(key)
            scaledjob = want.scaledjob
            if scaledjob is None or want.paused is not None:
                continue
            if old is not None and old.essence == want.essence and old.runnable:
                continue
            await asyncio.to_thread(Renderer, scaledjob, base_dirs=self._base_dirs)
            context = ResolveContext(
                scaledjob=scaledjob,
                trigger=scaledjob.spec.triggers[0],
                authentications=manifests.authentications,
                read_secret=secrets,
                state_dir=self._settings.local.state_dir,
                reach=self._reach,
            )
            await resolve_trigger(context)

    def _grace(self, _key: Key) -> float:
        return self._settings.dispatcher.shutdown_grace_seconds

    # ------------------------------------------------------------------ state
    @property
    def units(self) -> list[DispatchUnit]:
        return [s.unit for s in self.registry.slots.values() if s.unit is not None]

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for ``/readyz``: ready when every ScaledJob that is not paused
        consumes and watches its Jobs; else each one's name and reason. The names and
        reasons are shown because a manifest file has one author, who runs the process:
        they are theirs to read (the operator, serving many, shows counts only)."""
        problems: list[str] = []
        for (_, name), slot in sorted(self.registry.slots.items()):
            if slot.unit is not None:
                problem = slot.unit.readiness()
                if problem is not None:
                    problems.append(problem)
            elif slot.phase is not Phase.PAUSED:
                problems.append(f"{name}: {slot.problem or slot.phase.value.lower()}")
        if not self.registry.slots:
            problems.append("starting")
        return (not problems, "; ".join(problems) or "ready")


async def _beat(heartbeat: Heartbeat) -> None:
    while True:
        heartbeat.beat()
        await asyncio.sleep(1.0)


async def run(
    manifests: ManifestSet,
    settings: Settings,
    *,
    reach: Reach,
    stop: asyncio.Event | None = None,
    reload: asyncio.Event | None = None,
    load: Callable[[], ManifestSet] | None = None,
    watch_seconds: float | None = WATCH_SECONDS,
    telemetry: Telemetry | None = None,
    on_started: Callable[[FileMode], None] | None = None,
) -> None:
    """Serve every ScaledJob of ``manifests`` until ``stop`` is set (or an essential task
    fails, which is raised). ``reload``: set to read the file again (the command line sets
    it on SIGHUP; cleared here); ``load``: how the file is read again (default:
    ``load_manifest`` of its path; the command line's applies ``-n`` too);
    ``watch_seconds``: how often the file is looked at for a change (None: only on
    ``reload``). ``reach``: what the triggers may use of this process (the command line
    passes ``Reach.own(os.environ)``: the manifest's author runs it)."""
    from jobrunner.manifest.loader import load_manifest

    stop = stop or asyncio.Event()
    reload = reload or asyncio.Event()
    path = manifests.path
    jobs = job_client(settings)
    telemetry = telemetry or Telemetry.create()
    heartbeat = Heartbeat()
    renders = render_pool(settings.dispatcher)
    mode = FileMode(
        manifests,
        load=load or (lambda: load_manifest(path)),
        settings=settings,
        telemetry=telemetry,
        reach=reach,
        jobs=jobs,
        renders=renders,
    )
    background = [start_guarded(_beat(heartbeat), name="heartbeat")]
    http = _http_endpoints(settings, telemetry, heartbeat=heartbeat, mode=mode)
    try:
        await mode.start()
        if on_started is not None:
            on_started(mode)
        await _serve_until_stopped(
            mode, path=path, stop=stop, reload=reload, watch_seconds=watch_seconds
        )
        logger.info("stopping: no new messages; settling what can be settled")
    finally:
        # Taken before the close, which empties the slots; each unit's ``left`` is filled
        # by its stop, for the last line.
        stopping = mode.units
        mode.release_all()
        await mode.registry.close(grace=settings.dispatcher.shutdown_grace_seconds)
        await stop_tasks(background, grace=0)
        await renders.close()
        if http is not None:
            http.stop()
        await jobs.close()
        logger.info("stopped: %s", shutdown_summary(stopping, settings.executor))


def _http_endpoints(
    settings: Settings, telemetry: Telemetry, *, heartbeat: Heartbeat, mode: FileMode
) -> HttpEndpoints | None:
    """The health, readiness and metrics endpoints, started when a port is set."""
    if settings.telemetry.http_port is None:
        return None
    http = HttpEndpoints(
        registry=telemetry.metrics.registry, heartbeat=heartbeat, ready=mode.readiness
    )
    http.start(settings.telemetry.http_host, settings.telemetry.http_port)
    return http


async def _serve_until_stopped(
    mode: FileMode,
    *,
    path: Path,
    stop: asyncio.Event,
    reload: asyncio.Event,
    watch_seconds: float | None,
) -> None:
    """Read the file again on ``reload`` or (every ``watch_seconds``) when it changed,
    until ``stop`` is set or an essential task of ``mode`` fails (raised). ``path``: the
    file's, for the log."""
    logger.info(
        "%s: watched for changes%s; SIGHUP (kill -HUP %d) reads it again",
        path,
        f" every {watch_seconds:g}s" if watch_seconds else " on SIGHUP only",
        os.getpid(),
    )
    while not stop.is_set():
        stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        hup: asyncio.Future[Any] = asyncio.ensure_future(reload.wait())
        fatal: asyncio.Future[Any] = mode.fatal
        try:
            await asyncio.wait(
                [stopper, hup, fatal],
                timeout=watch_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
            hup.cancel()
        if mode.fatal.done():
            mode.fatal.result()  # raises the task's exception
            break
        if stop.is_set():
            break
        if reload.is_set():
            reload.clear()
            await mode.reload("SIGHUP")
        elif watch_seconds and mode.file_changed():
            await mode.reload("the file changed")
