"""The local executor against the Job controller: what a Job's fields mean on a cluster
they mean here, or the Job is refused before it runs, naming the field (never a Job that
quietly runs something else). And every path a Job is handed is absolute, whatever the
state directory and the container's ``workingDir``."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobrunner.core.protocols import ApiRejected
from jobrunner.local import compat
from jobrunner.local.client import LocalJobClient
from jobrunner.local.jobdir import JobDir
from jobrunner.manifest import jobschema
from jobrunner.tracking.tracker import outcome_of
from tests.helpers import eventually
from tests.local.conftest import ManifestFactory
from tests.local.test_local_executor import finished, logs, render

SHOW_PATHS = (
    "import json, os; keys = ['JOBRUNNER_MESSAGE_FILE', 'JOBRUNNER_LOCAL_JOB_DIR', 'DATA'];"
    "print(json.dumps({k: os.environ[k] for k in keys} | {'cwd': os.getcwd(),"
    " 'message': open(os.environ['JOBRUNNER_MESSAGE_FILE']).read()}))"
)


async def test_every_path_a_job_is_handed_is_absolute_with_a_relative_state_dir(
    tmp_path: Path, manifest: ManifestFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default state directory is relative (.jobrunner) and a container may set its
    # own workingDir: a relative path handed to it would point into that directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    path = manifest(
        SHOW_PATHS,
        delivery={"mode": "file"},
        container={
            "workingDir": str(elsewhere),
            "volumeMounts": [{"name": "scratch", "mountPath": "/data"}],
            "env": [{"name": "DATA", "value": "/data/out"}],
        },
    )
    job, secret = render(path, b'{"n": 1}')
    job["spec"]["template"]["spec"].setdefault("volumes", []).append(
        {"name": "scratch", "emptyDir": {}}
    )
    client = LocalJobClient(Path(".jobrunner"), retry_seconds=0.1)
    try:
        await client.create_job(job, secret)
        done = await finished(client, job)
        shown = logs(tmp_path / ".jobrunner", job)
        assert outcome_of(done).succeeded, shown  # type: ignore[union-attr]
        seen: dict[str, Any] = json.loads(shown["1-main.log"])
        assert seen.pop("message") == '{"n": 1}'
        assert seen.pop("cwd") == str(elsewhere)
        for key, value in seen.items():
            assert os.path.isabs(value), (key, value)
            assert value.startswith(str(tmp_path / ".jobrunner" / "jobs")), (key, value)
    finally:
        await client.delete_job("default", job["metadata"]["name"])
        await client.release_job("default", job["metadata"]["name"], {})


# ---------------------------------------------------------------- every JobSpec field


def test_every_field_of_the_job_spec_is_honoured_or_refused() -> None:
    # A field a newer API server adds fails here until it is decided in compat.
    schema = jobschema._schema()["types"][jobschema.JOB_SPEC]["properties"]
    assert set(compat.JOB_SPEC_FIELDS) == set(schema)


# ---------------------------------------------------------------- podFailurePolicy

FAIL_ONCE_WITH_3_THEN_SUCCEED = (
    "import os, sys, pathlib; p = pathlib.Path(os.environ['RUNS_FILE']);"
    "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1));"
    "sys.exit(3 if n < 2 else 0)"
)


def policy(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"podFailurePolicy": {"rules": list(rules)}}


async def test_a_fail_job_rule_fails_the_job_at_once_with_reason_pod_failure_policy(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    rule = {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}
    path = manifest(
        "import sys; print('no'); sys.exit(42)",
        backoff_limit=6,
        job_spec=policy(
            {"action": "Count", "onExitCodes": {"operator": "In", "values": [1]}}, rule
        ),
    )
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(path, b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)
    name = job["metadata"]["name"]
    assert [(c["type"], c["reason"]) for c in done["status"]["conditions"]] == [
        ("FailureTarget", "PodFailurePolicy"),
        ("Failed", "PodFailurePolicy"),
    ]
    message = done["status"]["conditions"][1]["message"]
    assert message.startswith(
        f"Container main for pod default/{name}-1 failed with exit code 42 matching FailJob "
        "rule at index 1"
    )
    assert "last lines of main: no" in message
    assert done["status"]["failed"] == 1
    assert len(done["status"]["attempts"]) == 1


async def test_an_ignore_rule_does_not_count_the_failure_towards_the_backoff_limit(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    ignore = {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [3]}}
    path = manifest(FAIL_ONCE_WITH_3_THEN_SUCCEED, backoff_limit=0, job_spec=policy(ignore))
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(path, b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)
    assert outcome_of(done).succeeded, done["status"]  # type: ignore[union-attr]
    assert done["status"]["failed"] == 0
    assert [a["exitCodes"] for a in done["status"]["attempts"]] == [{"main": 3}] * 2 + [{"main": 0}]
    assert (
        "not counted: podFailurePolicy rule 0 is Ignore" in done["status"]["attempts"][0]["problem"]
    )


@pytest.mark.parametrize(
    "rule",
    [
        {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [3]}},
        {
            "action": "FailJob",
            "onExitCodes": {"operator": "In", "values": [3], "containerName": "prep"},
        },
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Count", "onExitCodes": {"operator": "In", "values": [3]}},
    ],
    ids=["exit-code-not-in", "another-container", "no-disruption", "count"],
)
async def test_a_failure_no_rule_takes_is_counted_as_without_a_policy(
    state_dir: Path, manifest: ManifestFactory, rule: dict[str, Any]
) -> None:
    path = manifest("import sys; sys.exit(3)", backoff_limit=1, job_spec=policy(rule))
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["jobTargetRef"]["template"]["spec"]["initContainers"] = [
        {"name": "prep", "image": "x", "command": [sys.executable, "-c", "pass"]}
    ]
    path.write_text(yaml.safe_dump(doc))
    job, secret = render(path, b"{}")
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    await client.create_job(job, secret)
    done = await finished(client, job)
    assert outcome_of(done).reason == "BackoffLimitExceeded"  # type: ignore[union-attr]
    assert done["status"]["failed"] == 2


async def test_a_failed_pod_matches_rules_on_its_conditions(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    # A failed pod is not Ready, on a cluster and here.
    rule = {"action": "FailJob", "onPodConditions": [{"type": "Ready", "status": "False"}]}
    path = manifest("import sys; sys.exit(3)", backoff_limit=5, job_spec=policy(rule))
    job, secret = render(path, b"{}")
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    await client.create_job(job, secret)
    done = await finished(client, job)
    condition = done["status"]["conditions"][-1]
    assert condition["reason"] == "PodFailurePolicy"
    assert condition["message"].startswith(
        f"Pod default/{job['metadata']['name']}-1 has condition Ready matching FailJob rule at "
        "index 0"
    )


async def test_a_pod_lost_with_its_supervisor_is_a_disruption_an_ignore_rule_takes(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    rule = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    path = manifest("import time; time.sleep(1.5)", backoff_limit=0, job_spec=policy(rule))
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(path, b"{}")
    await client.create_job(job, secret)
    jobdir = JobDir(state_dir / "jobs" / "default" / job["metadata"]["name"])

    async def running() -> bool:
        return bool(jobdir.status().get("active")) and jobdir.supervised()

    await eventually(running, within=10)
    pid = jobdir.supervisor_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def orphaned() -> bool:
        return not jobdir.supervised()

    await eventually(orphaned, within=5)
    fresh = LocalJobClient(state_dir, retry_seconds=0.1)
    await fresh.list_jobs("default", "app.kubernetes.io/managed-by=jobrunner")
    done = await finished(fresh, job)
    # backoffLimit 0: without the rule the lost attempt would have failed the Job.
    assert outcome_of(done).succeeded, done["status"]  # type: ignore[union-attr]
    assert done["status"]["failed"] == 0


# ---------------------------------------------------------------- Indexed, parallelism

SHOW_INDEX = (
    "import json, os; print(json.dumps({k: os.environ.get(k) for k in"
    " ['JOB_COMPLETION_INDEX', 'HOSTNAME', 'FROM_ANNOTATION', 'FROM_LABEL', 'ARG']}))"
)


async def test_an_indexed_job_gets_its_completion_index_as_the_job_controller_gives_it(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    ref = "metadata.{}['batch.kubernetes.io/job-completion-index']"
    env = [
        {
            "name": "FROM_ANNOTATION",
            "valueFrom": {"fieldRef": {"fieldPath": ref.format("annotations")}},
        },
        {"name": "FROM_LABEL", "valueFrom": {"fieldRef": {"fieldPath": ref.format("labels")}}},
    ]
    path = manifest(
        SHOW_INDEX + "; import sys; print(sys.argv[1])",
        job_spec={"completions": 1, "parallelism": 3, "completionMode": "Indexed"},
        container={"env": env, "args": ["index $(JOB_COMPLETION_INDEX)"]},
    )
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(path, b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)
    shown = logs(state_dir, job)["1-main.log"].splitlines()
    assert outcome_of(done).succeeded, shown  # type: ignore[union-attr]
    assert json.loads(shown[0]) == {
        "JOB_COMPLETION_INDEX": "0",
        "HOSTNAME": f"{job['metadata']['name']}-0",
        "FROM_ANNOTATION": "0",
        "FROM_LABEL": "0",
        "ARG": None,
    }
    assert shown[1] == "index 0"


@pytest.mark.parametrize(
    ("script", "conditions"),
    [
        (
            "pass",
            [("SuccessCriteriaMet", "CompletionsReached"), ("Complete", "CompletionsReached")],
        ),
        (
            "raise SystemExit(1)",
            [("FailureTarget", "BackoffLimitExceeded"), ("Failed", "BackoffLimitExceeded")],
        ),
    ],
)
async def test_a_finished_job_has_the_interim_condition_before_the_terminal_one(
    state_dir: Path, manifest: ManifestFactory, script: str, conditions: list[tuple[str, str]]
) -> None:
    # As the stack's API server (v1.37) shows them: SuccessCriteriaMet before Complete,
    # FailureTarget before Failed, with the same reason.
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(manifest(script), b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)
    assert [(c["type"], c["reason"]) for c in done["status"]["conditions"]] == conditions


async def test_a_non_indexed_job_has_no_completion_index(
    state_dir: Path, manifest: ManifestFactory
) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(manifest(SHOW_INDEX), b"{}")
    await client.create_job(job, secret)
    await finished(client, job)
    assert json.loads(logs(state_dir, job)["1-main.log"])["JOB_COMPLETION_INDEX"] is None


# ---------------------------------------------------------------- emptyDir per pod

WRITE_AND_FAIL_FIRST = (
    "import os, sys, pathlib; d = pathlib.Path('/scratch'.replace('/scratch', os.environ['D']));"
    "seen = sorted(p.name for p in d.iterdir()); print(seen);"
    "(d / os.environ['HOSTNAME']).touch(); sys.exit(0 if seen else 1)"
)


@pytest.mark.parametrize(("restart", "kept"), [("Never", False), ("OnFailure", True)])
async def test_an_empty_dir_is_empty_for_each_new_pod(
    state_dir: Path, manifest: ManifestFactory, restart: str, kept: bool
) -> None:
    path = manifest(
        WRITE_AND_FAIL_FIRST,
        backoff_limit=1,
        container={
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "env": [{"name": "D", "value": "/scratch"}],
        },
    )
    job, secret = render(path, b"{}")
    pod = job["spec"]["template"]["spec"]
    pod["volumes"] = [*(pod.get("volumes") or []), {"name": "scratch", "emptyDir": {}}]
    pod["restartPolicy"] = restart
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    await client.create_job(job, secret)
    done = await finished(client, job)
    second = logs(state_dir, job)["2-main.log"].strip()
    # The first attempt's pod left its hostname in the emptyDir: OnFailure reruns it.
    if kept:
        assert second == f"['{job['metadata']['name']}-1']"
        # ... and the same pod keeps its hostname.
        scratch = JobDir(state_dir / "jobs" / "default" / job["metadata"]["name"]).volumes
        assert sorted(p.name for p in (scratch / "scratch").iterdir()) == [
            f"{job['metadata']['name']}-1"
        ]
    # Never: the retry is a new pod, whose emptyDir is empty; OnFailure: the same pod.
    assert (second != "[]") is kept, second
    assert outcome_of(done).succeeded is kept  # type: ignore[union-attr]


# ---------------------------------------------------------------- refused, naming the field


def _container(job: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return container


REFUSED: list[tuple[str, Any, str]] = [
    ("completions", lambda j: j["spec"].update(completions=4), "spec.completions"),
    (
        "indexed-completions",
        lambda j: j["spec"].update(completions=4, completionMode="Indexed"),
        "spec.completions",
    ),
    ("parallelism-0", lambda j: j["spec"].update(parallelism=0), "spec.parallelism"),
    ("work-queue", lambda j: j["spec"].update(parallelism=2), "spec.parallelism"),
    ("suspend", lambda j: j["spec"].update(suspend=True), "spec.suspend"),
    (
        "per-index",
        lambda j: j["spec"].update(completions=1, completionMode="Indexed", backoffLimitPerIndex=1),
        "spec.backoffLimitPerIndex",
    ),
    (
        "max-failed-indexes",
        lambda j: j["spec"].update(
            completions=1, completionMode="Indexed", backoffLimitPerIndex=1, maxFailedIndexes=1
        ),
        "spec.maxFailedIndexes",
    ),
    (
        "success-policy",
        lambda j: j["spec"].update(
            completions=1,
            completionMode="Indexed",
            successPolicy={"rules": [{"succeededIndexes": "0"}]},
        ),
        "spec.successPolicy",
    ),
    (
        "managed-by",
        lambda j: j["spec"].update(managedBy="kueue.x-k8s.io/multikueue"),
        "spec.managedBy",
    ),
    (
        "selector",
        lambda j: j["spec"].update(manualSelector=True, selector={"matchLabels": {"a": "b"}}),
        "spec.manualSelector",
    ),
    (
        "condition-unknown-here",
        lambda j: j["spec"].update(
            policy(
                {"action": "Ignore", "onPodConditions": [{"type": "ConfigIssue", "status": "True"}]}
            )
        ),
        "spec.podFailurePolicy.rules[0].onPodConditions[0].type",
    ),
    ("no-command", lambda j: _container(j).pop("command"), "containers[0].command"),
    (
        "foreign-secret-volume",
        lambda j: j["spec"]["template"]["spec"].update(
            volumes=[{"name": "creds", "secret": {"secretName": "db"}}]
        ),
        "spec.template.spec.volumes[0].secret.secretName",
    ),
    (
        "host-path",
        lambda j: j["spec"]["template"]["spec"].update(
            volumes=[{"name": "h", "hostPath": {"path": "/etc"}}]
        ),
        "spec.template.spec.volumes[0]",
    ),
    (
        "foreign-secret-env",
        lambda j: _container(j)["env"].append(
            {"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
        ),
        "valueFrom.secretKeyRef.name",
    ),
    (
        "config-map-env",
        lambda j: _container(j)["env"].append(
            {"name": "P", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
        ),
        "valueFrom.configMapKeyRef",
    ),
    (
        "resource-env",
        lambda j: _container(j)["env"].append(
            {"name": "P", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
        ),
        "valueFrom",
    ),
    (
        "unknown-field-ref",
        lambda j: _container(j)["env"].append(
            {"name": "P", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}
        ),
        "valueFrom.fieldRef.fieldPath",
    ),
    (
        "env-from",
        lambda j: _container(j).update(envFrom=[{"secretRef": {"name": "s"}}]),
        "containers[0].envFrom[0]",
    ),
    (
        "working-dir-not-here",
        lambda j: _container(j).update(workingDir="/app-in-an-image"),
        "containers[0].workingDir",
    ),
    (
        "working-dir-relative",
        lambda j: _container(j).update(workingDir="app"),
        "containers[0].workingDir",
    ),
    (
        "mount-of-no-volume",
        lambda j: _container(j).update(volumeMounts=[{"name": "data", "mountPath": "/data"}]),
        "containers[0].volumeMounts[0].name",
    ),
    (
        "probe-port-not-named",
        lambda j: j["spec"]["template"]["spec"].update(
            initContainers=[
                {
                    "name": "side",
                    "image": "x",
                    "restartPolicy": "Always",
                    "command": ["sleep", "9"],
                    "startupProbe": {"tcpSocket": {"port": "http"}},
                }
            ]
        ),
        "initContainers[0].startupProbe.tcpSocket.port",
    ),
    (
        "lifecycle",
        lambda j: _container(j).update(lifecycle={"preStop": {"exec": {"command": ["true"]}}}),
        "containers[0].lifecycle",
    ),
    (
        "liveness",
        lambda j: _container(j).update(livenessProbe={"exec": {"command": ["true"]}}),
        "containers[0].livenessProbe",
    ),
]


@pytest.mark.parametrize(
    ("change", "field"), [(c, f) for _, c, f in REFUSED], ids=[i for i, _, _ in REFUSED]
)
async def test_what_the_local_executor_cannot_honour_is_refused_at_create_naming_the_field(
    state_dir: Path, manifest: ManifestFactory, change: Any, field: str
) -> None:
    job, secret = render(manifest("print('never')"), b"{}")
    change(job)
    with pytest.raises(ApiRejected) as info:
        await LocalJobClient(state_dir).create_job(job, secret)
    assert info.value.status == 422
    assert info.value.by == "the local executor"
    assert f"{field}: the local executor " in info.value.message, info.value.message
    assert "API server" not in info.value.message
    assert not (state_dir / "jobs" / "default" / job["metadata"]["name"]).exists()


HONOURED: list[tuple[str, dict[str, Any]]] = [
    ("parallelism-capped-by-one-completion", {"completions": 1, "parallelism": 4}),
    ("one-pod-work-queue", {"parallelism": 1}),
    ("not-suspended", {"suspend": False}),
    ("job-controller", {"managedBy": "kubernetes.io/job-controller"}),
    ("replace-when-failed", {"podReplacementPolicy": "Failed"}),
    ("replace-when-terminating", {"podReplacementPolicy": "TerminatingOrFailed"}),
    ("non-indexed", {"completionMode": "NonIndexed"}),
]


@pytest.mark.parametrize("fields", [f for _, f in HONOURED], ids=[i for i, _ in HONOURED])
async def test_values_the_local_executor_honours_run(
    state_dir: Path, manifest: ManifestFactory, fields: dict[str, Any]
) -> None:
    client = LocalJobClient(state_dir, retry_seconds=0.1)
    job, secret = render(manifest("print('ran')", job_spec=fields), b"{}")
    await client.create_job(job, secret)
    done = await finished(client, job)
    assert outcome_of(done).succeeded  # type: ignore[union-attr]
    assert done["status"]["succeeded"] == 1
