"""Where the test suite finds its real services.

Each service is looked up in this order:

1. the environment (``JOBRUNNER_TEST_KUBECONFIG``, ``JOBRUNNER_TEST_RABBITMQ_URL``,
   ``JOBRUNNER_TEST_KAFKA_BOOTSTRAP``, ``JOBRUNNER_TEST_AZURE_STORAGE_CONNECTION_STRING``,
   ``JOBRUNNER_TEST_SQS_ENDPOINT``, ``JOBRUNNER_TEST_REDIS_ADDRESS``,
   ``JOBRUNNER_TEST_NATS_URL``, ``JOBRUNNER_TEST_MQTT_URL``), which ``make test`` fills
   from the file that ``deploy/local/stack-up.sh`` writes;
2. that file itself (``JOBRUNNER_STACK_ENV``, default ``/tmp/jobrunner-stack/stack.env``),
   so a plain ``pytest`` works once the stack is up;
3. a Docker engine, when one answers: the service is started with testcontainers
   (RabbitMQ, Kafka, k3s) for the session. The SQS, Redis, NATS and MQTT servers come
   from the local stack only.

When none gives the service, the test is skipped with the command to run, except under
``CI=true``, where a missing service fails the run: CI must never pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

DEFAULT_STACK_ENV = Path("/tmp/jobrunner-stack/stack.env")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unquote(value: str) -> str:
    """A stack.env value as the shell that sources the file reads it (single-quoted
    values hold ';')."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def read_stack_env() -> dict[str, str]:
    path = Path(os.environ.get("JOBRUNNER_STACK_ENV", DEFAULT_STACK_ENV))
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = unquote(value.strip())
    return values


def setting(name: str) -> str | None:
    return os.environ.get(name) or read_stack_env().get(name)


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tcp_reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def program(name: str, *, how: str, setting: str | None = None) -> str:
    """The path of a program a test runs: the environment variable ``setting`` when it is
    set (the stack writes it), else ``name`` on PATH. Without it the test is skipped
    saying ``how`` to get it, and with CI=true it fails, as for a missing service."""
    given = os.environ.get(setting) if setting else None
    found = shutil.which(given or name)
    if found:
        return found
    where = f"${setting}={given} is not an executable" if given else f"no {name} on PATH"
    message = f"{name} is not available ({where}): {how}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def missing(service: str, why: str) -> None:
    message = f"{service} is not available: {why}. Start the local stack with `make stack-up`."
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class KafkaService:
    bootstrap_servers: str


@contextlib.contextmanager
def rabbitmq_url() -> Iterator[str]:
    url = setting("JOBRUNNER_TEST_RABBITMQ_URL")
    if url:
        parsed = urlparse(url)
        if not tcp_reachable(parsed.hostname or "127.0.0.1", parsed.port or 5672):
            missing("RabbitMQ", f"{url} does not accept connections")
        yield url
        return
    if docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    missing("RabbitMQ", "JOBRUNNER_TEST_RABBITMQ_URL is unset and no Docker engine answers")


@contextlib.contextmanager
def kafka_bootstrap() -> Iterator[str]:
    servers = setting("JOBRUNNER_TEST_KAFKA_BOOTSTRAP")
    if servers:
        host, _, port = servers.split(",")[0].rpartition(":")
        if not tcp_reachable(host or "127.0.0.1", int(port)):
            missing("Kafka", f"{servers} does not accept connections")
        yield servers
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    missing("Kafka", "JOBRUNNER_TEST_KAFKA_BOOTSTRAP is unset and no Docker engine answers")


def azure_storage_connection() -> str:
    """Azurite's connection string (queue endpoint), checked to accept connections.
    There is no container fallback: Azurite comes from the local stack only."""
    connection = setting("JOBRUNNER_TEST_AZURE_STORAGE_CONNECTION_STRING")
    if not connection:
        missing("Azurite", "JOBRUNNER_TEST_AZURE_STORAGE_CONNECTION_STRING is unset")
    assert connection is not None
    parts = dict(p.split("=", 1) for p in connection.split(";") if "=" in p)
    endpoint = urlparse(parts.get("QueueEndpoint", ""))
    if not tcp_reachable(endpoint.hostname or "127.0.0.1", endpoint.port or 10001):
        missing("Azurite", f"{parts.get('QueueEndpoint')} does not accept connections")
    return connection


@contextlib.contextmanager
def kubeconfig_path(tmp_dir: Path) -> Iterator[Path]:
    configured = setting("JOBRUNNER_TEST_KUBECONFIG")
    if configured:
        path = Path(configured)
        if not path.is_file():
            missing("Kubernetes", f"kubeconfig {path} does not exist")
        yield path
        return
    if docker_available():
        from testcontainers.k3s import K3SContainer

        with K3SContainer() as k3s:
            path = tmp_dir / "k3s-kubeconfig.yaml"
            path.write_text(k3s.config_yaml())
            yield path
        return
    missing("Kubernetes", "JOBRUNNER_TEST_KUBECONFIG is unset and no Docker engine answers")


def stack_service(service: str, variable: str) -> str:
    """A service address of the local stack (``variable`` in the environment or
    stack.env) that accepts TCP connections; missing() otherwise."""
    value = setting(variable)
    if not value:
        missing(service, f"{variable} is unset")
    assert value is not None
    parsed = urlparse(value if "://" in value else f"tcp://{value}")
    if not tcp_reachable(parsed.hostname or "127.0.0.1", parsed.port or 0):
        missing(service, f"{value} does not accept connections")
    return value
