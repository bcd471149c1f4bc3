"""The local executor held to the kubelet: one corpus of Jobs, run by both, compared.

Each case of ``CORPUS`` is one Job spec. It is created, as written, (a) on the local
executor (``LocalJobClient``, as ``run --local`` runs a Job) and (b) as a Job on the
stack's real node (jobrunner-node-0: kubelet, containerd, runc) through the API server,
both at once. What each did is then compared: the Job's conditions (type and reason),
``status.failed`` and ``status.succeeded``, how many pods (attempts) it took, each
attempt's container exit codes and each container's output. A difference fails the case,
unless the case names its entry in ``compat.KUBELET_DIFFERENCES`` (the documented table of
what the local executor does not do; ``validate --local`` refuses or warns about it): then
the case asserts that the local executor refuses the Job or warns as that entry says.

Everything a case prints must be the same on a kubelet and on this machine: no host
names, no times, no pod names.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from jobrunner.core.protocols import ApiRejected
from jobrunner.local import compat
from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from jobrunner.tracking.tracker import outcome_of
from tests.integration.realnode import (
    PodRecorder,
    RealNode,
    on_real_node,
    pod_log,
    pods_of_job,
    recording_pods,
)

pytestmark = [pytest.mark.kube, pytest.mark.real_node]

LOCAL_WITHIN = 120.0
"""Seconds a local Job may take (the slowest case retries twice and waits a grace)."""
REAL_WITHIN = 300.0
"""Seconds a real Job may take: the Job controller backs off 10 s, 20 s, … between
attempts, and the node is shared with the rest of the suite."""

IGNORES_TERM = "trap '' TERM; echo started; while :; do sleep 1; done"
"""A container that ignores SIGTERM (its children inherit the ignored signal, so the
local process group does too): only the SIGKILL after the grace period ends it."""
KILLED_CHILD = "exec 2>&1; sh -c 'kill -9 $$$$'; code=$?; echo child ended $code; exit $code"
"""The shell says ``Killed`` on stderr: one stream, so its order is the same on both."""
SIDECAR = (
    "trap 'echo sidecar stopped; exit 0' TERM; sleep 1; echo up > $SHARED/up; "
    "echo sidecar up; while :; do sleep 1 & wait $!; done"
)


@dataclass(frozen=True)
class Case:
    name: str
    containers: list[dict[str, Any]]
    job: dict[str, Any] = field(default_factory=dict)
    pod: dict[str, Any] = field(default_factory=dict)
    secret: dict[str, str] | None = None
    """stringData of the Job's message Secret (``<job>-message``), made on both sides."""
    compare: frozenset[str] = frozenset({"conditions", "counts", "codes", "output"})
    difference: str | None = None
    """The key of ``compat.KUBELET_DIFFERENCES`` this case shows: the local executor
    refuses the Job, or ``validate --local`` warns about it (``warned``)."""
    warned: bool = False
    on_kubelet: dict[str, Any] | None = None
    """For a difference: what the real node does with the Job (``Run.view`` of
    ``compare``), asserted as well."""


def sh(name: str, script: str, **container: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **container}


def exit_on(action: str, *codes: int) -> dict[str, Any]:
    return {"action": action, "onExitCodes": {"operator": "In", "values": list(codes)}}


SHARED = {"volumes": [{"name": "shared", "emptyDir": {}}]}
SHARED_MOUNT = [{"name": "shared", "mountPath": "/shared"}]
SHARED_ENV = [{"name": "SHARED", "value": "/shared"}]
"""A mount path reaches a script through env (``$SHARED/file``): the local executor maps
it there, and not inside a script (``KUBELET_DIFFERENCES``)."""


def shared(name: str, script: str, **container: Any) -> dict[str, Any]:
    return sh(name, script, volumeMounts=SHARED_MOUNT, env=SHARED_ENV, **container)


CORPUS: list[Case] = [
    # stdout and stderr are two pipes on a kubelet, merged by when each line was read:
    # the lines are apart in time so that their order is the same on both sides.
    Case("exit-0", [sh("main", "echo hello; sleep 0.3; echo to stderr >&2; exit 0")]),
    Case("exit-1", [sh("main", "echo failing; exit 1")]),
    Case("exit-3-retried", [sh("main", "echo try; exit 3")], job={"backoffLimit": 2}),
    Case("exit-137", [sh("main", "echo exiting; exit 137")]),
    # `$$` is the kubelet's escape for `$`: a shell's own pid is written `$$$$`. The
    # container's shell is PID 1, which no signal from inside ends (KUBELET_DIFFERENCES
    # "process 1"): a child is killed, and its 137 is the container's.
    Case("killed-by-sigkill", [sh("main", KILLED_CHILD)]),
    Case(
        "deadline-with-grace",
        [sh("main", IGNORES_TERM)],
        job={"activeDeadlineSeconds": 4},
        pod={"terminationGracePeriodSeconds": 2},
        # The pod is deleted at the deadline: its log goes with it.
        compare=frozenset({"conditions", "counts", "codes"}),
    ),
    Case(
        "pod-failure-policy-fail-job",
        [sh("main", "echo fatal; exit 42")],
        job={
            "backoffLimit": 6,
            "podFailurePolicy": {"rules": [exit_on("Count", 1), exit_on("FailJob", 42)]},
        },
    ),
    Case(
        "pod-failure-policy-fail-job-on-137",
        [sh("main", KILLED_CHILD)],
        job={"backoffLimit": 6, "podFailurePolicy": {"rules": [exit_on("FailJob", 137)]}},
    ),
    Case(
        "pod-failure-policy-count",
        [sh("main", "echo counted; exit 5")],
        job={"backoffLimit": 1, "podFailurePolicy": {"rules": [exit_on("Count", 5)]}},
    ),
    Case(
        "pod-failure-policy-ignore",
        [sh("main", "echo ignored; exit 3")],
        # Ignored failures are retried without end: the deadline ends the Job. How many
        # attempts fit before it is a matter of timing (the two back off differently).
        job={
            "backoffLimit": 0,
            "activeDeadlineSeconds": 15,
            "podFailurePolicy": {"rules": [exit_on("Ignore", 3)]},
        },
        compare=frozenset({"conditions"}),
    ),
    Case(
        "init-containers",
        [shared("main", "cat $SHARED/from-init")],
        pod={
            **SHARED,
            "initContainers": [
                shared("first", "echo first > $SHARED/from-init"),
                shared("second", "echo second >> $SHARED/from-init; echo second ran"),
            ],
        },
    ),
    Case(
        "init-container-fails",
        [sh("main", "echo never")],
        pod={"initContainers": [sh("setup", "echo setup failed; exit 7")]},
    ),
    Case(
        "native-sidecar-startup-probe",
        [shared("main", "cat $SHARED/up; echo main done")],
        pod={
            **SHARED,
            "initContainers": [
                shared(
                    "sidecar",
                    SIDECAR,
                    restartPolicy="Always",
                    startupProbe={
                        "exec": {"command": ["cat", "/shared/up"]},
                        "periodSeconds": 1,
                        "failureThreshold": 30,
                    },
                )
            ],
        },
    ),
    Case(
        "env-and-expansion",
        [
            {
                "name": "main",
                "image": "busybox",
                "command": ["sh", "-c", 'echo "$0|$1|$2|$3|$4"; echo "B=$B C=$C D=$D"'],
                "args": ["$(A)", "$$(A)", "$(UNDEFINED)", "$(B)", "$$$(A)"],
                "env": [
                    {"name": "A", "value": "alpha"},
                    {"name": "B", "value": "$(A)-beta"},
                    {"name": "C", "value": "$(D)-before-d"},
                    {"name": "D", "value": "$$(A) $(NOT_SET)"},
                ],
            }
        ],
    ),
    Case(
        "message-secret-file",
        [
            {
                "name": "main",
                "image": "busybox",
                "command": ["cat", "/etc/message/body"],
                "volumeMounts": [{"name": "message", "mountPath": "/etc/message"}],
            }
        ],
        pod={"volumes": [{"name": "message", "secret": {"secretName": "{job}-message"}}]},
        secret={"body": "the message\nline two\n"},
    ),
    Case("working-dir-absolute", [sh("main", "pwd", workingDir="/tmp")]),
    Case(
        "working-dir-relative",
        [sh("main", "pwd", workingDir="tmp")],
        difference="workingDir",
        # runc refuses it too: StartError, "Cwd must be an absolute path", exit 128.
        compare=frozenset({"conditions", "codes"}),
        on_kubelet={
            "conditions": [
                ("FailureTarget", "BackoffLimitExceeded"),
                ("Failed", "BackoffLimitExceeded"),
            ],
            "codes": [{"main": 128}],
        },
    ),
    Case(
        "mount-path-in-a-script",
        [sh("main", "cat /shared/x", volumeMounts=SHARED_MOUNT)],
        pod=SHARED,
        difference="volumeMounts.mountPath in a script",
        warned=True,
    ),
]


@dataclass
class Run:
    """What one side did with a case's Job."""

    conditions: list[tuple[str, str]]
    failed: int
    succeeded: int
    codes: list[dict[str, int]]
    """Each attempt's exit codes by container (init containers that ran, then the main
    containers; native sidecars are stopped, not judged, and left out)."""
    output: list[dict[str, str]]
    """Each attempt's output by container (sidecars included)."""

    def view(self, compare: frozenset[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "conditions" in compare:
            out["conditions"] = self.conditions
        if "counts" in compare:
            out |= {"failed": self.failed, "succeeded": self.succeeded, "pods": len(self.codes)}
        if "codes" in compare:
            out["codes"] = self.codes
        if "output" in compare:
            out["output"] = self.output
        return out


def job_of(case: Case, *, namespace: str, node: RealNode) -> dict[str, Any]:
    name = f"d-{case.name}-{uuid.uuid4().hex[:5]}"[:63].rstrip("-")
    containers = copy.deepcopy(case.containers)
    pod = copy.deepcopy(case.pod)
    for container in pod.get("initContainers") or []:
        container["image"] = node.images[container.get("image", "busybox")]
        container.setdefault("imagePullPolicy", "Never")
    for volume in pod.get("volumes") or []:
        if "secret" in volume:
            volume["secret"]["secretName"] = volume["secret"]["secretName"].format(job=name)
    spec = on_real_node(node, containers, pod_spec=pod, **case.job)
    spec.setdefault("backoffLimit", 0)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def secret_of(case: Case, job: Mapping[str, Any]) -> dict[str, Any] | None:
    if case.secret is None:
        return None
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{meta['name']}-message", "namespace": meta["namespace"]},
        "type": "Opaque",
        "stringData": dict(case.secret),
    }


def _true_conditions(status: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        (str(c.get("type")), str(c.get("reason")))
        for c in status.get("conditions") or []
        if c.get("status") == "True"
    ]


def _sidecars(job: Mapping[str, Any]) -> set[str]:
    pod = job["spec"]["template"]["spec"]
    return {
        c["name"] for c in pod.get("initContainers") or [] if c.get("restartPolicy") == "Always"
    }


# ---------------------------------------------------------------- the local executor


async def run_locally(job: dict[str, Any], secret: dict[str, Any] | None, state: Path) -> Run:
    local = LocalJobClient(state, retry_seconds=0.2)
    meta = job["metadata"]
    try:
        await local.create_job(job, secret)
        end = time.monotonic() + LOCAL_WITHIN
        done: Mapping[str, Any] | None = None
        while time.monotonic() < end:
            done = await local.get_job(meta["namespace"], meta["name"])
            if done is not None and outcome_of(done) is not None:
                break
            await asyncio.sleep(0.2)
        assert done is not None, "the local Job is gone"
        assert outcome_of(done) is not None, (
            f"the local Job did not finish within {LOCAL_WITHIN:g} s: {done}"
        )
        status = done["status"]
        jobdir = JobDir(state / "jobs" / meta["namespace"] / meta["name"])
        codes, output = [], []
        for attempt in status.get("attempts") or []:
            n = attempt["attempt"]
            codes.append(dict(attempt.get("exitCodes") or {}))
            output.append(
                {
                    p.name.removeprefix(f"{n}-").removesuffix(".log"): p.read_text()
                    for p in sorted(jobdir.logs.glob(f"{n}-*.log"))
                }
            )
        return Run(
            conditions=_true_conditions(status),
            failed=int(status.get("failed") or 0),
            succeeded=int(status.get("succeeded") or 0),
            codes=codes,
            output=output,
        )
    finally:
        await local.delete_job(meta["namespace"], meta["name"])
        await local.close()


# ---------------------------------------------------------------- the real node


def _terminated(statuses: Any) -> dict[str, int]:
    return {
        s.name: int(s.state.terminated.exit_code)
        for s in statuses or []
        if s.state is not None and s.state.terminated is not None
    }


async def run_on_node(
    kube_api: client.ApiClient, job: dict[str, Any], secret: dict[str, Any] | None
) -> Run:
    with recording_pods(kube_api, job["metadata"]["namespace"]) as recorder:
        return await _run_on_node(kube_api, job, secret, recorder)


async def _run_on_node(
    kube_api: client.ApiClient,
    job: dict[str, Any],
    secret: dict[str, Any] | None,
    recorder: PodRecorder,
) -> Run:
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    batch = client.BatchV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    sidecars = _sidecars(job)
    created = await asyncio.to_thread(batch.create_namespaced_job, namespace, job)
    if secret is not None:
        secret = copy.deepcopy(secret)
        secret["metadata"]["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": name,
                "uid": created.metadata.uid,
            }
        ]
        await asyncio.to_thread(core.create_namespaced_secret, namespace, secret)
    # Each pod's last state and output, kept as it is seen: a pod deleted at the Job's
    # deadline is gone before the Job has its condition.
    seen: dict[str, tuple[str, dict[str, int], dict[str, str]]] = {}
    end = time.monotonic() + REAL_WITHIN
    status: Any = None
    while time.monotonic() < end:
        for pod in await asyncio.to_thread(pods_of_job, kube_api, namespace, name):
            pod_name = pod.metadata.name
            codes = _terminated(pod.status.init_container_statuses)
            codes = {k: v for k, v in codes.items() if k not in sidecars}
            codes |= _terminated(pod.status.container_statuses)
            if pod.status.phase not in ("Succeeded", "Failed") and pod_name in seen:
                continue
            output = dict(seen[pod_name][2]) if pod_name in seen else {}
            if pod.status.phase in ("Succeeded", "Failed"):
                for c in [*(pod.spec.init_containers or []), *pod.spec.containers]:
                    every = [
                        *(pod.status.init_container_statuses or []),
                        *(pod.status.container_statuses or []),
                    ]
                    state = next((s for s in every if s.name == c.name), None)
                    if state is None or (state.state.waiting and not state.last_state.terminated):
                        continue  # never started (its init container failed)
                    try:
                        output[c.name] = await pod_log(kube_api, namespace, pod_name, c.name)
                    except client.ApiException as exc:
                        if exc.status != 404:
                            raise
            stamp = pod.metadata.creation_timestamp.isoformat()
            seen[pod_name] = (stamp, codes, output)
        current = await asyncio.to_thread(batch.read_namespaced_job_status, name, namespace)
        status = kube_api.sanitize_for_serialization(current.status)
        finished = status.get("completionTime") or any(
            c["type"] in ("Complete", "Failed") and c["status"] == "True"
            for c in status.get("conditions") or []
        )
        if finished and not status.get("active") and not status.get("terminating"):
            break
        await asyncio.sleep(1.0)
    else:
        raise AssertionError(f"Job {name} did not finish within {REAL_WITHIN:g} s: {status}")
    # A pod stopped at the deadline may be deleted between two polls: its containers'
    # ends are in the watch's record (main containers; a failed init container's pod
    # is not deleted).
    for pod_name in recorder.states:
        first = min(recorder.seen_at[pod_name])
        stamp, codes, output = seen.get(pod_name, (f"~{first:020.6f}", {}, {}))
        for c in job["spec"]["template"]["spec"]["containers"]:
            ended = recorder.terminated(pod_name, c["name"])
            if c["name"] not in codes and ended is not None:
                codes[c["name"]] = int(ended["exitCode"])
        seen[pod_name] = (stamp, codes, output)
    attempts = sorted(seen.values())
    return Run(
        conditions=_true_conditions(status),
        failed=int(status.get("failed") or 0),
        succeeded=int(status.get("succeeded") or 0),
        codes=[codes for _, codes, _ in attempts],
        output=[output for _, _, output in attempts],
    )


# ---------------------------------------------------------------- the comparison


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
async def test_the_local_executor_does_what_the_kubelet_does(
    case: Case,
    kube_api: client.ApiClient,
    namespace: str,
    real_node: RealNode,
    tmp_path: Path,
) -> None:
    job = job_of(case, namespace=namespace, node=real_node)
    secret = secret_of(case, job)
    if case.difference is not None:
        entry = compat.KUBELET_DIFFERENCES[case.difference]
        if case.warned:
            warnings = compat.spec_warnings(job["spec"])
            assert warnings, (entry, job)
            assert all(compat.EXECUTOR in w.text for w in warnings), warnings
            return
        with pytest.raises(ApiRejected) as refused:
            await LocalJobClient(tmp_path / "state").create_job(job, secret)
        assert compat.EXECUTOR in str(refused.value), refused.value
        problems = compat.spec_problems(job["spec"], job_name=None)
        assert any(case.difference in p.field("spec") for p in problems), (entry, problems)
        if case.on_kubelet is not None:
            real = await run_on_node(kube_api, copy.deepcopy(job), secret)
            assert real.view(case.compare) == case.on_kubelet, case.name
        return
    local, real = await asyncio.gather(
        run_locally(copy.deepcopy(job), secret, tmp_path / "state"),
        run_on_node(kube_api, copy.deepcopy(job), secret),
    )
    assert local.view(case.compare) == real.view(case.compare), case.name
