"""Admission by Kueue as jobrunner reads it (jobrunner.core.admission): the pending bound
of the slots, which Workload states mean "never", the reason a Job ended for that reason
reads with (and that a forged one does not), the tracker's admission events and the
Kueue labels a Job gets from its template. Pure logic; tests/integration/test_kueue.py
runs the same against the real Kueue."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from jobrunner.core.admission import (
    ANNOTATION_NOT_ADMITTED,
    LABEL_PRIORITY_CLASS,
    LABEL_QUEUE_NAME,
    REASON_INADMISSIBLE,
    REASON_NEVER_FITS,
    WorkloadView,
    not_admitted_outcome,
)
from jobrunner.core.models import Delivery, Outcome
from jobrunner.core.naming import message_identity, message_secret_name
from jobrunner.dispatch.limiter import ActiveJobs
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.rendering.renderer import Renderer
from jobrunner.tracking.tracker import JobState, JobTracker, outcome_of

# Kueue v0.17's own words (pkg/scheduler/flavorassigner/flavorassigner.go,
# pkg/controller/core/workload_controller.go).
NO_CAPACITY = (
    "couldn't assign flavors to pod set main: insufficient quota for cpu in flavor kwok, "
    "previously considered podsets requests (0) + current podset request (8) > maximum "
    "capacity (2)"
)
FLAVORS = "couldn't assign flavors to pod set main:"
BUSY = (
    "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor "
    "kwok, 1 more needed"
)
MIXED = f"{BUSY}; couldn't assign flavors to pod set b: {NO_CAPACITY.split(': ', 1)[1]}"


def workload(*conditions: dict[str, str]) -> WorkloadView:
    return WorkloadView.from_object(
        {"metadata": {"name": "w"}, "status": {"conditions": list(conditions)}}
    )


def reserved(reason: str, message: str) -> dict[str, str]:
    return {
        "type": "QuotaReserved",
        "status": "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-12-08T01:00:00Z",
    }


@pytest.mark.parametrize(
    ("conditions", "never"),
    [
        ([reserved("Inadmissible", "LocalQueue lq doesn't exist")], REASON_INADMISSIBLE),
        ([reserved("Inadmissible", "ClusterQueue cq doesn't exist")], REASON_INADMISSIBLE),
        # An administrator's pause, or a queue being set up: waiting, not never.
        ([reserved("Inadmissible", "ClusterQueue cq is stopped")], None),
        ([reserved("Inadmissible", "LocalQueue lq is inactive")], None),
        ([reserved("Inadmissible", "LocalQueue lq is terminating or missing")], None),
        (
            [reserved("Pending", "couldn't assign flavors to pod set main: flavor gpu not found")],
            REASON_NEVER_FITS,
        ),
        (
            [
                reserved(
                    "Pending",
                    f"{FLAVORS} resource nvidia.com/gpu unavailable in ClusterQueue",
                )
            ],
            REASON_NEVER_FITS,
        ),
        # Topology-aware scheduling: domains in use now (the reviewer's messages).
        (
            [
                reserved(
                    "Pending",
                    f'{FLAVORS} topology "block" doesn\'t allow to fit any of 16 pod(s)',
                )
            ],
            None,
        ),
        (
            [
                reserved(
                    "Pending",
                    f'{FLAVORS} topology "rack" allows to fit only 8 out of 16 pod(s)',
                )
            ],
            None,
        ),
        # Words this version of jobrunner does not know: waiting, never hopeless.
        ([reserved("Pending", "couldn't assign flavors to pod set main: something new")], None),
        ([reserved("Pending", NO_CAPACITY)], REASON_NEVER_FITS),
        ([reserved("Pending", BUSY)], None),  # quota in use: waiting is what a queue is for
        ([reserved("Pending", MIXED)], None),  # one pod set could fit later
        ([reserved("Pending", "Workload no longer fits after processing another workload")], None),
        ([{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved"}], None),
        ([], None),  # Kueue has not looked at it yet
    ],
)
def test_only_what_holds_until_the_queues_change_is_never(
    conditions: list[dict[str, str]], never: str | None
) -> None:
    told = workload(*conditions).never_admitted()
    assert (told[0] if told else None) == never
    if told:
        assert told[1] == conditions[0]["message"]


def test_an_eviction_is_read_with_kueues_reason() -> None:
    view = workload(
        {"type": "Admitted", "status": "False", "reason": "NoReservation"},
        {"type": "Evicted", "status": "True", "reason": "Preempted", "message": "by higher"},
    )
    assert view.eviction() == "Preempted", "the reason code only: the message names the preemptor"


def deleting_job(annotation: str | None) -> dict[str, Any]:
    annotations = {ANNOTATION_NOT_ADMITTED: annotation} if annotation is not None else {}
    return {
        "metadata": {
            "name": "j",
            "deletionTimestamp": "2026-12-08T01:05:00Z",
            "annotations": annotations,
            "labels": {LABEL_QUEUE_NAME: "lq"},
        },
        "spec": {"suspend": True},
    }


def test_a_job_ended_because_kueue_cannot_admit_it_reads_as_that_failure() -> None:
    told = json.dumps({"reason": "NeverFits", "detail": "Kueue: " + NO_CAPACITY})
    outcome = outcome_of(deleting_job(told))
    assert outcome is not None
    assert outcome.outcome is Outcome.FAILED
    assert (outcome.reason, outcome.message) == ("NeverFits", "Kueue: " + NO_CAPACITY)


@pytest.mark.parametrize(
    "forged",
    [
        json.dumps({"reason": "Complete", "detail": "x"}),  # not a reason it may give
        json.dumps({"reason": "BackoffLimitExceeded"}),
        "not json",
        json.dumps(["Inadmissible"]),
        "",
    ],
)
def test_a_forged_or_broken_reason_reads_as_a_deletion(forged: str) -> None:
    outcome = outcome_of(deleting_job(forged))
    assert outcome is not None
    assert outcome.reason == "JobDeleted"
    assert not_admitted_outcome(deleting_job(forged)) is None


def test_the_reason_counts_only_once_the_job_is_being_deleted() -> None:
    job = deleting_job(json.dumps({"reason": "Inadmissible", "detail": "d"}))
    del job["metadata"]["deletionTimestamp"]
    assert outcome_of(job) is None


async def test_of_the_slots_at_most_pending_limit_wait_for_admission() -> None:
    slots = ActiveJobs(10, pending_limit=2)
    await slots.acquire("a", queued=True)
    await slots.acquire("b", queued=True)
    assert slots.pending == 2
    third = asyncio.create_task(slots.acquire("c", queued=True))
    plain = asyncio.create_task(slots.acquire("p"))  # not queued: only the limit applies
    await asyncio.sleep(0)
    assert not third.done()
    assert plain.done()
    slots.admission("a", pending=False)  # Kueue admitted a: one fewer waiting
    await asyncio.wait_for(third, 5)
    assert slots.pending == 2
    assert len(slots) == 4
    slots.admission("a", pending=True)  # evicted: waits again, above the bound; no new one
    assert slots.pending == 3
    fourth = asyncio.create_task(slots.acquire("d", queued=True))
    await asyncio.sleep(0)
    assert not fourth.done()
    slots.release("b")  # b ended while waiting (ended by jobrunner, or deleted)
    slots.release("c")
    await asyncio.wait_for(fourth, 5)
    assert slots.pending == 2


async def test_waiting_jobs_hold_slots_so_at_most_limit_are_ever_admitted() -> None:
    slots = ActiveJobs(3, pending_limit=3)
    for name in "abc":
        await slots.acquire(name, queued=True)
    for name in "abc":
        slots.admission(name, pending=False)  # Kueue admits them all at once
    late = asyncio.create_task(slots.acquire("d", queued=True))
    await asyncio.sleep(0)
    assert not late.done(), "3 admitted is maxReplicaCount: no fourth Job"
    slots.release("a")
    await asyncio.wait_for(late, 5)


async def test_a_smaller_pending_bound_applies_live_and_a_bad_one_is_refused() -> None:
    slots = ActiveJobs(10, pending_limit=5)
    for name in "abc":
        await slots.acquire(name, queued=True)
    slots.resize(10, 2)
    waiter = asyncio.create_task(slots.acquire("d", queued=True))
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.resize(10, 4)
    await asyncio.wait_for(waiter, 5)
    with pytest.raises(ValueError, match="pending_limit"):
        slots.resize(10, 0)


def test_seeding_after_a_restart_counts_the_waiting_jobs() -> None:
    slots = ActiveJobs(10, pending_limit=2)
    slots.seed(["a", "b", "c"], pending=["a", "b", "gone"])
    assert len(slots) == 3
    assert slots.pending == 2


def queued_job(name: str, *, suspend: bool, started: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "labels": {LABEL_QUEUE_NAME: "lq"}},
        "spec": {"suspend": suspend},
        "status": {"startTime": "2026-12-08T01:00:00Z"} if started else {},
    }


def test_the_tracker_tells_admission_eviction_and_start_of_queued_jobs_only() -> None:
    tracker = JobTracker(client=None, namespace="ns", selector="")  # type: ignore[arg-type]
    seen: list[tuple[str, bool, bool | None]] = []

    def listener(state: JobState, old: JobState | None) -> None:
        seen.append((state.name, state.suspended, old.suspended if old else None))

    tracker.on_admission(listener)
    tracker._apply("ADDED", queued_job("q", suspend=True))
    tracker._apply("MODIFIED", queued_job("q", suspend=True))  # nothing changed: no call
    tracker._apply("MODIFIED", queued_job("q", suspend=False))  # admitted
    tracker._apply("MODIFIED", queued_job("q", suspend=False, started=True))  # started
    tracker._apply("MODIFIED", queued_job("q", suspend=True))  # evicted
    plain = queued_job("p", suspend=True)
    del plain["metadata"]["labels"]
    tracker._apply("ADDED", plain)  # suspended by its author, not queued: not admission
    assert seen == [("q", True, None), ("q", False, True), ("q", False, False), ("q", True, False)]
    assert tracker.pending_admission() == ["q"]
    assert not tracker.jobs["p"].pending_admission


def scaledjob(pod_labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "queued", "namespace": "team-a"},
        "spec": {
            "jobTargetRef": {
                "template": {
                    "metadata": {"labels": pod_labels},
                    "spec": {
                        "containers": [{"name": "work", "image": "busybox"}],
                        "restartPolicy": "Never",
                    },
                }
            },
            "triggers": [{"type": "sqlite", "metadata": {"queueName": "work"}}],
            **spec,
        },
    }


def delivery(headers: dict[str, str]) -> Delivery:
    body = b"{}"
    return Delivery(
        source="sqlite",
        identity=message_identity("m-1", body, headers),
        body=body,
        message_id="m-1",
        headers=headers,
    )


def test_the_job_gets_the_kueue_labels_of_its_pod_template_as_keda_users_write_them() -> None:
    labels = {
        LABEL_QUEUE_NAME: "team-a-queue",
        LABEL_PRIORITY_CLASS: "{{ 'high' if message.headers.get('priority') == '9' else 'low' }}",
        "app": "not-copied",
    }
    renderer = Renderer(parse_scaledjob(scaledjob(labels)))
    urgent = renderer.render(delivery({"priority": "9"})).job["metadata"]["labels"]
    routine = renderer.render(delivery({})).job["metadata"]["labels"]
    assert urgent[LABEL_QUEUE_NAME] == routine[LABEL_QUEUE_NAME] == "team-a-queue"
    assert (urgent[LABEL_PRIORITY_CLASS], routine[LABEL_PRIORITY_CLASS]) == ("high", "low")
    assert "app" not in urgent, "only Kueue's labels: the rest stays the pod's, as before"


def test_the_admission_fields_are_bounded() -> None:
    spec = parse_scaledjob(scaledjob({})).spec
    assert (spec.maxPendingAdmission, spec.inadmissibleTimeoutSeconds) == (5, 300)
    for bad in ({"maxPendingAdmission": 0}, {"inadmissibleTimeoutSeconds": 0}):
        with pytest.raises(ManifestError, match=next(iter(bad))):
            parse_scaledjob(scaledjob({}, **bad))


def test_the_readmes_kueue_example_loads_and_renders_its_labels() -> None:
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### A ScaledJob that submits to a LocalQueue", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    renderer = Renderer(parse_scaledjob(yaml.safe_load(block)))
    labels = renderer.render(delivery({"priority": "9"})).job["metadata"]["labels"]
    assert labels[LABEL_QUEUE_NAME] == "media-queue"
    assert labels[LABEL_PRIORITY_CLASS] == "urgent"
    spec = renderer.scaledjob.spec
    assert (spec.maxPendingAdmission, spec.inadmissibleTimeoutSeconds) == (5, 300)


def test_a_multikueue_job_that_needs_its_message_secret_is_told_apart() -> None:
    from jobrunner.core.admission import dispatched_by_multikueue, pod_uses_secret

    big = b"x" * 200_000  # past the env bound: the body goes by the Job's message Secret
    rendered = Renderer(parse_scaledjob(scaledjob({LABEL_QUEUE_NAME: "lq"}))).render(
        Delivery(
            source="sqlite",
            identity=message_identity("big", big, {}),
            body=big,
            message_id="big",
        )
    )
    assert rendered.secret is not None
    secret = rendered.secret["metadata"]["name"]
    job = {
        **rendered.job,
        "spec": {**rendered.job["spec"], "managedBy": "kueue.x-k8s.io/multikueue"},
    }
    assert dispatched_by_multikueue(job)
    assert pod_uses_secret(job, secret)
    small = Renderer(parse_scaledjob(scaledjob({LABEL_QUEUE_NAME: "lq"}))).render(delivery({}))
    assert not pod_uses_secret(small.job, message_secret_name(small.name))
    assert not dispatched_by_multikueue(small.job)
    env_ref = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"env": [{"valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
                    ]
                }
            }
        }
    }
    assert pod_uses_secret(env_ref, "s")
    assert not pod_uses_secret(env_ref, "other")


def test_a_deactivated_workload_is_never_admitted() -> None:
    view = WorkloadView.from_object(
        {
            "spec": {"active": False},
            "status": {"conditions": [reserved("Pending", BUSY)]},
        }
    )
    told = view.never_admitted()
    assert told is not None
    assert told[0] == "Deactivated"


def test_uids_are_taken_out_of_kueues_words() -> None:
    from jobrunner.core.admission import without_uids

    text = "Preempted to accommodate a workload (UID: 0b7c6d1e-1111-4222-8333-944455556666)"
    assert without_uids(text) == "Preempted to accommodate a workload (UID: <uid>)"


def test_the_readmes_kueue_objects_are_what_its_example_names() -> None:
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### A ScaledJob that submits to a LocalQueue", 1)[1]
    scaledjob_block, objects_block = (b.split("```", 1)[0] for b in section.split("```yaml\n")[1:3])
    renderer = Renderer(parse_scaledjob(yaml.safe_load(scaledjob_block)))
    objects = {d["kind"]: d for d in yaml.safe_load_all(objects_block)}
    classes = {
        d["metadata"]["name"]
        for d in yaml.safe_load_all(objects_block)
        if d["kind"] == "WorkloadPriorityClass"
    }
    for headers in ({"priority": "9"}, {}):
        labels = renderer.render(delivery(headers)).job["metadata"]["labels"]
        assert labels[LABEL_PRIORITY_CLASS] in classes, "every priority the template gives exists"
        assert labels[LABEL_QUEUE_NAME] == objects["LocalQueue"]["metadata"]["name"]
    assert (
        objects["LocalQueue"]["spec"]["clusterQueue"] == objects["ClusterQueue"]["metadata"]["name"]
    )
    assert objects["LocalQueue"]["metadata"]["namespace"] == renderer.scaledjob.namespace
