"""Fixtures for dispatcher tests: a fresh queue, a fresh namespace, and dispatcher
processes that are always stopped (with their logs shown when a test fails)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from azure.storage.queue.aio import QueueClient
from kubernetes import client

from jobrunner.local.client import LocalJobClient
from tests import services
from tests.integration.harness import Dispatcher, write_manifest
from tests.integration.kueue import Kueue
from tests.integration.multikueue import multikueue  # noqa: F401 - a fixture
from tests.integration.operator_harness import CRDS, ROOT, apply_crds
from tests.integration.worker import worker_api, worker_namespace  # noqa: F401 - fixtures
from tests.local.conftest import Dispatchers


@pytest.fixture
def kueue(kube_api: client.ApiClient) -> Iterator[Kueue]:
    """Kueue objects made for one test (ClusterQueues, LocalQueues, priority classes),
    deleted after it; the stack's Kueue must be up."""
    services.stack_service("Kueue", "JOBRUNNER_TEST_KUEUE_HEALTH_URL")
    flavor = services.setting("JOBRUNNER_TEST_KUEUE_FLAVOR")
    if not flavor:
        services.missing("Kueue", "JOBRUNNER_TEST_KUEUE_FLAVOR is unset")
    helper = Kueue(api=kube_api, flavor=str(flavor))
    try:
        yield helper
    finally:
        helper.cleanup()


@contextlib.asynccontextmanager
async def fresh_queue(rabbitmq_url: str) -> AsyncIterator[str]:
    """A durable queue with no dead-letter exchange of its own, deleted on exit (with
    its dead-letter queue)."""
    name = f"q-{uuid.uuid4().hex[:10]}"
    async with await aio_pika.connect(rabbitmq_url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)
    try:
        yield name
    finally:
        # A fresh connection: a test may have restarted the broker under the first one.
        async with await aio_pika.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            await channel.queue_delete(name)
            await channel.queue_delete(f"{name}.dead-letter")


@pytest.fixture
async def queue(rabbitmq_url: str) -> AsyncIterator[str]:
    """A durable queue with no dead-letter exchange of its own."""
    async with fresh_queue(rabbitmq_url) as name:
        yield name


@pytest.fixture
async def second_queue(rabbitmq_url: str) -> AsyncIterator[str]:
    """Another queue, for a test of two ScaledJobs."""
    async with fresh_queue(rabbitmq_url) as name:
        yield name


@pytest.fixture
def dispatchers(
    kubeconfig: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Dispatcher]]:
    started: list[Dispatcher] = []

    def start(manifest: Path, env: dict[str, str] | None = None) -> Dispatcher:
        d = Dispatcher(
            manifest, kubeconfig, tmp_path / f"dispatcher-{len(started)}.log", env
        ).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for d in started:
            print(f"----- {d.log.name} -----\n{d.logs()[-20000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def manifest(tmp_path: Path, namespace: str, queue: str, rabbitmq_url: str) -> Callable[..., Path]:
    def make(name: str = "work", **spec: Any) -> Path:
        return write_manifest(
            tmp_path / f"{name}.yaml",
            name=name,
            namespace=namespace,
            queue=queue,
            url=rabbitmq_url,
            **spec,
        )

    return make


@pytest.fixture
def function_queues(azure_storage: str) -> Iterator[dict[str, str]]:
    """An orders queue (created) and a receipts queue (made by the output) of their own;
    both and the poison queue are deleted afterwards."""
    run = uuid.uuid4().hex[:10]
    names = {"orders": f"orders-{run}", "receipts": f"receipts-{run}"}

    async def create() -> None:
        async with QueueClient.from_connection_string(azure_storage, names["orders"]) as q:
            await q.create_queue()

    asyncio.run(create())
    yield names

    async def delete() -> None:
        for name in [*names.values(), f"{names['orders']}-poison"]:
            async with QueueClient.from_connection_string(azure_storage, name) as q:
                with contextlib.suppress(Exception):  # never created
                    await q.delete_queue()

    asyncio.run(delete())


@pytest.fixture
def local_dispatchers(tmp_path: Path) -> Iterator[Dispatchers]:
    """`jobrunner run --local` processes on a state directory whose Jobs are removed after."""
    state = tmp_path / "state"
    state.mkdir()
    d = Dispatchers(state, tmp_path)
    yield d
    for proc in d.started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    client = LocalJobClient(state, controller=False)

    async def delete_all() -> None:
        base = state / "jobs" / "default"
        for job in base.iterdir() if base.is_dir() else []:
            await client.delete_job("default", job.name)

    asyncio.run(delete_all())


@pytest.fixture(scope="session")
def jobrunner_crds(kube_api: client.ApiClient) -> list[str]:
    """jobrunner's CRDs from this work tree (deploy/crds), applied to the test cluster."""
    return apply_crds(kube_api, sorted(CRDS.glob("*.yaml")))


@pytest.fixture(scope="session")
def keda_crds(kube_api: client.ApiClient) -> list[str]:
    """KEDA's own CRDs (keda.sh), fetched from its module by deploy/local/keda-crds.sh
    (no KEDA build) and applied: the takeover of keda.sh ScaledJobs is tested against
    KEDA's real schema."""
    import subprocess

    fetched = subprocess.run(
        ["bash", str(ROOT / "deploy" / "local" / "keda-crds.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if fetched.returncode != 0:
        services.missing("KEDA's CRDs", f"keda-crds.sh failed: {fetched.stderr[-800:]}")
    return apply_crds(kube_api, sorted(Path(fetched.stdout.strip()).glob("keda.sh_*.yaml")))


@pytest.fixture(scope="session")
def real_node(kube_api: client.ApiClient) -> Any:
    """The stack's kubelet node (tests/integration/realnode.py), Ready, with its images."""
    from tests.integration.realnode import real_node as find

    return find(kube_api)
