"""Runs one local Job to its end: ``python -m jobrunner.local.supervisor <job dir>``.

It plays the part of the Job controller and the kubelet for a single Job, as a process
of its own (in its own session) so that Jobs outlive the dispatcher exactly as they do
on Kubernetes: a dispatcher that crashes or restarts finds them running or finished.

What it honours, as Kubernetes does: the pod's containers run together (init containers
first, one by one) and the attempt succeeds when all exit 0; ``backoffLimit`` failed
attempts are retried (default 6), ``activeDeadlineSeconds`` ends the Job as
``DeadlineExceeded``; env values and ``$(VAR)`` references in command and args; Secret
and emptyDir volumes, whose mount paths are mapped into the Job's directory. Images are
not pulled or used: ``command`` and ``args`` run on this machine.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.local.jobdir import LOCK_FILE, JobDir
from jobrunner.timestamps import epoch, now_rfc3339
from jobrunner.tracker import outcome_of

RETRY_ENV = "JOBRUNNER_LOCAL_RETRY_SECONDS"
_PASS_THROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "VIRTUAL_ENV")
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class Unrunnable(Exception):
    """The Job cannot run locally at all (no command, say): it fails at once."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, ``$$`` is a literal
    ``$``, unknown references stay as written."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR.sub(sub, text)


@dataclass
class Process:
    container: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path


def _secret_files(secret: dict[str, Any] | None, wanted: str) -> dict[str, bytes]:
    if not secret or (secret.get("metadata") or {}).get("name") != wanted:
        return {}
    files = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    files.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return files


def materialize_volumes(jobdir: JobDir, pod: dict[str, Any]) -> dict[str, Path]:
    """Each volume as a directory of the Job; returns volume name -> local path."""
    secret = jobdir.secret()
    out: dict[str, Path] = {}
    for volume in pod.get("volumes") or []:
        name = volume.get("name", "")
        path = jobdir.volumes / name
        path.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            secret_name = volume["secret"].get("secretName", "")
            files = _secret_files(secret, secret_name)
            if not files:
                raise Unrunnable(
                    f"volume {name}: Secret {secret_name!r} is not one the local executor "
                    "has (it only has the Job's own message Secret)"
                )
            for key, data in files.items():
                (path / key).write_bytes(data)
        elif "emptyDir" not in volume:
            kinds = ", ".join(k for k in volume if k != "name")
            raise Unrunnable(
                f"volume {name}: {kinds} volumes are not available locally "
                "(Secret and emptyDir are)"
            )
        out[name] = path
    return out


def _map_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    for mount_path, local in mounts:
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + value[len(mount_path) :]
    return value


def plan(jobdir: JobDir, job: dict[str, Any], attempt: int, containers_key: str) -> list[Process]:
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    volumes = materialize_volumes(jobdir, pod)
    secret = jobdir.secret()
    meta = job.get("metadata") or {}
    work = jobdir.path / "work"
    work.mkdir(exist_ok=True)
    out = []
    for container in pod.get(containers_key) or []:
        name = container.get("name", "main")
        command = list(container.get("command") or [])
        if not command:
            raise Unrunnable(
                f"container {name} has no command: the local executor runs command/args, "
                "not an image's entrypoint; add `command:` to the template"
            )
        mounts = [
            (m.get("mountPath", ""), volumes[m["name"]])
            for m in container.get("volumeMounts") or []
            if m.get("name") in volumes
        ]
        env = {k: os.environ[k] for k in _PASS_THROUGH_ENV if k in os.environ}
        # As the kubelet does, $(VAR) sees only the variables the container defines.
        defined: dict[str, str] = {}
        env["JOBRUNNER_LOCAL"] = "1"
        # Logs are read while a Job runs and must survive its being killed at a deadline.
        env["PYTHONUNBUFFERED"] = "1"
        env["HOSTNAME"] = f"{meta.get('name', 'job')}-{attempt}"
        for item in container.get("env") or []:
            key = item.get("name", "")
            if "value" in item:
                env[key] = defined[key] = _map_path(expand(str(item["value"]), defined), mounts)
                continue
            source = item.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = _secret_files(secret, ref.get("name", "")).get(ref.get("key", ""))
                if data is not None:
                    env[key] = defined[key] = data.decode(errors="replace")
            elif "fieldRef" in source:
                field = source["fieldRef"].get("fieldPath", "")
                value = {
                    "metadata.name": env["HOSTNAME"],
                    "metadata.namespace": meta.get("namespace", "default"),
                }.get(field)
                if value is not None:
                    env[key] = defined[key] = value
        args = list(container.get("args") or [])
        argv = [_map_path(expand(part, defined), mounts) for part in command + args]
        working = container.get("workingDir")
        cwd = Path(working) if working and Path(working).is_dir() else work
        log = jobdir.logs / f"{attempt}-{name}.log"
        out.append(Process(container=name, argv=argv, env=env, cwd=cwd, log=log))
    return out


class Supervisor:
    def __init__(self, jobdir: JobDir, *, retry_seconds: float) -> None:
        self.jobdir = jobdir
        self.retry_seconds = retry_seconds
        self.running: list[subprocess.Popen[bytes]] = []
        self.grace = 30.0
        self.status: dict[str, Any] = jobdir.status()

    def save(self) -> None:
        self.status["pgids"] = [p.pid for p in self.running]
        self.jobdir.write_status(self.status)

    def kill_running(self, grace: float = 0.0) -> None:
        """SIGTERM the attempt's process groups, SIGKILL what is left after ``grace``
        seconds (the pod's terminationGracePeriodSeconds, as the kubelet does)."""
        groups = {p.pid for p in self.running} | set(self.status.get("pgids") or [])
        for sig in (signal.SIGTERM, signal.SIGKILL) if grace > 0 else (signal.SIGKILL,):
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
            end = time.time() + grace
            while time.time() < end and any(p.poll() is None for p in self.running):
                time.sleep(0.02)
        for proc in self.running:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self.running = []

    def finish(self, kind: str, reason: str, message: str) -> None:
        now = now_rfc3339(millis=True)
        self.status["active"] = 0
        if kind == "Complete":
            self.status["completionTime"] = now
            self.status["succeeded"] = 1
        self.status["conditions"] = [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
                "lastProbeTime": now,
            }
        ]
        self.save()

    def run(self) -> None:
        job = self.jobdir.job()
        if job is None or outcome_of({"status": self.status}) is not None:
            return
        spec = job.get("spec") or {}
        backoff_limit = int(spec.get("backoffLimit", 6))
        pod = (spec.get("template") or {}).get("spec") or {}
        self.grace = float(pod.get("terminationGracePeriodSeconds", 30))
        deadline_seconds = spec.get("activeDeadlineSeconds")
        self.status.setdefault("startTime", now_rfc3339(millis=True))
        self.status.setdefault("failed", 0)
        self.status.setdefault("attempts", [])
        if self.status.get("active"):
            # The previous supervisor died during an attempt: that attempt failed (as a
            # pod lost with its node does), and its processes must not linger.
            self.kill_running()
            self.status["failed"] += 1
            self._close_attempt({"lost": -1}, "the attempt's supervisor was lost")
        deadline = None
        if deadline_seconds is not None:
            deadline = (epoch(self.status["startTime"]) or time.time()) + float(deadline_seconds)
        self.jobdir.logs.mkdir(exist_ok=True)
        while True:
            if self.status["failed"] > backoff_limit:
                self.finish(
                    "Failed",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit" + self._last_attempt(),
                )
                return
            attempt = len(self.status["attempts"]) + 1
            try:
                init = plan(self.jobdir, job, attempt, "initContainers")
                main = plan(self.jobdir, job, attempt, "containers")
            except Unrunnable as exc:
                self.finish("Failed", "LocalExecutorUnsupported", str(exc))
                return
            self.status["active"] = 1
            self.status["attempts"].append(
                {"attempt": attempt, "started": now_rfc3339(millis=True)}
            )
            self.save()
            codes: dict[str, int] = {}
            for step in [[p] for p in init] + [main]:
                result = self._run_together(step, deadline)
                if result is None:
                    self.kill_running(grace=self.grace)
                    self.status["failed"] += 1  # as the pod the Job controller terminates
                    self._close_attempt(codes, "deadline exceeded")
                    self.finish(
                        "Failed",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline" + self._last_attempt(),
                    )
                    return
                codes.update(result)
                if any(result.values()):
                    break
            if not any(codes.values()):
                self._close_attempt(codes, "")
                self.finish(
                    "Complete", "CompletionsReached", "Reached expected number of succeeded pods"
                )
                return
            self.status["failed"] += 1
            failed = ", ".join(f"{c} exited {code}" for c, code in codes.items() if code)
            self._close_attempt(codes, failed)
            if self.status["failed"] > backoff_limit:
                continue
            pause = min(60.0, self.retry_seconds * 2 ** (self.status["failed"] - 1))
            if deadline is not None and time.time() + pause >= deadline:
                pause = max(0.0, deadline - time.time())
            time.sleep(pause)
            if deadline is not None and time.time() >= deadline:
                self.finish(
                    "Failed",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline" + self._last_attempt(),
                )
                return

    def _last_attempt(self) -> str:
        """What the last attempt came to, for the failure's message (and so for the dead
        letter's detail): each container's exit code, or that it was stopped, and the last
        lines of the log of the one that failed (or was stopped)."""
        if not self.status.get("attempts"):
            return ""
        last = self.status["attempts"][-1]
        codes: dict[str, int] = last.get("exitCodes") or {}
        failed = [c for c, code in codes.items() if code]
        parts = [f"{c} exited {code}" for c, code in codes.items() if code]
        if last.get("problem") == "deadline exceeded":
            parts.append("stopped at the deadline")
        text = f"; attempt {last.get('attempt')}: {', '.join(parts) or last.get('problem', '')}"
        log_of = failed[-1] if failed else None
        if log_of is None:
            logs = sorted(self.jobdir.logs.glob(f"{last.get('attempt')}-*.log"))
            log_of = logs[-1].stem.partition("-")[2] if logs else None
        if log_of is not None:
            tail = _tail(self.jobdir.logs / f"{last.get('attempt')}-{log_of}.log")
            if tail:
                text += f"; last lines of {log_of}: {tail}"
        return text

    def _close_attempt(self, codes: dict[str, int], problem: str) -> None:
        self.status["active"] = 0
        if self.status["attempts"]:
            current = self.status["attempts"][-1]
            current["finished"] = now_rfc3339(millis=True)
            current["exitCodes"] = codes
            if problem:
                current["problem"] = problem
        self.save()

    def _run_together(self, procs: list[Process], deadline: float | None) -> dict[str, int] | None:
        """Exit codes by container, or None when the deadline came first."""
        self.running = []
        for proc in procs:
            with proc.log.open("ab") as log:
                try:
                    child = subprocess.Popen(
                        proc.argv,
                        env=proc.env,
                        cwd=proc.cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as exc:
                    log.write(f"jobrunner: cannot start {proc.argv[0]!r}: {exc}\n".encode())
                    self.kill_running()
                    return {proc.container: 127}
            self.running.append(child)
        self.save()
        while True:
            codes = [p.poll() for p in self.running]
            if all(code is not None for code in codes):
                result = {
                    proc.container: int(code or 0) for proc, code in zip(procs, codes, strict=True)
                }
                self.running = []
                return result
            if deadline is not None and time.time() >= deadline:
                return None
            time.sleep(0.02)


def _tail(log: Path, lines: int = 3, most: int = 600) -> str:
    """The last non-empty ``lines`` of ``log`` joined with `` | ``, at most ``most``
    characters (its end kept)."""
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in data.splitlines() if line.strip()][-lines:]
    text = " | ".join(kept)
    return text if len(text) <= most else "…" + text[-most:]


def main(argv: list[str]) -> int:
    jobdir = JobDir(Path(argv[0]))
    fd = os.open(jobdir.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another supervisor runs this Job
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    supervisor = Supervisor(jobdir, retry_seconds=float(os.environ.get(RETRY_ENV, "1.0")))

    def on_term(signum: int, frame: object) -> None:
        # The Job is being deleted: its processes go with it (the client waits a little,
        # then kills what is left).
        supervisor.kill_running()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        supervisor.run()
    except Exception as exc:
        # Whatever went wrong, the Job ends Failed with the reason, visible to `status`
        # and `jobs` and settled by the dispatcher; a supervisor that died instead would
        # be restarted, fail the same way, and never settle the message.
        traceback.print_exc()  # to supervisor.log
        supervisor.kill_running()
        supervisor.finish(
            "Failed",
            "LocalExecutorError",
            f"the local executor could not run this Job: {type(exc).__name__}: {exc} "
            "(traceback in supervisor.log)",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
