"""A JobClient that runs Jobs on this machine instead of a cluster: the local executor.

It implements the same protocol as the Kubernetes client, so the dispatcher, tracker and
cleanup run unchanged and keep every guarantee (one Job per message: a second create of
the same name adopts; outcomes from ``Complete``/``Failed`` conditions; history limits and
TTL delete Jobs with their logs). Each Job is a directory (see ``jobdir``) run by its own
supervisor process (see ``supervisor``), so Jobs outlive the dispatcher as they do on a
cluster. Listing scans the directories; watching polls them for changes, which for the
few hundred Jobs a laptop keeps costs a few stat calls per tenth of a second.

A Job's message Secret follows the cluster's rules (see ``jobrunner.rendering.messagesecret``): it
is written after the Job, owned by it, and one found in place is used only when it holds
this very body. The state directory is private to the user running jobrunner (0700, its
files 0600: they hold bodies and Secrets); one left more open by an older version is
tightened when a dispatcher starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.core import apipath, privatefs
from jobrunner.core.failpoints import Failpoints
from jobrunner.core.marks import POD_WRITABLE
from jobrunner.core.models import FINALIZER, JobResult
from jobrunner.core.protocols import ApiRejected, JobPage, WatchEvent, WatchExpired
from jobrunner.core.timestamps import age_seconds, now_rfc3339
from jobrunner.local import compat
from jobrunner.local.jobdir import JobDir
from jobrunner.local.supervisor import RETRY_ENV
from jobrunner.manifest import jobschema
from jobrunner.rendering import messagesecret
from jobrunner.tracking.results import Ended, result_of
from jobrunner.tracking.tracker import JobState, outcome_of

logger = logging.getLogger(__name__)
_SECRET_SUFFIX = "-message"
_BY = f"{compat.EXECUTOR} (as the API server would)"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def orphan_note(jobdir: JobDir) -> str:
    """Why an unfinished Job has no supervisor, for the line logged as one is started:
    a supervisor writes its pid into the Job's lock file first thing, so a Job without
    that file never had one (a dispatcher stopped between writing the Job and starting
    its supervisor), and one with it lost its supervisor (killed, or the machine
    restarted), as a cluster's Job controller replaces a pod that is gone."""
    if jobdir.supervisor_pid() is None:
        return (
            f"Job {jobdir.name} was created but its supervisor never started (a dispatcher "
            "stopped in between); starting it"
        )
    return (
        f"Job {jobdir.name} lost its supervisor (the process ended before the Job did: "
        "killed, or this machine restarted); starting another, as the Job controller "
        "replaces a lost pod"
    )


def parse_selector(selector: str) -> dict[str, str]:
    """Equality selectors (``a=b,c=d``), the only kind jobrunner uses."""
    out = {}
    for part in filter(None, (p.strip() for p in selector.split(","))):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out


def _matches(job: Mapping[str, Any], wanted: Mapping[str, str]) -> bool:
    labels = (job.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


@dataclass
class _Seen:
    stamp: tuple[tuple[int, int, int], bytes]
    object: dict[str, Any]


class LocalJobClient:
    def __init__(
        self,
        state_dir: Path,
        *,
        poll_interval: float = 0.1,
        retry_seconds: float = 1.0,
        controller: bool = True,
        failpoints: Failpoints | None = None,
    ) -> None:
        """``controller``: act as the cluster's controllers would (start supervisors,
        apply TTLs; and make an existing state directory private, see ``secure``);
        False for a read-only view such as ``jobrunner status``."""
        self.state_dir = state_dir
        self.root = state_dir / "jobs"
        self._failpoints = failpoints or Failpoints()
        self._poll = poll_interval
        self._retry_seconds = retry_seconds
        self._controller = controller
        self._children: dict[Path, subprocess.Popen[bytes]] = {}
        self._snapshots: dict[str, dict[str, _Seen]] = {}
        self._version = 0
        self._changed = asyncio.Event()
        self._images_noted: set[str] = set()
        self._confinement_noted = False
        self._restarts: dict[Path, tuple[int, float]] = {}
        self._creating: set[Path] = set()
        """Jobs being created here: their supervisor is about to start, and a scan that
        sees one meanwhile must not take it for a Job whose supervisor died."""
        self._lock = threading.Lock()
        """Guards ``_children`` and ``_creating``: scans and creates run on worker
        threads."""
        if controller:
            self.secure()

    def secure(self) -> int:
        """Make the state directory private: take the group's and others' bits off it and
        off everything jobrunner keeps in it (an older version made them 0644 in 0755
        directories). The Jobs' ``work/`` directories, which hold what their processes
        wrote, are made 0700 but not entered. Returns how many modes changed (logged)."""
        changed = privatefs.tighten(
            self.state_dir,
            skip=lambda path: path.name == "work" and path.parent.parent.parent == self.root,
        )
        if changed:
            logger.warning(
                "made %d file(s) and directories of the state directory %s private (0600 "
                "files, 0700 directories): they hold message bodies and Secrets, and were "
                "readable by other users of this machine",
                changed,
                self.state_dir,
            )
        return changed

    # ------------------------------------------------------------------ objects
    def jobdir(self, namespace: str, name: str) -> JobDir:
        """Where the Job ``namespace/name`` is kept (its logs are under ``logs/``).
        InvalidName for a namespace or name that is not one (``..`` would leave the state
        directory: a Job's directory is deleted whole)."""
        return JobDir(
            self.root / apipath.namespace(namespace) / apipath.name(name, field="Job name")
        )

    def _object(self, jobdir: JobDir) -> dict[str, Any] | None:
        job = jobdir.job()
        if job is None:
            return None
        status = jobdir.status()
        job["status"] = {k: v for k, v in status.items() if k != "pgids"}
        # A Job's processes may record its function's result, nothing else: as the
        # admission policy allows a pod in a cluster (jobrunner.core.marks.POD_WRITABLE).
        added = {k: v for k, v in jobdir.job_annotations().items() if k in POD_WRITABLE}
        if added:
            annotations = job["metadata"].setdefault("annotations", {})
            job["metadata"]["annotations"] = {**added, **annotations}
        job["metadata"]["resourceVersion"] = str(self._version)
        return job

    def _jobdirs(self, namespace: str) -> list[JobDir]:
        base = self.root / apipath.namespace(namespace)
        if not base.is_dir():
            return []
        return [JobDir(p) for p in sorted(base.iterdir()) if p.is_dir()]

    # ------------------------------------------------------------------ JobClient
    async def create_job(
        self, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> tuple[Mapping[str, Any], bool]:
        meta = job.get("metadata") or {}
        for field in ("namespace", "name"):
            # As the API server would; here it also keeps paths inside the state directory.
            if not _DNS_LABEL.fullmatch(str(meta.get(field, ""))):
                raise ApiRejected(
                    422,
                    "Invalid",
                    f"metadata.{field}: {meta.get(field)!r} is not a DNS label",
                    by=_BY,
                )
        # What the API server would refuse, refused the same way (a 422 naming the
        # field), so a bad Job never reaches a supervisor.
        problems = jobschema.check_object(job)
        if problems:
            detail = "; ".join(f"{p.field()}: {p.text}" for p in problems[:5])
            raise ApiRejected(
                422, "Invalid", f'Job.batch "{meta.get("name")}" is invalid: {detail}', by=_BY
            )
        problem = compat.unrunnable(job)
        if problem is not None:
            raise ApiRejected(422, "Invalid", problem, by=compat.EXECUTOR)
        result, created = await asyncio.to_thread(self._create, job, secret)
        self._changed.set()
        return result, created

    def _create(
        self, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> tuple[dict[str, Any], bool]:
        """The Job first, then its Secret owned by it, under the Job's record lock (a
        dispatcher in another process creating the same Job waits, then adopts it)."""
        meta = job["metadata"]
        jobdir = self.jobdir(meta["namespace"], meta["name"])
        privatefs.private_dir(jobdir.path)
        refused: messagesecret.Check | None = None
        with self._lock:
            self._creating.add(jobdir.path)
        try:
            with jobdir.record_lock():
                existing = self._object(jobdir)
                if existing is not None:
                    refused = self._complete(jobdir, existing, job, secret)
                else:
                    self._write_new(jobdir, job, secret)
            if refused is not None:
                # The Job may have run with a body that is not its message's: it goes.
                logger.warning("removing Job %s: %s", jobdir.name, refused.why)
                self._delete(jobdir)
                raise messagesecret.conflict(refused)
            if existing is None or (outcome_of(existing) is None and not jobdir.supervised()):
                self._supervise(jobdir)  # adopted: one may be missing after a crash
        finally:
            with self._lock:
                self._creating.discard(jobdir.path)
        result = self._object(jobdir)
        assert result is not None
        return result, existing is None

    def _write_new(
        self, jobdir: JobDir, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> None:
        # No job.json: nothing ran here (no supervisor runs without it). What a create
        # that stopped before writing the Job left (an older jobrunner wrote the Secret
        # first) was never used, and goes.
        jobdir.remove_secret()
        self._note_images(job)
        stored = json.loads(json.dumps(job))
        stored["metadata"].update(
            {"uid": str(uuid.uuid4()), "creationTimestamp": now_rfc3339(millis=True)}
        )
        jobdir.write_job(stored)
        if secret is None:
            return
        self._failpoints.hit("between-job-and-secret")
        try:
            jobdir.write_secret(messagesecret.owned_by(secret, stored))
        except BaseException:
            # A Job whose Secret cannot be written would wait for it for ever.
            shutil.rmtree(jobdir.path, ignore_errors=True)
            raise

    @staticmethod
    def _complete(
        jobdir: JobDir,
        existing: Mapping[str, Any],
        job: Mapping[str, Any],
        secret: Mapping[str, Any] | None,
    ) -> messagesecret.Check | None:
        """An existing Job adopted: write its Secret when an earlier create stopped between
        the two, check the one it has otherwise; the check when it is refused (the caller
        removes the Job). A Job made for another body (refused by the dispatcher as
        ``MessageIdReused``) or being deleted is left as it is."""
        meta = existing.get("metadata") or {}
        digest = messagesecret.job_digest(job)
        if secret is None or messagesecret.job_digest(existing) != digest:
            return None
        if meta.get("deletionTimestamp"):
            return None
        check = messagesecret.check_existing(
            jobdir.secret(), job_name=meta["name"], job_uid=meta.get("uid"), digest=digest
        )
        if check.verdict is messagesecret.Verdict.REFUSE:
            return check
        if check.verdict is not messagesecret.Verdict.USE:
            # Missing (a crash between the two writes: the supervisor waits for it), or
            # left by an earlier Job of this directory with this very body.
            jobdir.write_secret(messagesecret.owned_by(secret, existing))
        return None

    def _note_images(self, job: Mapping[str, Any]) -> None:
        pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        for container in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
            image = container.get("image")
            if image and image not in self._images_noted:
                self._images_noted.add(image)
                logger.warning(
                    "local executor: image %s is ignored; container %s runs its command on "
                    "this machine",
                    image,
                    container.get("name"),
                )
        containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
        confining = sorted(
            {k for c in containers for k in ("securityContext", "resources") if c.get(k)}
            | ({"securityContext"} if pod.get("securityContext") else set())
        )
        if confining and not self._confinement_noted:
            self._confinement_noted = True  # once per dispatcher, as for an image
            logger.warning(
                "local executor: %s not applied: a Job's processes run as the user running "
                "jobrunner, with no limits; run it on a cluster to have them",
                " and ".join(confining),
            )

    def _supervise(self, jobdir: JobDir) -> None:
        if not self._controller:
            return
        with self._lock:
            child = self._children.get(jobdir.path)
            if child is not None and child.poll() is None:
                return
            env = {**os.environ, RETRY_ENV: str(self._retry_seconds)}
            with privatefs.append_private(jobdir.path / "supervisor.log") as log:
                self._children[jobdir.path] = subprocess.Popen(
                    [sys.executable, "-m", "jobrunner.local.supervisor", str(jobdir.path)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    start_new_session=True,  # outlives the dispatcher, as a Job does
                )

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return await asyncio.to_thread(self._object, self.jobdir(namespace, name))

    async def job_result(self, namespace: str, name: str) -> JobResult | None:
        """The finished Job's result (``ReadsResults``), as the Kubernetes client reads
        it: the last attempt's exit codes and termination messages, which the supervisor
        records as the kubelet does (the file at ``terminationMessagePath``, at most
        4096 bytes)."""
        job = await self.get_job(namespace, name)
        if job is None:
            return None
        attempts = (job.get("status") or {}).get("attempts") or []
        last = attempts[-1] if attempts else {}
        messages = last.get("terminationMessages") or {}
        ended = [
            Ended(container=c, exit_code=code if code >= 0 else None, message=messages.get(c, ""))
            for c, code in (last.get("exitCodes") or {}).items()
            if c in _app_containers(job)
        ]
        return result_of(job, ended)

    def _modify(
        self, jobdir: JobDir, change: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any] | None:
        """Read-modify-write of the Job record under a lock, as an API server serialises
        writes to one object (dispatchers in other processes may write it too). Returns
        the Job after the change; None when it does not exist."""
        if not jobdir.path.is_dir():
            return None
        with jobdir.record_lock():
            job = jobdir.job()
            if job is None:
                return None
            change(job)
            jobdir.write_job(job)
        return self._object(jobdir)

    async def annotate_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any]:
        def change(job: dict[str, Any]) -> None:
            job["metadata"].setdefault("annotations", {}).update(annotations)

        result = await asyncio.to_thread(self._modify, self.jobdir(namespace, name), change)
        if result is None:
            raise ApiRejected(404, "NotFound", f'jobs.batch "{name}" not found', by=_BY)
        self._changed.set()
        return result

    async def release_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any] | None:
        def release() -> dict[str, Any] | None:
            jobdir = self.jobdir(namespace, name)

            def change(job: dict[str, Any]) -> None:
                meta = job["metadata"]
                meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
                meta.setdefault("annotations", {}).update(annotations)

            result = self._modify(jobdir, change)
            if result is not None and self._deletable(result):
                self._delete(jobdir)
            return result

        result = await asyncio.to_thread(release)
        self._changed.set()
        return result

    @staticmethod
    def _deletable(job: Mapping[str, Any]) -> bool:
        meta = job.get("metadata") or {}
        return bool(meta.get("deletionTimestamp")) and not meta.get("finalizers")

    async def delete_job(self, namespace: str, name: str) -> None:
        await asyncio.to_thread(self._request_delete, self.jobdir(namespace, name))
        self._changed.set()

    def _request_delete(self, jobdir: JobDir) -> None:
        """As the API server deletes: a Job with finalizers is only marked
        (``deletionTimestamp``) and stays until they are removed; one without goes now."""

        def mark(job: dict[str, Any]) -> None:
            job["metadata"].setdefault("deletionTimestamp", now_rfc3339())

        job = self._modify(jobdir, mark)
        if job is None or not (job.get("metadata") or {}).get("finalizers"):
            self._delete(jobdir)

    def _delete(self, jobdir: JobDir) -> None:
        if not jobdir.path.exists():
            return
        pid = jobdir.supervisor_pid()
        if pid is not None and jobdir.supervised():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not jobdir.supervised():
                    break
                time.sleep(0.02)
        for pgid in jobdir.status().get("pgids") or []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with self._lock:
            child = self._children.pop(jobdir.path, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        shutil.rmtree(jobdir.path, ignore_errors=True)

    async def read_secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        if not name.endswith(_SECRET_SUFFIX):
            return None  # only the Jobs' own message Secrets exist locally
        secret = self.jobdir(namespace, name[: -len(_SECRET_SUFFIX)]).secret()
        if secret is None:
            return None
        data: Mapping[str, str] = secret.get("data") or {}
        return data

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
        jobdir = self.jobdir(namespace, job_name)
        if not jobdir.path.is_dir():
            return
        line = json.dumps(
            {"time": now_rfc3339(millis=True), "type": type, "reason": reason, "message": message}
        )
        with privatefs.append_private(jobdir.path / "events.jsonl") as events:
            events.write(line.encode() + b"\n")

    async def list_jobs(
        self, namespace: str, selector: str, *, limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        """All matching Jobs in one page."""
        seen = await asyncio.to_thread(self._scan, namespace, parse_selector(selector), {})
        self._version += 1
        version = str(self._version)
        self._snapshots[version] = seen
        while len(self._snapshots) > 16:  # a listing nobody watched from
            del self._snapshots[next(iter(self._snapshots))]
        return JobPage(
            items=[s.object for s in seen.values()], resource_version=version, continue_token=None
        )

    def _reap(self) -> None:
        """Collect the exit status of supervisors that ended, so none lingers as a zombie."""
        with self._lock:
            for path, child in list(self._children.items()):
                if child.poll() is not None:
                    del self._children[path]

    def _housekeep(self, jobdir: JobDir, obj: dict[str, Any]) -> None:
        """What the cluster's controllers would do: restart the supervisor of a Job left
        without one (its host process died), and delete Jobs past their TTL."""
        if not self._controller:
            return  # a read-only view (jobrunner status) changes nothing
        if outcome_of(obj) is None:
            if not jobdir.supervised():
                with self._lock:
                    child = self._children.get(jobdir.path)
                    orphaned = jobdir.path not in self._creating and (
                        child is None or child.poll() is not None
                    )
                if orphaned and self._may_restart(jobdir):
                    logger.info("%s", orphan_note(jobdir))
                    self._supervise(jobdir)
            return
        ttl = (obj.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        expired = age_seconds(JobState.from_object(obj).finished_at) >= float(ttl)
        if expired and not (obj.get("metadata") or {}).get("deletionTimestamp"):
            self._request_delete(jobdir)

    def _may_restart(self, jobdir: JobDir) -> bool:
        """Restarts of a Job's supervisor back off (0.5 s doubling to 30 s), so a
        supervisor that keeps dying cannot spin; each restart is logged."""
        now = time.monotonic()
        count, not_before = self._restarts.get(jobdir.path, (0, 0.0))
        if now < not_before:
            return False
        self._restarts[jobdir.path] = (count + 1, now + min(30.0, 0.5 * 2**count))
        return True

    async def watch_jobs(
        self, namespace: str, selector: str, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        known = self._snapshots.pop(resource_version, None)
        if known is None:
            raise WatchExpired(f"no listing {resource_version} to watch from")
        wanted = parse_selector(selector)
        while True:
            current = await asyncio.to_thread(self._scan, namespace, wanted, known)
            for name, seen in current.items():
                old = known.get(name)
                if old is None or old.stamp != seen.stamp:
                    self._version += 1
                    seen.object["metadata"]["resourceVersion"] = str(self._version)
                    yield WatchEvent("ADDED" if old is None else "MODIFIED", seen.object)
            for name in [n for n in known if n not in current]:
                self._version += 1
                gone = known[name].object
                gone["metadata"]["resourceVersion"] = str(self._version)
                yield WatchEvent("DELETED", gone)
            known = current
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=self._poll)

    def _scan(
        self, namespace: str, wanted: Mapping[str, str], known: Mapping[str, _Seen]
    ) -> dict[str, _Seen]:
        """The matching Jobs, parsing again only those whose files changed since ``known``
        (everything, for a listing); housekeeping on the way."""
        out = {}
        for jobdir in self._jobdirs(namespace):
            stamp = jobdir.stamp()
            old = known.get(jobdir.name)
            if old is not None and old.stamp == stamp:
                out[jobdir.name] = old
                self._housekeep(jobdir, old.object)
                continue
            obj = self._object(jobdir)
            if obj is None or not _matches(obj, wanted):
                continue
            out[jobdir.name] = _Seen(stamp, obj)
            self._housekeep(jobdir, obj)
        self._reap()
        return out

    async def close(self) -> None:
        """Forget the supervisors without stopping them: Jobs keep running."""
        self._children.clear()


def _app_containers(job: Mapping[str, Any]) -> list[str]:
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    return [str(c.get("name", "")) for c in pod.get("containers") or []]
