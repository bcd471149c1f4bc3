"""Session fixtures for the real services, and markers derived from where a test lives."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs the real stack; `-m "not integration"`
    # then selects the fast unit tests alone.
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    with services.rabbitmq_url() as url:
        yield url


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with services.kafka_bootstrap() as servers:
        yield servers


@pytest.fixture(scope="session")
def azure_storage() -> str:
    """Azurite's connection string."""
    return services.azure_storage_connection()


@pytest.fixture(scope="session")
def sqs_endpoint() -> str:
    return services.stack_service("SQS (ElasticMQ)", "JOBRUNNER_TEST_SQS_ENDPOINT")


@pytest.fixture(scope="session")
def redis_address() -> str:
    return services.stack_service("Redis", "JOBRUNNER_TEST_REDIS_ADDRESS")


@pytest.fixture(scope="session")
def nats_url() -> str:
    return services.stack_service("NATS JetStream", "JOBRUNNER_TEST_NATS_URL")


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    return services.stack_service("MQTT (Mosquitto)", "JOBRUNNER_TEST_MQTT_URL")


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with services.kubeconfig_path(tmp_path_factory.mktemp("kube")) as path:
        yield path


@pytest.fixture(scope="session")
def kube_api(kubeconfig: Path) -> object:
    """An ApiClient for the test cluster, checked to answer before any test uses it."""
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        client.VersionApi(api_client).get_code()
    except Exception as exc:
        services.missing("Kubernetes", f"the API server in {kubeconfig} does not answer: {exc}")
    return api_client


@contextlib.contextmanager
def fresh_namespace(kube_api: object) -> Iterator[str]:
    """A fresh namespace, deleted (with everything in it) on exit."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        # Jobs whose dispatcher is gone keep jobrunner's finalizer (by design): release
        # them, as `jobrunner finalizers release` would, so the namespace can go.
        batch = client.BatchV1Api(kube_api)
        for job in batch.list_namespaced_job(name).items:
            if job.metadata.finalizers:
                batch.patch_namespaced_job(
                    job.metadata.name, name, {"metadata": {"finalizers": None}}
                )
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def namespace(kube_api: object) -> Iterator[str]:
    """A fresh namespace, deleted (with everything in it) after the test."""
    with fresh_namespace(kube_api) as name:
        yield name


@pytest.fixture
def second_namespace(kube_api: object) -> Iterator[str]:
    """Another fresh namespace, for a test of two tenants."""
    with fresh_namespace(kube_api) as name:
        yield name


@pytest.fixture
def unique_name() -> str:
    return f"jr-{uuid.uuid4().hex[:12]}"
