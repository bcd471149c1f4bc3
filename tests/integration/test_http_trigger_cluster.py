"""The HTTP trigger against the stack's API server (Jobs on KWOK nodes): a dispatcher in
file mode serves a path with a bearer token from a Secret; concurrent POSTs of the same
events make one Job each in the cluster, and the Location follows each Job to its end."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import Dispatcher, busybox_job, jobs_of
from tests.local.test_http_trigger import free_port

pytestmark = [pytest.mark.kube]

TOKEN = "cluster-test-token-0123456789abcdef"
WAIT = 90.0


def http_manifest(tmp_path: Path, namespace: str, port: int, **spec: Any) -> Path:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "hooks", "namespace": namespace},
            "spec": {
                "maxReplicaCount": 20,
                "jobTargetRef": busybox_job(),
                "triggers": [
                    {
                        "type": "http",
                        "metadata": {
                            "path": "/hooks",
                            "listenAddress": f"127.0.0.1:{port}",
                            "maxPendingRequests": "200",
                        },
                        "authenticationRef": {"name": "hook-auth"},
                    }
                ],
                **spec,
            },
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "hook-auth", "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "token", "name": "hook", "key": "token"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "hook", "namespace": namespace},
            "data": {"token": base64.b64encode(TOKEN.encode()).decode()},
        },
    ]
    path = tmp_path / "hooks.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def ce(event_id: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {TOKEN}",
        "Ce-Specversion": "1.0",
        "Ce-Id": event_id,
        "Ce-Source": "/tests/cluster",
        "Ce-Type": "dev.jobrunner.test",
        "Content-Type": "application/json",
    }


async def serving(base: str, dispatcher: Dispatcher) -> None:
    async def up() -> bool:
        assert dispatcher.process is not None
        assert dispatcher.process.poll() is None, dispatcher.logs()[-3000:]
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/nothing") as r:
                return r.status == 404
        except aiohttp.ClientError:
            return False

    await eventually(up, within=WAIT)


async def test_concurrent_posts_make_one_job_per_event_in_the_cluster(
    tmp_path: Path,
    namespace: str,
    kube_api: client.ApiClient,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    port = free_port()
    dispatcher = dispatchers(http_manifest(tmp_path, namespace, port))
    base = f"http://127.0.0.1:{port}"
    await serving(base, dispatcher)
    ids = [f"e-{i}" for i in range(20)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def post(event_id: str) -> tuple[int, str, str]:
            task = {"task": event_id, **({"fail": "failed"} if event_id == "e-0" else {})}
            async with s.post(f"{base}/hooks", data=json.dumps(task), headers=ce(event_id)) as r:
                body = await r.json()
                return r.status, body.get("job", ""), r.headers.get("Location", "")

        answers = await asyncio.gather(*(post(i) for i in ids * 5))
        assert {a[0] for a in answers} == {202}, answers
        jobs = jobs_of(kube_api, namespace, "hooks")
        # 202 means the Job exists: all 20 are in the API server, and no more.
        assert sorted(j.metadata.name for j in jobs) == sorted({a[1] for a in answers})
        assert len(jobs) == 20
        for job in jobs:
            text = json.dumps(client.ApiClient().sanitize_for_serialization(job))
            assert TOKEN not in text  # the Authorization header reaches no Job

        locations = {
            event_id: where for event_id, (_, _, where) in zip(ids * 5, answers, strict=True)
        }

        async def ended(event_id: str) -> tuple[int, dict[str, Any]] | None:
            async with s.get(base + locations[event_id], headers=ce(event_id)) as r:
                body = await r.json()
                return (r.status, body) if r.status in (200, 400) else None

        for event_id in ids:
            status, body = await eventually(lambda e=event_id: ended(e), within=WAIT)
            if event_id == "e-0":
                assert status == 400
                assert body["status"] == "failed"
            else:
                assert status == 200
                assert body["status"] == "succeeded"
        async with s.get(base + locations["e-1"]) as r:
            assert r.status == 401  # the status is the sender's, like the event
    assert len(jobs_of(kube_api, namespace, "hooks")) == 20
