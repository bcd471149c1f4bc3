"""Runs one local Job to its end: ``python -m jobrunner.local.supervisor <job dir>``.

It plays the part of the Job controller and the kubelet for a single Job, as a process
of its own (in its own session) so that Jobs outlive the dispatcher exactly as they do
on Kubernetes: a dispatcher that crashes or restarts finds them running or finished.

What it honours, as Kubernetes does: the pod's containers run together (init containers
first, one by one) and the attempt succeeds when all exit 0; native sidecars (init
containers with ``restartPolicy: Always``) are started in order and kept running
(restarted if they exit) while the rest start, and are stopped (SIGTERM, then SIGKILL
after the grace period, in reverse order) once the main containers have finished; a
sidecar's ``startupProbe`` and ``readinessProbe`` (tcpSocket, httpGet, exec) must pass
before the next container starts (see ``_start_sidecar``); ``backoffLimit`` failed
attempts are retried (default 6), ``activeDeadlineSeconds`` ends the Job as
``DeadlineExceeded``; env values and ``$(VAR)`` references in command and args; Secret
and emptyDir volumes, whose mount paths are mapped into the Job's directory; a Job
whose message Secret is not written yet waits for it, as the kubelet waits to mount a
Secret volume (see ``wait_for_message_secret``). Images are not pulled or used:
``command`` and ``args`` run on this machine; nor are ``securityContext`` and
``resources`` applied: the processes run as the user running jobrunner, unconfined.
What it writes (logs, volumes, status) is private to that user (0600 in 0700).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.core.models import TERMINATION_MESSAGE_LIMIT
from jobrunner.core.naming import message_secret_name
from jobrunner.core.privatefs import append_private, open_private, private_dir, write_private
from jobrunner.core.timestamps import epoch, now_rfc3339
from jobrunner.local import compat
from jobrunner.local.jobdir import LOCK_FILE, JobDir
from jobrunner.tracking.tracker import outcome_of

RETRY_ENV = "JOBRUNNER_LOCAL_RETRY_SECONDS"
_PASS_THROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "VIRTUAL_ENV")
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"


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
    sidecar: bool = False
    """An init container with ``restartPolicy: Always`` (a native sidecar)."""
    spec: dict[str, Any] | None = None
    """The container as written (its probes and ports)."""
    mounts: tuple[tuple[str, Path], ...] = ()
    """Its volume mounts: mount path -> the Job's directory for the volume."""
    defined: dict[str, str] | None = None
    """The env the container defines, which alone ``$(VAR)`` sees."""

    def probe_argv(self, command: list[str]) -> list[str]:
        """An exec probe's command as the kubelet runs it in the container: ``$(VAR)``
        expanded from the container's env, and (here) mount paths mapped into the Job's
        directory, as its own command's are."""
        return [_map_path(expand(part, self.defined or {}), list(self.mounts)) for part in command]


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
        private_dir(path)
        if "secret" in volume:
            secret_name = volume["secret"].get("secretName", "")
            files = _secret_files(secret, secret_name)
            if not files:
                raise Unrunnable(
                    f"volume {name}: Secret {secret_name!r} is not one the local executor "
                    "has (it only has the Job's own message Secret)"
                )
            for key, data in files.items():
                write_private(path / key, data)
        elif "emptyDir" not in volume:
            kinds = ", ".join(k for k in volume if k != "name")
            raise Unrunnable(
                f"volume {name}: {kinds} volumes are not available locally "
                "(Secret and emptyDir are)"
            )
        out[name] = path
    return out


def fresh_empty_dirs(jobdir: JobDir, pod: dict[str, Any]) -> None:
    """Empty the Job's emptyDir volumes for a new pod. With ``restartPolicy: Never`` each
    attempt is a new pod, and a new pod's emptyDir is empty (what a failed attempt wrote
    is gone); with ``OnFailure`` the kubelet restarts the container in the same pod, whose
    emptyDir keeps its files, so they stay."""
    if pod.get("restartPolicy") == "OnFailure":
        return
    for volume in pod.get("volumes") or []:
        if "emptyDir" in volume:
            shutil.rmtree(jobdir.volumes / volume.get("name", ""), ignore_errors=True)


def _map_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    for mount_path, local in mounts:
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + value[len(mount_path) :]
    return value


DEFAULT_TERMINATION_PATH = "/dev/termination-log"
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
"""``terminationMessagePolicy: FallbackToLogsOnError``: the kubelet's tail of a failed
container's log when its termination file is empty (kuberuntime_container.go:
``kubecontainer.MaxContainerTerminationMessageLogLines`` and ``...LogLength``)."""


def termination_path(container: dict[str, Any]) -> str:
    return str(container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH)


def termination_file(jobdir: JobDir, attempt: int, container: str) -> Path:
    """Where the local container's termination message is written for ``attempt``: a
    fresh, private, empty file, as the kubelet makes one per container start."""
    path = jobdir.path / "termination" / f"{attempt}-{container}"
    private_dir(path.parent)
    write_private(path, b"")
    return path


def termination_message(
    jobdir: JobDir, *, attempt: int, container: dict[str, Any], exit_code: int
) -> str:
    """The termination message the kubelet would put in ``state.terminated.message``:
    the file's first ``TERMINATION_MESSAGE_LIMIT`` bytes; with ``FallbackToLogsOnError``
    and a failed container that wrote none, the last lines of its log."""
    name = str(container.get("name", "main"))
    path = jobdir.path / "termination" / f"{attempt}-{name}"
    try:
        with path.open("rb") as f:
            data = f.read(TERMINATION_MESSAGE_LIMIT)
    except OSError:
        data = b""
    fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
    if not data and fallback and exit_code != 0:
        try:
            log = (jobdir.logs / f"{attempt}-{name}.log").read_bytes()
        except OSError:
            log = b""
        data = b"".join(log.splitlines(keepends=True)[-FALLBACK_LOG_LINES:])[-FALLBACK_LOG_BYTES:]
    return data.decode("utf-8", errors="replace")


def hostname(job: dict[str, Any], attempt: int) -> str:
    """The hostname of the Job's pod for ``attempt``: ``<job>-<pod number>``; an Indexed
    Job's pod is named by the Job controller for its index (indexed_job_utils.go:
    hostname ``<job>-<index>``), and its one index is 0."""
    name = str((job.get("metadata") or {}).get("name", "job"))
    return f"{name}-{0 if compat.indexed(job) else pod_number(job, attempt)}"


def pod_number(job: dict[str, Any], attempt: int) -> int:
    """Which pod of the Job runs ``attempt``: a new one for each attempt, except with
    ``restartPolicy: OnFailure``, where the kubelet restarts the failed container in the
    same pod (the first)."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    return 1 if pod.get("restartPolicy") == "OnFailure" else attempt


def pod_name(job: dict[str, Any], attempt: int) -> str:
    """The name of the Job's pod for ``attempt`` (in messages and ``metadata.name``): its
    hostname, with the attempt after the index for an Indexed Job (whose pods the Job
    controller names ``<job>-<index>-<random>``)."""
    name = hostname(job, attempt)
    return f"{name}-{pod_number(job, attempt)}" if compat.indexed(job) else name


def plan(jobdir: JobDir, job: dict[str, Any], attempt: int, containers_key: str) -> list[Process]:
    """The processes of one attempt's ``containers_key`` (``initContainers`` or
    ``containers``), with the pod's volumes made in the Job's directory."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    volumes = materialize_volumes(jobdir, pod)
    secret = jobdir.secret()
    work = jobdir.path / "work"
    private_dir(work)
    return [
        _process(
            container,
            jobdir=jobdir,
            job=job,
            attempt=attempt,
            volumes=volumes,
            secret=secret,
            work=work,
            init=containers_key == "initContainers",
        )
        for container in pod.get(containers_key) or []
    ]


def _process(
    container: dict[str, Any],
    *,
    jobdir: JobDir,
    job: dict[str, Any],
    attempt: int,
    volumes: dict[str, Path],
    secret: dict[str, Any] | None,
    work: Path,
    init: bool,
) -> Process:
    """One container as a process: its command and args with ``$(VAR)`` expanded and
    mount paths mapped into the Job's directory, its environment, its working directory
    and its log."""
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
    if not init:
        # The kubelet gives each container a file at terminationMessagePath and reads it,
        # at most 4096 bytes, into the pod's state.terminated.message when it ends; here
        # the path is mapped to a file of the attempt, like a mount path.
        mounts.append((termination_path(container), termination_file(jobdir, attempt, name)))
    env, defined = _container_env(
        container, jobdir=jobdir, job=job, attempt=attempt, secret=secret, mounts=mounts
    )
    args = list(container.get("args") or [])
    argv = [_map_path(expand(part, defined), mounts) for part in command + args]
    working = container.get("workingDir")
    if working and not Path(working).is_dir():  # gone since create (compat refuses it)
        raise Unrunnable(f"container {name}: workingDir {working} does not exist here")
    cwd = Path(working) if working else work
    log = jobdir.logs / f"{attempt}-{name}.log"
    return Process(
        container=name,
        argv=argv,
        env=env,
        cwd=cwd,
        log=log,
        sidecar=init and container.get("restartPolicy") == "Always",
        spec=container,
        mounts=tuple(mounts),
        defined=defined,
    )


def _container_env(
    container: dict[str, Any],
    *,
    jobdir: JobDir,
    job: dict[str, Any],
    attempt: int,
    secret: dict[str, Any] | None,
    mounts: list[tuple[str, Path]],
) -> tuple[dict[str, str], dict[str, str]]:
    """A container's environment (a few of this machine's variables, the local
    executor's, then the container's own ``env``), and the part the container defines,
    which alone ``$(VAR)`` sees (as the kubelet does)."""
    env = {k: os.environ[k] for k in _PASS_THROUGH_ENV if k in os.environ}
    defined: dict[str, str] = {}
    env["JOBRUNNER_LOCAL"] = "1"
    # Logs are read while a Job runs and must survive its being killed at a deadline.
    env["PYTHONUNBUFFERED"] = "1"
    env["HOSTNAME"] = hostname(job, attempt)
    # Where a process may record annotations on its Job (the local stand-in for a
    # pod patching its Job through the API server; see jobdir.JOB_ANNOTATIONS_FILE).
    env["JOBRUNNER_LOCAL_JOB_DIR"] = str(jobdir.path)
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
            value = compat.field_ref(field, pod_name=pod_name(job, attempt), job=job)
            if value is not None:
                env[key] = defined[key] = value
    if compat.indexed(job) and COMPLETION_INDEX_ENV not in defined:
        # As the Job controller adds it to every container of an Indexed Job's pod,
        # after the container's own env (addCompletionIndexEnvVariable).
        env[COMPLETION_INDEX_ENV] = defined[COMPLETION_INDEX_ENV] = "0"
    return env, defined


@dataclass(frozen=True)
class Verdict:
    """What a Job's ``podFailurePolicy`` says of one failed pod: the action of the rule
    that matched (None: no rule, counted as usual), the rule's index, and for FailJob the
    Job controller's message."""

    action: str | None = None
    rule: int = -1
    message: str = ""


class PodFailurePolicy:
    """A Job's ``spec.podFailurePolicy``, applied to a failed local pod as the Job
    controller applies it (kubernetes pkg/controller/job/pod_failure_policy.go): rules in
    order, the first that matches decides. An ``onExitCodes`` rule matches a container
    (app containers first, then init containers; those that exited 0 never) whose exit
    code is ``In`` or ``NotIn`` its values, limited to ``containerName`` when given; an
    ``onPodConditions`` rule matches a condition of the pod of that type and status
    (``compat.POD_CONDITIONS`` says which a local pod has). ``FailJob`` fails the Job
    (reason ``PodFailurePolicy``), ``Ignore`` does not count the failure towards
    ``backoffLimit``, ``Count`` counts it; an action it does not know skips the rule."""

    def __init__(self, job: dict[str, Any]) -> None:
        spec = job.get("spec") or {}
        self.rules: list[dict[str, Any]] = list(
            (spec.get("podFailurePolicy") or {}).get("rules") or []
        )
        self.namespace = str((job.get("metadata") or {}).get("namespace", "default"))

    def match(
        self,
        codes: dict[str, int],
        *,
        init_names: set[str],
        initialized: bool,
        lost: bool,
        pod: str = "",
    ) -> Verdict:
        """The verdict on a failed pod: ``codes`` the exit codes by container (init ones
        named in ``init_names``), ``initialized`` whether its init containers succeeded,
        ``lost`` whether it was lost with its supervisor."""
        ordered = [(n, c) for n, c in codes.items() if n not in init_names] + [
            (n, c) for n, c in codes.items() if n in init_names
        ]
        conditions = {
            "PodScheduled": "True",
            "Initialized": "True" if initialized else "False",
            "ContainersReady": "False",
            "Ready": "False",
        }
        if lost:
            conditions["DisruptionTarget"] = "True"
        for index, rule in enumerate(self.rules):
            action = rule.get("action")
            if action not in ("FailJob", "Ignore", "Count"):
                continue
            if rule.get("onExitCodes") is not None:
                found = _exit_code_match(rule["onExitCodes"], ordered)
                if found is None:
                    continue
                container, code = found
                text = (
                    f"Container {container} for pod {self.namespace}/{pod} failed with exit "
                    f"code {code} matching {action} rule at index {index}"
                )
            elif rule.get("onPodConditions") is not None:
                kind = next(
                    (
                        p.get("type")
                        for p in rule["onPodConditions"]
                        if conditions.get(p.get("type")) == p.get("status", "True")
                    ),
                    None,
                )
                if kind is None:
                    continue
                text = (
                    f"Pod {self.namespace}/{pod} has condition {kind} matching {action} rule "
                    f"at index {index}"
                )
            else:
                continue
            return Verdict(action, index, text)
        return Verdict()


def _exit_code_match(
    requirement: dict[str, Any], ordered: list[tuple[str, int]]
) -> tuple[str, int] | None:
    wanted = requirement.get("containerName")
    values = set(requirement.get("values") or [])
    operator = requirement.get("operator")
    for name, code in ordered:
        if code == 0 or code < 0 or (wanted is not None and wanted != name):
            continue
        if (operator == "In" and code in values) or (operator == "NotIn" and code not in values):
            return name, code
    return None


class ProbeFailed(Exception):
    """A sidecar's startup or readiness probe did not pass within its failureThreshold."""


def _port(value: Any, container: dict[str, Any]) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise Unrunnable(f"container {container.get('name')}: probe port {value!r} is not named")


def probe_once(probe: dict[str, Any], proc: Process) -> str | None:
    """Run one probe (tcpSocket, httpGet or exec; the pod's address is 127.0.0.1 here):
    None on success, else what failed. An httpGet passes with a status from 200 to 399,
    an exec with exit code 0, a tcpSocket when the connection opens, each within
    ``timeoutSeconds`` (default 1), as the kubelet's prober does."""
    container = proc.spec or {}
    timeout = float(probe.get("timeoutSeconds", 1))
    if "tcpSocket" in probe:
        port = _port(probe["tcpSocket"].get("port"), container)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout):
                return None
        except OSError as exc:
            return f"tcp 127.0.0.1:{port}: {exc.strerror or exc}"
    if "httpGet" in probe:
        get = probe["httpGet"]
        port = _port(get.get("port"), container)
        path = get.get("path") or "/"
        cls = (
            http.client.HTTPSConnection
            if str(get.get("scheme", "HTTP")).upper() == "HTTPS"
            else http.client.HTTPConnection
        )
        connection = cls("127.0.0.1", port, timeout=timeout)
        try:
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
            connection.request("GET", path, headers=headers)
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            return f"GET http://127.0.0.1:{port}{path}: {exc or type(exc).__name__}"
        finally:
            connection.close()
        return None if 200 <= status < 400 else f"GET http://127.0.0.1:{port}{path}: {status}"
    if "exec" in probe:
        command = proc.probe_argv(list(probe["exec"].get("command") or []))
        try:
            done = subprocess.run(
                command, env=proc.env, cwd=proc.cwd, capture_output=True, timeout=timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"exec {command}: {exc}"
        return None if done.returncode == 0 else f"exec {command}: exit {done.returncode}"
    raise Unrunnable(f"container {container.get('name')}: only tcpSocket, httpGet and exec probes")


class Supervisor:
    def __init__(self, jobdir: JobDir, *, retry_seconds: float) -> None:
        self.jobdir = jobdir
        self.retry_seconds = retry_seconds
        self.running: list[subprocess.Popen[bytes]] = []
        self.sidecars: list[tuple[Process, subprocess.Popen[bytes]]] = []
        """Native sidecars of the current attempt, in start order."""
        self.sidecar_ends: dict[str, dict[str, Any]] = {}
        """How each sidecar of the current attempt ended, by container (its own state,
        as the kubelet reports a sidecar's: it is stopped, it does not decide the pod):
        ``when`` it was stopped and why, its ``exitCode`` (128 + the signal for one that
        a signal ended, as a container runtime reports it; None: never started) and
        that ``signal``. Kept in the attempt's record as ``sidecars``."""
        self.grace = 30.0
        self.status: dict[str, Any] = jobdir.status()

    def save(self) -> None:
        self.status["pgids"] = [p.pid for p in self.running] + [p.pid for _, p in self.sidecars]
        self.jobdir.write_status(self.status)

    def kill_running(self, grace: float = 0.0, *, when: str = "") -> None:
        """SIGTERM the attempt's process groups, SIGKILL what is left after ``grace``
        seconds (the pod's terminationGracePeriodSeconds, as the kubelet does). ``when``
        says why, for the sidecars' own record (see ``sidecar_ends``)."""
        sidecars = self.sidecars
        self.running += [p for _, p in sidecars]
        self.sidecars = []
        groups = {p.pid for p in self.running} | set(self.status.get("pgids") or [])
        for sig in (signal.SIGTERM, signal.SIGKILL) if grace > 0 else (signal.SIGKILL,):
            for pgid in groups:
                _signal_container(pgid, sig)
            end = time.time() + grace
            while time.time() < end and any(p.poll() is None for p in self.running):
                time.sleep(0.02)
        for proc in self.running:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        self.running = []
        for sidecar, child in sidecars:
            self._sidecar_ended(sidecar, child, when=when or "with the attempt")

    def stop_sidecars(self, *, when: str = "after the main containers ended") -> None:
        """After the main containers (or an init container that failed): SIGTERM each
        sidecar in reverse start order and SIGKILL what is left after the grace period
        (the kubelet's order); each one's own end is recorded (``sidecar_ends``)."""
        for proc, child in reversed(self.sidecars):
            _signal_container(child.pid, signal.SIGTERM)
            end = time.time() + self.grace
            while time.time() < end and child.poll() is None:
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                child.wait(timeout=5)
            self._sidecar_ended(proc, child, when=when)
        self.sidecars = []
        self.save()

    def _sidecar_ended(self, proc: Process, child: subprocess.Popen[bytes], *, when: str) -> None:
        code = child.returncode
        if code is None or proc.container in self.sidecar_ends:
            return
        self.sidecar_ends[proc.container] = {
            "when": when,
            # As a container runtime reports a process a signal ended: 128 + the signal.
            "exitCode": _exit_code(code),
            "signal": signal.Signals(-code).name if code < 0 else None,
        }

    def finish(self, kind: str, reason: str, message: str) -> None:
        """End the Job with the condition ``kind`` (Complete or Failed), after the interim
        condition the Job controller sets first with the same reason and message
        (job_controller.go, seen on the stack's v1.37 API server): ``SuccessCriteriaMet``
        before ``Complete``, ``FailureTarget`` before ``Failed``."""
        now = now_rfc3339(millis=True)
        self.status["active"] = 0
        if kind == "Complete":
            self.status["completionTime"] = now
            self.status["succeeded"] = 1
        kinds = ["SuccessCriteriaMet" if kind == "Complete" else "FailureTarget", kind]
        self.status["conditions"] = [
            {
                "type": each,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
                "lastProbeTime": now,
            }
            for each in kinds
        ]
        self.save()

    def run(self) -> None:
        """Run the Job to its end, as the Job controller would: attempts one after the
        other, each its init containers then its main containers, until one succeeds,
        the pod failure policy or ``backoffLimit`` fails the Job, or its deadline does."""
        job = self.jobdir.job()
        if job is None or outcome_of({"status": self.status}) is not None:
            return
        spec = job.get("spec") or {}
        backoff_limit = int(spec.get("backoffLimit", 6))
        pod = (spec.get("template") or {}).get("spec") or {}
        self.grace = float(pod.get("terminationGracePeriodSeconds", 30))
        policy = PodFailurePolicy(job)
        if self._begin(policy):
            return
        deadline = self._deadline(spec)
        private_dir(self.jobdir.logs)
        if not self.wait_for_message_secret(job, deadline):
            self.finish(
                "Failed",
                "DeadlineExceeded",
                "Job was active longer than specified deadline (waiting for its message Secret)",
            )
            return
        while True:
            if self.status["failed"] > backoff_limit:
                self._backoff_limit_reached(self._last_attempt())
                return
            attempt = len(self.status["attempts"]) + 1
            planned = self._plan_attempt(job, pod=pod, attempt=attempt)
            if planned is None:
                return
            init, main = planned
            ran = self._run_attempt(attempt, init=init, main=main, deadline=deadline)
            if ran is None:
                return
            codes, problem, sidecars_stop = ran
            self.stop_sidecars(when=sidecars_stop)
            if not any(codes.values()):
                self._close_attempt(codes, "")
                self.finish(
                    "Complete", "CompletionsReached", "Reached expected number of succeeded pods"
                )
                return
            if self._judge_failure(
                policy, pod=pod_name(job, attempt), init=init, codes=codes, problem=problem
            ):
                return
            if self.status["failed"] > backoff_limit:
                if problem:
                    self._backoff_limit_reached(f" (last attempt: {problem})")
                    return
                continue
            if not self._back_off(deadline):
                return

    def _begin(self, policy: PodFailurePolicy) -> bool:
        """Note the Job's start, once; an attempt the previous supervisor left active
        fails as lost. True when that ended the Job (a ``FailJob`` rule)."""
        self.status.setdefault("startTime", now_rfc3339(millis=True))
        self.status.setdefault("failed", 0)
        self.status.setdefault("attempts", [])
        if not self.status.get("active"):
            return False
        # The previous supervisor died during an attempt: that attempt failed (as a
        # pod lost with its node does, with a DisruptionTarget condition), and its
        # processes must not linger.
        self.kill_running()
        verdict = policy.match({}, init_names=set(), initialized=False, lost=True)
        return self._failed_attempt(verdict, {"lost": -1}, "the attempt's supervisor was lost")

    def _deadline(self, spec: dict[str, Any]) -> float | None:
        """When ``activeDeadlineSeconds`` ends the Job (epoch seconds), counted from its
        start; None without one."""
        seconds = spec.get("activeDeadlineSeconds")
        if seconds is None:
            return None
        return (epoch(self.status["startTime"]) or time.time()) + float(seconds)

    def _plan_attempt(
        self, job: dict[str, Any], *, pod: dict[str, Any], attempt: int
    ) -> tuple[list[Process], list[Process]] | None:
        """The attempt's init and main containers as processes (emptyDir volumes made
        fresh for a retry); None when the local executor cannot run them, which failed
        the Job."""
        try:
            if attempt > 1:
                fresh_empty_dirs(self.jobdir, pod)
            init = plan(self.jobdir, job, attempt, "initContainers")
            main = plan(self.jobdir, job, attempt, "containers")
        except Unrunnable as exc:
            self.finish("Failed", "LocalExecutorUnsupported", str(exc))
            return None
        return init, main

    def _run_attempt(
        self, attempt: int, *, init: list[Process], main: list[Process], deadline: float | None
    ) -> tuple[dict[str, int], str, str] | None:
        """One attempt: each init container in turn (a sidecar started and kept, the
        others run to their end), then the main containers together, stopping at the
        first that fails. Exit codes by container, the problem that is not an exit
        code (a sidecar's probe) and when the sidecars are to be stopped (for their own
        record); None when the deadline came first, which failed the Job."""
        self.status["active"] = 1
        self.status["attempts"].append({"attempt": attempt, "started": now_rfc3339(millis=True)})
        self.save()
        codes: dict[str, int] = {}
        problem = ""
        self.sidecar_ends = {}
        sidecars_stop = "after the main containers ended"
        for step in [[p] for p in init] + [main]:
            result: dict[str, int] | None
            if step[0].sidecar:
                try:
                    started = self._start_sidecar(step[0], deadline)
                except ProbeFailed as exc:
                    problem = str(exc)
                    self._sidecar_failed(step[0].container, problem, codes)
                    break
                result = None if not started else {}
            else:
                result = self._run_together(step, deadline)
            if result is None:
                running = list(zip(step, self.running, strict=False))
                self.kill_running(grace=self.grace, when="at the deadline (DeadlineExceeded)")
                # As the kubelet reports a container the deadline stopped: its exit code,
                # 137 when the SIGKILL after the grace period ended it.
                codes.update({p.container: _exit_code(c.returncode) for p, c in running})
                self.status["failed"] += 1  # as the pod the Job controller terminates
                self._close_attempt(codes, "deadline exceeded")
                self._deadline_exceeded()
                return None
            codes.update(result)
            if any(result.values()):
                if step is not main:
                    sidecars_stop = f"after init container {step[0].container} failed"
                break
        return codes, problem, sidecars_stop

    def _sidecar_failed(self, name: str, problem: str, codes: dict[str, int]) -> None:
        """A sidecar's probe failed: the attempt fails on it, what runs is stopped, and
        the sidecar's own end says so (stopped since its probe failed, or never
        started)."""
        codes[name] = 1
        why = problem.removeprefix(f"sidecar {name}: ")
        self.kill_running(grace=self.grace, when=f"after sidecar {name} failed ({why})")
        own = self.sidecar_ends.get(name)
        if own is not None:
            own["when"] = f"after its {why}"
        else:
            self.sidecar_ends[name] = {"when": why, "exitCode": None}

    def _judge_failure(
        self,
        policy: PodFailurePolicy,
        *,
        pod: str,
        init: list[Process],
        codes: dict[str, int],
        problem: str,
    ) -> bool:
        """Close a failed attempt as the pod failure policy says of it; True when that
        ended the Job."""
        failed = problem or ", ".join(f"{c} exited {code}" for c, code in codes.items() if code)
        init_names = {p.container for p in init}
        verdict = policy.match(
            # A sidecar whose probe failed did not exit with a code of its own.
            {} if problem else codes,
            init_names=init_names,
            initialized=not any(codes.get(n) for n in init_names),
            lost=False,
            pod=pod,
        )
        return self._failed_attempt(verdict, codes, failed)

    def _back_off(self, deadline: float | None) -> bool:
        """Wait before the next attempt: ``retry_seconds``, doubling with each failed
        try, at most 60 s and never past the deadline. False when the deadline came,
        which failed the Job."""
        tries = self.status["failed"] + self.status.get("ignored", 0)
        pause = min(60.0, self.retry_seconds * 2 ** max(0, tries - 1))
        if deadline is not None and time.time() + pause >= deadline:
            pause = max(0.0, deadline - time.time())
        time.sleep(pause)
        if deadline is not None and time.time() >= deadline:
            self._deadline_exceeded()
            return False
        return True

    def _backoff_limit_reached(self, detail: str) -> None:
        self.finish(
            "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit" + detail
        )

    def _deadline_exceeded(self) -> None:
        self.finish(
            "Failed",
            "DeadlineExceeded",
            "Job was active longer than specified deadline" + self._last_attempt(),
        )

    def _failed_attempt(self, verdict: Verdict, codes: dict[str, int], problem: str) -> bool:
        """Count a failed attempt as its pod failure policy says (a failure an ``Ignore``
        rule matched is not counted towards backoffLimit) and close it; True when a
        ``FailJob`` rule ended the Job."""
        if verdict.action == "Ignore":
            self.status["ignored"] = self.status.get("ignored", 0) + 1
            problem += f" (not counted: podFailurePolicy rule {verdict.rule} is Ignore)"
        else:
            self.status["failed"] += 1
        self._close_attempt(codes, problem)
        if verdict.action != "FailJob":
            return False
        self.finish("Failed", "PodFailurePolicy", verdict.message + self._last_attempt())
        return True

    def wait_for_message_secret(self, job: dict[str, Any], deadline: float | None) -> bool:
        """Wait until the Job's message Secret is written, when the pod needs it (a Secret
        volume or a ``secretKeyRef`` naming it): the client writes it just after the Job,
        and after a crash between the two, when the message's redelivery adopts the Job.
        The kubelet does the same (a Secret volume's mount is retried, the pod stays
        Pending; ``activeDeadlineSeconds`` still ends the Job). False when the deadline
        came first. Polls every 0.1 s, doubling to 2 s."""
        name = message_secret_name(str((job.get("metadata") or {}).get("name", "")))
        if not _needs_secret(job, name):
            return True
        pause, noted = 0.1, False
        while (self.jobdir.secret() or {}).get("metadata", {}).get("name") != name:
            if deadline is not None and time.time() >= deadline:
                return False
            if not noted:
                print(f"waiting for Secret {name}, the Job's message", file=sys.stderr)
                noted = True
            time.sleep(pause)
            pause = min(2.0, pause * 2)
        return True

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

    def _termination_messages(self, attempt: int, codes: dict[str, int]) -> dict[str, str]:
        """The app containers' termination messages of ``attempt``, by container."""
        job = self.jobdir.job() or {}
        pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        found = {}
        for container in pod.get("containers") or []:
            name = str(container.get("name", "main"))
            if name not in codes:
                continue
            text = termination_message(
                self.jobdir, attempt=attempt, container=container, exit_code=codes[name]
            )
            if text:
                found[name] = text
        return found

    def _close_attempt(self, codes: dict[str, int], problem: str) -> None:
        self.status["active"] = 0
        if self.status["attempts"]:
            current = self.status["attempts"][-1]
            current["finished"] = now_rfc3339(millis=True)
            current["exitCodes"] = codes
            messages = self._termination_messages(int(current.get("attempt", 0)), codes)
            if messages:
                current["terminationMessages"] = messages
            if problem:
                current["problem"] = problem
            if self.sidecar_ends:
                current["sidecars"] = self.sidecar_ends
        self.save()

    def _run_together(self, procs: list[Process], deadline: float | None) -> dict[str, int] | None:
        """Exit codes by container, or None when the deadline came first."""
        self.running = []
        for proc in procs:
            with append_private(proc.log) as log:
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
                    self.kill_running(when=f"after container {proc.container} could not start")
                    return {proc.container: 127}
            self.running.append(child)
        self.save()
        while True:
            self._keep_sidecars()
            codes = [p.poll() for p in self.running]
            if all(code is not None for code in codes):
                result = {
                    proc.container: _exit_code(code)
                    for proc, code in zip(procs, codes, strict=True)
                }
                self.running = []
                return result
            if deadline is not None and time.time() >= deadline:
                return None
            time.sleep(0.02)

    def _spawn(self, proc: Process) -> subprocess.Popen[bytes]:
        with append_private(proc.log) as log:
            return subprocess.Popen(
                proc.argv,
                env=proc.env,
                cwd=proc.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _keep_sidecars(self) -> None:
        """restartPolicy Always: a sidecar that exited is started again (at most once a
        second, noted in its log)."""
        for i, (proc, child) in enumerate(self.sidecars):
            if child.poll() is None:
                continue
            last = getattr(child, "jobrunner_ended", None)
            if last is None:
                child.jobrunner_ended = time.time()  # type: ignore[attr-defined]
                continue
            if time.time() - last < 1.0:
                continue
            with append_private(proc.log) as log:
                log.write(f"jobrunner: sidecar exited {child.returncode}; restarting\n".encode())
            try:
                self.sidecars[i] = (proc, self._spawn(proc))
            except OSError:
                continue
            self.save()

    def _start_sidecar(self, proc: Process, deadline: float | None) -> bool:
        """Start a native sidecar and wait until it has started: its ``startupProbe``
        passed (the kubelet starts the next container only then), and then its
        ``readinessProbe`` (locally there is no Service whose endpoints readiness would
        steer, so it gates the next container too). A probe that fails
        ``failureThreshold`` times (default 3) raises ProbeFailed: the kubelet would
        restart the sidecar and keep the pod waiting until its deadline; locally the
        attempt fails at once, saying which probe failed and how. False when the
        deadline came first."""
        try:
            child = self._spawn(proc)
        except OSError as exc:
            raise ProbeFailed(
                f"sidecar {proc.container}: cannot start {proc.argv[0]!r}: {exc}"
            ) from None
        self.sidecars.append((proc, child))
        self.save()
        spec = proc.spec or {}
        for kind in ("startupProbe", "readinessProbe"):
            probe = spec.get(kind)
            if not probe:
                continue
            period = float(probe.get("periodSeconds", 10))
            threshold = int(probe.get("failureThreshold", 3))
            wait_until = time.time() + float(probe.get("initialDelaySeconds", 0))
            failures = 0
            while True:
                if deadline is not None and time.time() >= deadline:
                    return False
                self._keep_sidecars()
                if time.time() >= wait_until:
                    problem = probe_once(probe, proc)
                    if problem is None:
                        break
                    failures += 1
                    if failures >= threshold:
                        raise ProbeFailed(
                            f"sidecar {proc.container}: {kind} failed {failures} times "
                            f"({period:g}s apart): {problem}"
                        )
                    wait_until = time.time() + period
                time.sleep(0.02)
        return True


def _signal_container(pgid: int, sig: signal.Signals) -> None:
    """Signal a container's processes as a container runtime does: SIGTERM to its first
    process only (the runtime signals the container's init, and a shell's children do
    not see it: a shell that traps it ends them its own way), SIGKILL to all of them (the
    runtime kills the container's whole PID namespace). Each container is a process group
    whose leader is its first process."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if sig == signal.SIGTERM:
            os.kill(pgid, sig)
        else:
            os.killpg(pgid, sig)


def _exit_code(returncode: int | None) -> int:
    """A process's exit code as a container runtime reports it: 128 + the signal for one
    a signal ended (``kill -9`` is 137, as ``podFailurePolicy`` rules on a cluster see it),
    where Python's ``returncode`` is minus the signal."""
    if returncode is None:
        return 137  # not reaped after its SIGKILL: what it will report
    return 128 - returncode if returncode < 0 else returncode


def _needs_secret(job: dict[str, Any], name: str) -> bool:
    """Whether the pod reads the Secret ``name``: a volume of it, or an env var from it."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    if any((v.get("secret") or {}).get("secretName") == name for v in pod.get("volumes") or []):
        return True
    for container in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
        for item in container.get("env") or []:
            ref = (item.get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") == name:
                return True
    return False


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
    # Absolute: a Job's processes run in its work/ directory, so a relative path handed
    # to them (the message file, JOBRUNNER_LOCAL_JOB_DIR) would point nowhere (the
    # default state directory, .jobrunner, is relative).
    jobdir = JobDir(Path(argv[0]).absolute())
    fd = open_private(jobdir.path / LOCK_FILE, os.O_RDWR)
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
