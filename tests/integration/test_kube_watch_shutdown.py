"""The watch bridge's threads at shutdown, on the real API server: a watch thread that
reads an event after its event loop is closed (a process stopping while a watch, such as
the operator's TriggerAuthentication informer, is open) ends quietly, not with
`RuntimeError: Event loop is closed` printed by threading's excepthook."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from jobrunner.core.protocols import WatchEvent
from jobrunner.kube.client import KubeJobClient, load_api_client
from jobrunner.kube.objects import KubeObjects

pytestmark = [pytest.mark.kube]


def lease(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"holderIdentity": "test"}}


async def first(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    async for event in events:
        return event
    raise AssertionError("the watch ended without an event")


def test_a_watch_thread_outliving_its_event_loop_ends_without_a_traceback(
    kube_api: client.ApiClient, kubeconfig: Path, namespace: str
) -> None:
    leases = client.CoordinationV1Api(kube_api)
    path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    failures: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = failures.append
    loop = asyncio.new_event_loop()
    jobs = KubeJobClient(load_api_client(str(kubeconfig), None))
    try:
        version = loop.run_until_complete(KubeObjects(jobs).list(path)).resource_version
        events = KubeObjects(jobs).watch(path, resource_version=version)
        leases.create_namespaced_lease(namespace, lease("one"))
        assert loop.run_until_complete(asyncio.wait_for(first(events), 30)).type == "ADDED"
        before = {t for t in threading.enumerate() if t.name.startswith("kube-watch-")}
        (watcher,) = before
        loop.close()  # the watch left open, as when a process stops under it
        # The thread, still reading, gets one more event with nobody left to take it.
        leases.create_namespaced_lease(namespace, lease(f"two-{uuid.uuid4().hex[:6]}"))
        deadline = time.monotonic() + 30
        while watcher.is_alive() and time.monotonic() < deadline:
            watcher.join(0.2)
        assert not watcher.is_alive(), "the watch thread kept reading for a closed loop"
    finally:
        threading.excepthook = previous
        jobs._pool.shutdown(wait=False)
    assert [f"{f.exc_type.__name__}: {f.exc_value}" for f in failures] == []
