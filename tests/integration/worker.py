"""The local stack's second cluster (the `worker` part of deploy/local/stack-up.sh, a
MultiKueue worker of the first): where its kubeconfig is, fixtures for its API, and its
API server's restart by the stack's script."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from tests import services
from tests.helpers import wait_until
from tests.integration import test_stack_smoke as smoke

RESTART_TIMEOUT = 120
"""Seconds the stack's script may take to stop the worker's API server and bring it back
(about 13 s here, MultiKueue's reconnection to it included)."""
WORKER_TIMEOUT = 150
"""Seconds any wait on the worker allows. After its API server was restarted, the worker's
controllers (Job controller, scheduler, KWOK, Kueue) take up to about a minute to watch
again: client-go's reflectors back off from 0.8 s to 30 s with up to 100 % jitter, and
reset only after 2 min without a failure, so a second restart soon after the first waits
longest (56 s measured). Tests run in any order, so every wait allows for it."""


def worker_kubeconfig() -> Path:
    configured = services.setting("JOBRUNNER_TEST_WORKER_KUBECONFIG")
    if not configured:
        services.missing(
            "the worker cluster",
            "JOBRUNNER_TEST_WORKER_KUBECONFIG is unset (bash deploy/local/stack-up.sh worker)",
        )
    path = Path(str(configured))
    if not path.is_file():
        services.missing("the worker cluster", f"kubeconfig {path} does not exist")
    return path


def worker_node() -> str:
    return services.setting("JOBRUNNER_TEST_WORKER_NODE") or "worker-kwok-node-0"


def stack_pid(name: str) -> int:
    """The pid of a daemon of the local stack, from its pid file."""
    state = services.setting("JOBRUNNER_TEST_STACK_STATE") or "/tmp/jobrunner-stack"
    return int((Path(state) / "pids" / f"{name}.pid").read_text())


def restart_worker_apiserver() -> None:
    """Stop the worker's API server and start it again (its etcd keeps what it held),
    with the stack's own script, as an outage of that cluster alone."""
    script = services.setting("JOBRUNNER_TEST_STACK_RESTART")
    if not script:
        services.missing(
            "the local stack's restart script", "JOBRUNNER_TEST_STACK_RESTART is unset"
        )
    subprocess.run(
        ["bash", str(script), "worker-apiserver"],
        check=True,
        capture_output=True,
        timeout=RESTART_TIMEOUT,
    )


def answers(api: client.ApiClient) -> bool:
    try:
        client.VersionApi(api).get_code()
    except Exception:  # any failure (refused, 503 while starting) means "not yet"
        return False
    return True


@pytest.fixture(scope="session")
def worker_api() -> client.ApiClient:
    """An ApiClient for the worker cluster, checked to answer."""
    path = worker_kubeconfig()
    api = config.new_client_from_config(config_file=str(path))
    if not answers(api):
        services.missing("the worker cluster", f"the API server in {path} does not answer")
    return api


def wait_for_default_service_account(core: client.CoreV1Api, namespace: str) -> None:
    """As on the first cluster, with the worker's longer bound (see WORKER_TIMEOUT)."""
    smoke.wait_for_default_service_account(core, namespace, timeout=WORKER_TIMEOUT)


@pytest.fixture
def worker_namespace(worker_api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace on the worker, ready for pods, deleted after the test."""
    core = client.CoreV1Api(worker_api)
    name = f"w-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        wait_for_default_service_account(core, name)
        yield name
    finally:
        wait_until(lambda: answers(worker_api), timeout=RESTART_TIMEOUT)
        core.delete_namespace(name, propagation_policy="Background")
