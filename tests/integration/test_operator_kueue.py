"""Kueue under the operator, run as the chart's ServiceAccount (its RBAC, not the admin's):
a queued ScaledJob's status counts its Jobs by admission stage while the quota starves
it, and a Job Kueue can never admit is dead-lettered with Kueue's reason (the Workload
read through the operator's shared Job client, with the chart's ``list workloads``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import drain_queue, finished, jobs_of, publish
from tests.integration.kueue import Kueue
from tests.integration.operator_harness import OperatorProcess, ScaledJobs, scaledjob
from tests.integration.test_kueue import names, queued_job
from tests.integration.test_operator import crs, operators, queues
from tests.integration.test_operator_rbac import Release, release, service_account_kubeconfig

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq, pytest.mark.usefixtures("jobrunner_crds")]
__all__ = ["crs", "operators", "queues", "release"]  # fixtures shared with other tests


async def test_status_counts_queued_jobs_by_stage_and_never_admitted_ones_are_dead_lettered(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    rabbitmq_url: str,
    tmp_path: Path,
    queues: Callable[..., Any],
    crs: ScaledJobs,
    operators: Callable[..., OperatorProcess],
    release: Release,
    kueue: Kueue,
) -> None:
    cq, lq = names("op")
    kueue.cluster_queue(cq, cpu="1", memory="1Gi")
    kueue.local_queue(namespace, lq, cluster_queue=cq)
    [fits, huge] = await queues(2)
    config = service_account_kubeconfig(kube_api, kubeconfig, release, tmp_path / "sa.kubeconfig")
    operators(
        "chart-sa",
        config=config,
        lease_namespace=release.namespace,
        env={"JOBRUNNER_OPERATOR__LEASE_GROUP": release.service_account},
    )
    await crs.apply(
        scaledjob(
            "starved",
            namespace=namespace,
            queue=fits,
            url=rabbitmq_url,
            job_spec=queued_job(lq),
            maxPendingAdmission=2,
        )
    )
    await crs.apply(
        scaledjob(
            "huge",
            namespace=namespace,
            queue=huge,
            url=rabbitmq_url,
            job_spec=queued_job(lq, cpu="8"),
            inadmissibleTimeoutSeconds=3,
        )
    )
    for i in range(4):
        await publish(rabbitmq_url, fits, json.dumps({"seconds": 4}).encode(), message_id=f"f{i}")
    await publish(rabbitmq_url, huge, b"{}", message_id="never")

    async def starved() -> dict[str, int] | None:
        status = (await crs.get("starved") or {}).get("status") or {}
        admission = status.get("admission") or {}
        waiting = admission.get("pending", 0) >= 1
        return admission if waiting and admission.get("pending", 0) <= 2 else None

    seen = await eventually(starved, within=90, interval=0.5)
    assert set(seen) == {"pending", "admitted", "running", "evicted"}

    [dead] = await drain_queue(rabbitmq_url, f"{huge}.dead-letter", wait=120)
    assert dead.message_id == "never"
    assert dead.headers["x-jobrunner-reason"] == "NeverFits"
    assert "maximum capacity" in str(dead.headers["x-jobrunner-detail"])

    async def all_done() -> bool:
        jobs = jobs_of(kube_api, namespace, "starved")
        return len(jobs) == 4 and all(finished(j) == "Complete" for j in jobs)

    await eventually(all_done, within=180, interval=1)

    async def drained() -> bool:
        status = (await crs.get("starved") or {}).get("status") or {}
        return (status.get("admission") or {}).get("pending") == 0

    await eventually(drained, within=60, interval=0.5)
