"""RabbitMQ over TLS with a real user: amqps:// URLs, the CA (and a client certificate)
from a TriggerAuthentication with KEDA's parameters, and a wrong password or an unknown CA
said plainly, with /readyz saying why, instead of a retry loop that looks healthy."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests import services
from tests.helpers import eventually
from tests.integration.harness import Dispatcher, busybox_job, publish, wait_for_jobs
from tests.integration.test_observability import free_port, get

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]


def tls_setting() -> tuple[str, str]:
    url = services.setting("JOBRUNNER_TEST_RABBITMQ_TLS_URL")
    ca = services.setting("JOBRUNNER_TEST_RABBITMQ_TLS_CA")
    if not url or not ca:
        services.missing("RabbitMQ's TLS listener", "JOBRUNNER_TEST_RABBITMQ_TLS_URL is unset")
    return str(url), Path(str(ca)).read_text()


def create_secret(kube_api: client.ApiClient, namespace: str, data: dict[str, str]) -> None:
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="rabbit-auth"),
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        ),
    )


def manifest(tmp_path: Path, namespace: str, queue: str, params: list[str]) -> Path:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {
                "jobTargetRef": busybox_job(),
                "triggers": [
                    {
                        "type": "rabbitmq",
                        "metadata": {"queueName": queue},
                        "authenticationRef": {"name": "rabbit-auth"},
                    }
                ],
            },
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "rabbit-auth", "namespace": namespace},
            "spec": {
                "secretTargetRef": [
                    {"parameter": p, "name": "rabbit-auth", "key": p} for p in params
                ]
            },
        },
    ]
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def without_credentials(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]))


async def test_amqps_with_the_ca_and_credentials_from_a_trigger_authentication(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    url, ca = tls_setting()
    parsed = urllib.parse.urlsplit(url)
    create_secret(
        kube_api,
        namespace,
        {
            "host": without_credentials(url),
            "username": str(parsed.username),
            "password": str(parsed.password),
            "ca": ca,
        },
    )
    dispatcher = dispatchers(
        manifest(tmp_path, namespace, queue, ["host", "username", "password", "ca"])
    )
    await publish(rabbitmq_url, queue, b"{}", message_id="over-tls")
    await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")
    await dispatcher.settled("ack", 1)
    assert parsed.password not in dispatcher.logs(), "a password must never be logged"


async def test_a_client_certificate_is_presented_when_given(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
) -> None:
    url, ca = tls_setting()
    ca_dir = Path(str(services.setting("JOBRUNNER_TEST_RABBITMQ_TLS_CA"))).parent
    key, csr, crt = tmp_path / "c.key", tmp_path / "c.csr", tmp_path / "c.crt"
    for command in (
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=jobrunner-client"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca_dir / "ca.crt", "-CAkey",
         ca_dir / "ca.key", "-CAcreateserial", "-out", crt, "-days", "1"],
    ):  # fmt: skip
        await asyncio.to_thread(
            subprocess.run, [str(c) for c in command], check=True, capture_output=True
        )
    create_secret(
        kube_api,
        namespace,
        {"host": url, "ca": ca, "cert": crt.read_text(), "key": key.read_text()},
    )
    dispatcher = dispatchers(manifest(tmp_path, namespace, queue, ["host", "ca", "cert", "key"]))
    await publish(rabbitmq_url, queue, b"{}", message_id="mutual")
    await dispatcher.settled("ack", 1)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("wrong-password", "refused the credentials of user 'jobrunner'"),
        ("unknown-ca", "TLS failed (certificate not trusted"),
    ],
)
async def test_a_wrong_password_or_an_unknown_ca_is_said_plainly_and_on_readyz(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
    case: str,
    says: str,
) -> None:
    url, ca = tls_setting()
    parsed = urllib.parse.urlsplit(url)
    data = {"host": without_credentials(url), "username": str(parsed.username)}
    if case == "wrong-password":
        data.update(password="not-the-password", ca=ca)
    else:
        data.update(password=str(parsed.password))  # no ca: the system's CAs
    create_secret(kube_api, namespace, data)
    port = free_port()
    dispatcher = dispatchers(
        manifest(tmp_path, namespace, queue, sorted(data)),
        {"JOBRUNNER_TELEMETRY__HTTP_PORT": str(port)},
    )

    async def not_ready_saying_why() -> str | None:
        try:
            status, text = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/readyz")
        except OSError:  # not listening yet
            return None
        return text if status == 503 and says in text else None

    await eventually(not_ready_saying_why, within=60)
    logs = dispatcher.logs()
    assert says in logs
    assert "Traceback" not in logs
    assert "not-the-password" not in logs
    assert dispatcher.process is not None
    assert dispatcher.process.poll() is None
