"""What the local executor does with every field of a Job, decided before the Job exists.

The local executor stands in for the Job controller and the kubelet (see ``supervisor``).
Where it cannot do what they would, the Job is refused, naming the field and what to do,
never run as something else: a ``podFailurePolicy`` ignored, four indexed completions
run as one process, a suspended Job started. The same rules run at three moments:

* when a dispatcher starts (``run --local``) and at ``validate --local``, on the Job
  template as written (``check_template``; a Jinja2 expression may stand for any scalar,
  and a rule that needs a value it stands for waits for the rendered Job);
* at create, on the rendered Job (``refusal``; the message is dead-lettered
  ``ApiRejected`` with the text, which always starts ``the local executor``).

Every field of the batch/v1 JobSpec (``schemas/batch-v1-job.json``, from the API server
itself) is in ``JOB_SPEC_FIELDS``: honoured, honoured for some values only, or refused.
A test compares the list with the schema, so a field a newer API server adds is decided
here before a Job can carry it. The Job controller's rules come from kubernetes/kubernetes
``pkg/controller/job`` (``job_controller.go``, ``pod_failure_policy.go``,
``indexed_job_utils.go``) and ``pkg/apis/batch/validation``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from jobrunner.core import limits
from jobrunner.core.naming import message_secret_name
from jobrunner.manifest.jobschema import SchemaProblem, is_templated

if TYPE_CHECKING:
    from jobrunner.rendering.renderer import JobTemplate

logger = logging.getLogger(__name__)
EXECUTOR = "the local executor"

JOB_SPEC_FIELDS: dict[str, str] = {
    "activeDeadlineSeconds": "honoured: DeadlineExceeded, processes stopped",
    "backoffLimit": "honoured (default 6): BackoffLimitExceeded",
    "backoffLimitPerIndex": "refused",
    "completionMode": "honoured: Indexed gets JOB_COMPLETION_INDEX=0 and its annotation",
    "completions": "honoured when 1 (the default); more are refused",
    "managedBy": "honoured when kubernetes.io/job-controller; another controller refused",
    "manualSelector": "refused when true",
    "maxFailedIndexes": "refused",
    "parallelism": "honoured when the Job has one completion; 0 refused",
    "podFailurePolicy": "honoured: FailJob, Ignore and Count on exit codes and conditions",
    "podReplacementPolicy": "honoured: an attempt's processes have ended before the next",
    "scheduling": "refused",
    "selector": "refused",
    "successPolicy": "refused",
    "suspend": "honoured when false; true refused",
    "template": "honoured (its pod: see check_pod)",
    "ttlSecondsAfterFinished": "honoured: the Job is deleted once the finalizer allows",
}
"""Each batch/v1 JobSpec field and what the local executor does with it."""

KUBELET_DIFFERENCES: dict[str, str] = {
    "workingDir": (
        "refused unless an absolute directory of this machine: a runtime makes a missing "
        "one in the image's filesystem; the local executor runs the process on this machine "
        "and will not run it elsewhere instead. A relative one fails on a kubelet too (runc: "
        "StartError, exit 128, 'Cwd must be an absolute path')"
    ),
    "volumeMounts.mountPath in a script": (
        "warned: a mount path is mapped to the volume's directory where a command or args "
        "item, or an env value, starts with it; a path inside a script (`sh -c 'cat "
        "/data/x'`) is this machine's. Pass the path in env (`DATA=/data`, then `$DATA/x`)"
    ),
    "image": (
        "warned at create: the image is not used, its command runs this machine's programs "
        "(`sh` is this machine's shell: an error's words and exit code may differ)"
    ),
    "process 1": (
        "not imitated: a container's first process is PID 1, which a signal it has no "
        "handler for does not end (SIGTERM at a deadline, then SIGKILL after the grace: "
        "137); locally that SIGTERM ends it (143). Trap SIGTERM to end the same way on both"
    ),
    "probe address": (
        "said: a tcpSocket or httpGet probe without host connects to 127.0.0.1 here, where "
        "the kubelet connects to the pod's IP; a server on 127.0.0.1 alone passes locally "
        "and is never started on a cluster. Listen on every address"
    ),
    "terminationMessagePath": (
        "honoured as the kubelet does (the file's first 4096 bytes become the container's "
        "termination message, FallbackToLogsOnError takes the log's last 80 lines / 2048 "
        "bytes of a failed container), the path mapped like a mount path: where a command "
        "or args item, or an env value, starts with it (`RESULT=/dev/termination-log`, "
        "then `> $RESULT`); a path inside a script is this machine's"
    ),
    "stdout and stderr": (
        "not imitated: the kubelet keeps the two streams apart and merges them by when each "
        "line was read; locally they are one file, in the order written"
    ),
}
"""What the local executor does not do as the kubelet does, found by running one corpus
of Jobs on both (tests/integration/test_local_vs_kubelet.py), and what ``validate
--local`` and ``run --local`` do about each (README: "Where the local executor and the
kubelet differ"). Everything else the corpus runs is the same on both: conditions,
reasons, attempts, exit codes and output."""

JOB_CONTROLLER = "kubernetes.io/job-controller"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
"""The annotation (and label) the Job controller puts on an Indexed Job's pods, and the
source of their ``JOB_COMPLETION_INDEX`` (indexed_job_utils.go)."""

POD_CONDITIONS = ("PodScheduled", "Initialized", "ContainersReady", "Ready", "DisruptionTarget")
"""The pod conditions a ``podFailurePolicy`` rule may name locally: a local attempt's
failed pod has ``PodScheduled`` True, ``Initialized`` True once its init containers
succeeded, ``ContainersReady`` and ``Ready`` False, and ``DisruptionTarget`` True only
when it was lost with its supervisor (as a pod lost with its node is, by the pod
garbage collector). Other conditions (readiness gates, ``PodReadyToStartContainers``)
have no local meaning and are refused."""

_POD_META = re.compile(r"metadata\.(labels|annotations)\['([^']*)'\]")
_FIELD_REFS = (
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "status.podIP",
    "status.hostIP",
)


def _set(value: Any) -> bool:
    """Whether a value as written is known now (not a Jinja2 expression)."""
    return value is not None and not is_templated(value)


def spec_problems(spec: Mapping[str, Any], *, job_name: str | None = None) -> list[SchemaProblem]:
    """What the local executor refuses in a JobSpec (paths relative to it). Values that
    are Jinja2 expressions are skipped: the rendered Job is checked again at create.
    ``job_name``: the rendered Job's name, for the rules that need it (which Secret is
    the message's)."""
    problems = list(_job_fields(spec))
    template = spec.get("template")
    pod = template.get("spec") if isinstance(template, Mapping) else None
    if isinstance(pod, Mapping):
        problems += [
            SchemaProblem(("template", "spec", *p.path), p.text)
            for p in pod_problems(pod, job_name=job_name)
        ]
    return problems


def _refuse(path: tuple[str | int, ...], text: str) -> SchemaProblem:
    return SchemaProblem(path, f"{EXECUTOR} {text}")


def _job_fields(spec: Mapping[str, Any]) -> Iterator[SchemaProblem]:
    """What the local executor refuses among the JobSpec's own fields (its pod is
    ``pod_problems``): fields it does not know, more than one pod, a Job it would not
    start, and pod failure policy rules it cannot honour."""
    for field in spec:
        if field not in JOB_SPEC_FIELDS:
            yield _refuse((field,), "does not know this Job field; run this Job on a cluster")
    yield from _pod_count_problems(spec)
    yield from _controller_problems(spec)
    yield from _pod_failure_policy_problems(spec.get("podFailurePolicy"))


def _pod_count_problems(spec: Mapping[str, Any]) -> Iterator[SchemaProblem]:
    """``completions`` and ``parallelism``: the local executor runs one pod per Job."""
    completions, parallelism = spec.get("completions"), spec.get("parallelism")
    if _set(completions) and completions != 1:
        yield _refuse(
            ("completions",),
            f"runs one pod per Job, so {completions} completions cannot be honoured; "
            "leave completions out (or 1), publish one message per piece of work, or run "
            "this Job on a cluster",
        )
    if _set(parallelism) and parallelism == 0:
        yield _refuse(
            ("parallelism",),
            "cannot honour parallelism 0: the Job controller would start no pod until it "
            "is raised, and nothing raises it locally; leave it out",
        )
    elif _set(parallelism) and parallelism != 1 and completions is None:
        yield _refuse(
            ("parallelism",),
            f"runs one pod per Job: parallelism {parallelism} without completions is a "
            "work queue of that many pods; leave parallelism out, or run this Job on a "
            "cluster",
        )


def _controller_problems(spec: Mapping[str, Any]) -> Iterator[SchemaProblem]:
    """What asks the Job controller for something the local executor does not do: wait
    (suspend), leave the Job to another controller, select pods, count indexes."""
    if spec.get("suspend") is True:
        yield _refuse(
            ("suspend",),
            "cannot run a suspended Job: the Job controller starts no pod until "
            "spec.suspend is false, and nothing resumes a local Job; leave suspend out",
        )
    managed_by = spec.get("managedBy")
    if _set(managed_by) and managed_by != JOB_CONTROLLER:
        yield _refuse(
            ("managedBy",),
            f"cannot run a Job managed by {managed_by!r}: the Job controller leaves it to "
            "that controller, which does not run here; leave managedBy out",
        )
    if spec.get("manualSelector") is True:
        yield _refuse(
            ("manualSelector",),
            "makes the Job's one pod itself; a manual selector has nothing to select: "
            "leave manualSelector and selector out",
        )
    for field, why in (
        ("selector", "makes the Job's one pod itself; leave selector out"),
        ("backoffLimitPerIndex", "runs one index; use backoffLimit"),
        ("maxFailedIndexes", "runs one index; use backoffLimit"),
        ("successPolicy", "runs one pod, whose success completes the Job; leave it out"),
        ("scheduling", "schedules no pod group; leave scheduling out, or use a cluster"),
    ):
        if spec.get(field) is not None:
            yield _refuse((field,), f"does not honour {field}: it {why}")


def _pod_failure_policy_problems(policy: Any) -> Iterator[SchemaProblem]:
    """Rules the local executor cannot honour: FailIndex, and conditions its pods never
    have (``POD_CONDITIONS``)."""
    rules = policy.get("rules") if isinstance(policy, Mapping) else None
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, Mapping):
            continue
        at = ("podFailurePolicy", "rules", i)
        if rule.get("action") == "FailIndex":
            yield _refuse(
                (*at, "action"),
                "does not honour FailIndex (it needs backoffLimitPerIndex); use FailJob",
            )
        for j, pattern in enumerate(rule.get("onPodConditions") or []):
            kind = pattern.get("type") if isinstance(pattern, Mapping) else None
            if _set(kind) and kind not in POD_CONDITIONS:
                yield _refuse(
                    (*at, "onPodConditions", j, "type"),
                    f"gives its pods no {kind!r} condition, so this rule could never "
                    f"match; it knows {', '.join(POD_CONDITIONS)}",
                )


def pod_problems(pod: Mapping[str, Any], *, job_name: str | None = None) -> list[SchemaProblem]:
    """What the local executor refuses in a Job's PodSpec (paths relative to it): what it
    cannot run (an image's entrypoint, a volume kind it has not) and what it would
    otherwise leave out unsaid (an env var from a Secret or ConfigMap it does not have,
    lifecycle hooks, probes that would restart a container)."""
    problems: list[SchemaProblem] = []

    def refuse(path: tuple[str | int, ...], text: str) -> None:
        problems.append(SchemaProblem(path, f"{EXECUTOR} {text}"))

    message_secret = message_secret_name(job_name) if job_name else None
    volume_names = {v.get("name") for v in pod.get("volumes") or [] if isinstance(v, Mapping)}
    for key in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(key) or []):
            mounts = container.get("volumeMounts") if isinstance(container, Mapping) else None
            for j, mount in enumerate(mounts if isinstance(mounts, list) else []):
                name = mount.get("name") if isinstance(mount, Mapping) else None
                if _set(name) and name not in volume_names and job_name is not None:
                    refuse(
                        (key, i, "volumeMounts", j, "name"),
                        f"has no volume {name!r} to mount: add it to "
                        "spec.template.spec.volumes, as Kubernetes requires",
                    )
    for i, volume in enumerate(pod.get("volumes") or []):
        if not isinstance(volume, Mapping):
            continue
        kinds = [k for k in volume if k != "name"]
        if "emptyDir" in kinds:
            continue
        if "secret" not in kinds:
            refuse(
                ("volumes", i),
                f"has no {' or '.join(kinds) or 'such'} volumes, only Secret (the Job's "
                "message) and emptyDir; run this template on a cluster",
            )
            continue
        name = (volume.get("secret") or {}).get("secretName")
        if _set(name) and (job_name is None or name != message_secret):
            refuse(
                ("volumes", i, "secret", "secretName"),
                f"has no Secret {name!r}: the only Secret it has is the Job's own message "
                "(messageDelivery mode file); run this template on a cluster",
            )
    for key in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(key) or []):
            if isinstance(container, Mapping):
                problems += [
                    SchemaProblem((key, i, *p.path), p.text)
                    for p in _container_problems(
                        container, init=key == "initContainers", message_secret=message_secret
                    )
                ]
    return problems


def _container_problems(
    container: Mapping[str, Any], *, init: bool, message_secret: str | None
) -> Iterator[SchemaProblem]:
    """What the local executor refuses in one container: where and what it runs, its
    probes and hooks, and where its environment comes from."""
    yield from _working_dir_problems(container)
    yield from _probe_port_problems(container)
    if not container.get("command"):
        yield _refuse(
            ("command",),
            "runs a container's command and args, not its image's entrypoint; add "
            "`command:` to the Job template",
        )
    yield from _probe_problems(container, init=init)
    if container.get("lifecycle"):
        yield _refuse(
            ("lifecycle",),
            "runs no postStart or preStop hooks; leave lifecycle out of the Job template",
        )
    yield from _env_problems(container, message_secret=message_secret)


def _working_dir_problems(container: Mapping[str, Any]) -> Iterator[SchemaProblem]:
    working = container.get("workingDir")
    if _set(working) and not (os.path.isabs(str(working)) and os.path.isdir(str(working))):
        # A container runtime makes a missing workingDir; the local executor runs the
        # process in it on this machine, and will not run it somewhere else instead.
        yield _refuse(
            ("workingDir",),
            f"runs the container in its workingDir on this machine, and {working!r} "
            + (
                "is not an absolute path"
                if not os.path.isabs(str(working))
                else "does not exist here"
            )
            + "; give a directory of this machine, or leave workingDir out",
        )


def _probe_port_problems(container: Mapping[str, Any]) -> Iterator[SchemaProblem]:
    """A startup or readiness probe's port named but not among the container's ports."""
    ports = {p.get("name") for p in container.get("ports") or [] if isinstance(p, Mapping)}
    for kind in ("startupProbe", "readinessProbe"):
        probe = container.get(kind)
        for how in ("tcpSocket", "httpGet"):
            port = (probe.get(how) or {}).get("port") if isinstance(probe, Mapping) else None
            named = isinstance(port, str) and not port.isdigit() and not is_templated(port)
            if named and port not in ports:
                yield _refuse(
                    (kind, how, "port"),
                    f"finds no port named {port!r} in this container's ports; name it there "
                    "or give the number",
                )


def _probe_problems(container: Mapping[str, Any], *, init: bool) -> Iterator[SchemaProblem]:
    """Probes the local executor does not run: a native sidecar's startup and readiness
    probes gate the next container (tcpSocket, httpGet and exec); a container's
    readiness probe never matters to a Job; every other probe would restart the
    container on a cluster."""
    sidecar = init and container.get("restartPolicy") == "Always"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe:
            continue
        if sidecar and kind != "livenessProbe":
            if not any(k in probe for k in ("tcpSocket", "httpGet", "exec")):
                yield _refuse((kind,), "runs tcpSocket, httpGet and exec probes only")
            continue
        if kind == "readinessProbe" and not init:
            continue  # readiness steers a Service's endpoints, never a Job's outcome
        yield _refuse(
            (kind,),
            f"does not run a {'sidecar' if sidecar else 'container'}'s {kind}, which on a "
            "cluster restarts the container when it fails; leave it out of the Job template",
        )


def _env_problems(
    container: Mapping[str, Any], *, message_secret: str | None
) -> Iterator[SchemaProblem]:
    """Environment from what the local executor does not have: ConfigMaps, Secrets other
    than the Job's message, fields it cannot give."""
    for j, source in enumerate(container.get("envFrom") or []):
        if isinstance(source, Mapping) and not _optional(source):
            yield _refuse(
                ("envFrom", j),
                "has no ConfigMaps or Secrets to take env from (only the Job's message); "
                "give the variables in env, or run this template on a cluster",
            )
    for j, item in enumerate(container.get("env") or []):
        source = item.get("valueFrom") if isinstance(item, Mapping) else None
        if isinstance(source, Mapping):
            yield from _value_from_problems(
                source, at=("env", j, "valueFrom"), message_secret=message_secret
            )


def _value_from_problems(
    source: Mapping[str, Any], *, at: tuple[str | int, ...], message_secret: str | None
) -> Iterator[SchemaProblem]:
    ref = source.get("secretKeyRef")
    if isinstance(ref, Mapping):
        name = ref.get("name")
        if _set(name) and name != message_secret and not ref.get("optional"):
            yield _refuse(
                (*at, "secretKeyRef", "name"),
                f"has no Secret {name!r}: the only Secret it has is the Job's own "
                "message; give the value in env, or run this template on a cluster",
            )
    elif "configMapKeyRef" in source:
        if not (source.get("configMapKeyRef") or {}).get("optional"):
            yield _refuse(
                (*at, "configMapKeyRef"),
                "has no ConfigMaps; give the value in env, or run this template on a cluster",
            )
    elif "fieldRef" in source:
        path = (source.get("fieldRef") or {}).get("fieldPath")
        if _set(path) and not _known_field(str(path)):
            yield _refuse(
                (*at, "fieldRef", "fieldPath"),
                f"cannot give {path!r}; it gives {', '.join(_FIELD_REFS)} and "
                "metadata.labels['...'] and metadata.annotations['...']",
            )
    elif source:
        kinds = ", ".join(sorted(source))
        yield _refuse(at, f"cannot give env from {kinds}; give the value in env")


def _optional(source: Mapping[str, Any]) -> bool:
    refs = [source.get(k) for k in ("configMapRef", "secretRef")]
    return all(isinstance(r, Mapping) and r.get("optional") for r in refs if r is not None)


def _known_field(path: str) -> bool:
    return path in _FIELD_REFS or _POD_META.fullmatch(path) is not None


def spec_warnings(spec: Mapping[str, Any]) -> list[SchemaProblem]:
    """What the local executor runs, but not as a kubelet would (``KUBELET_DIFFERENCES``),
    that a Job template shows: a volume's mount path written inside a script, where it is
    this machine's path and not the volume. Paths relative to the JobSpec."""
    template = spec.get("template")
    pod = template.get("spec") if isinstance(template, Mapping) else None
    if not isinstance(pod, Mapping):
        return []
    warnings = []
    for key in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(key) or []):
            if not isinstance(container, Mapping):
                continue
            mounts = [
                str(m["mountPath"])
                for m in container.get("volumeMounts") or []
                if isinstance(m, Mapping) and _set(m.get("mountPath"))
            ]
            for field in ("command", "args"):
                items = container.get(field)
                for j, item in enumerate(items if isinstance(items, list) else []):
                    text = str(item)
                    inside = [m for m in mounts if m in text and not text.startswith(m)]
                    for mount in inside:
                        warnings.append(
                            SchemaProblem(
                                ("template", "spec", key, i, field, j),
                                f"{EXECUTOR} maps mount path {mount} only where an item "
                                "starts with it: inside this script it is this machine's "
                                f"{mount}, not the volume; pass it in env (`DATA={mount}`, then "
                                "`$DATA/file`), as a command item, or run on a cluster",
                            )
                        )
    return warnings


def pod_metadata(job: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The labels and annotations of the Job's local pod: its template's, and those the
    Job controller adds (job_controller.go: the Job's name and uid as
    ``batch.kubernetes.io/job-name`` and ``controller-uid``, with and without the
    prefix; an Indexed Job's index as label and annotation)."""
    meta = job.get("metadata") or {}
    template = (job.get("spec") or {}).get("template") or {}
    pod = template.get("metadata") or {}
    name, uid = str(meta.get("name", "")), str(meta.get("uid", ""))
    labels = {str(k): str(v) for k, v in (pod.get("labels") or {}).items()}
    annotations = {str(k): str(v) for k, v in (pod.get("annotations") or {}).items()}
    for prefix in ("batch.kubernetes.io/", ""):
        labels |= {f"{prefix}job-name": name, f"{prefix}controller-uid": uid}
    if indexed(job):
        labels[COMPLETION_INDEX] = annotations[COMPLETION_INDEX] = "0"
    return {"labels": labels, "annotations": annotations}


def field_ref(path: str, *, pod_name: str, job: Mapping[str, Any]) -> str | None:
    """The value of a ``fieldRef`` for the local pod ``pod_name`` of ``job`` (None for a
    path ``pod_problems`` refuses). This machine is the node, at 127.0.0.1; a label or
    annotation the pod does not have is empty, as the kubelet gives it."""
    meta = job.get("metadata") or {}
    values = {
        "metadata.name": pod_name,
        "metadata.namespace": str(meta.get("namespace", "default")),
        "spec.nodeName": "localhost",
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    found = _POD_META.fullmatch(path)
    if found is not None:
        return pod_metadata(job)[found.group(1)].get(found.group(2), "")
    return values.get(path)


def indexed(job: Mapping[str, Any]) -> bool:
    return (job.get("spec") or {}).get("completionMode") == "Indexed"


def refusal(job: Mapping[str, Any]) -> str | None:
    """Why the local executor refuses this rendered Job (fields named from ``spec``), or
    None. Checked at create, so the message is dead-lettered with the reason instead of
    a Job failing obscurely later."""
    spec = job.get("spec") or {}
    name = (job.get("metadata") or {}).get("name")
    problems = spec_problems(spec, job_name=str(name) if name else None)
    if not problems:
        return None
    return "; ".join(f"{p.field('spec')}: {p.text}" for p in problems[:5])


def unrunnable(job: Mapping[str, Any]) -> str | None:
    """Why the local executor cannot run this Job, checked at create time so the message
    is dead-lettered with the reason instead of a Job failing obscurely later: a name
    that cannot be a file name, then every rule of ``compat``."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    return _file_names_problem(pod) or refusal(job)


def _file_names_problem(pod: Mapping[str, Any]) -> str | None:
    """Container and volume names become file names in the Job's directory (``logs/
    <attempt>-<container>.log``, ``volumes/<volume>/``). The API server refuses any that
    is not a DNS-1123 label (``ValidateContainers``, ``ValidateVolumes``); so does the
    local executor, so that a name rendered from a message can never reach a file
    outside the Job's directory."""
    for key in ("initContainers", "containers", "volumes"):
        for i, item in enumerate(pod.get(key) or []):
            name = item.get("name") if isinstance(item, Mapping) else None
            if name is None:
                continue  # jobschema says it is required
            problem = limits.dns1123_label_problem(str(name), "it")
            if problem:
                return (
                    f"spec.template.spec.{key}[{i}].name: {problem}, as Kubernetes requires "
                    f"(and {EXECUTOR} makes it a file name)"
                )
    return None


def check_template(template: JobTemplate) -> None:
    """ManifestError listing what the local executor refuses in a Job template as
    written, each with its file, line and field: said when a dispatcher starts and at
    ``validate --local``, before any message."""
    # Without a Job name no Secret written in the template is the message's: that one
    # is named from the Job (``<job>-message``), and jobrunner adds its volume itself.
    from jobrunner.manifest.scaledjob import ManifestError  # not in a supervisor: it runs Jobs only

    for warning in spec_warnings(template.spec):
        logger.warning("%s: %s", template.where(warning.path), warning.text)
    problems = spec_problems(template.spec, job_name=None)
    if problems:
        lines = [f"  {template.where(p.path)}: {p.text}" for p in problems]
        raise ManifestError(f"{EXECUTOR} cannot run this Job template\n" + "\n".join(lines))
