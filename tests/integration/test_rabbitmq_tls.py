"""RabbitMQ over TLS with a real user: amqps:// URLs, the CA (and a client certificate)
from a TriggerAuthentication with KEDA's parameters, and a wrong password or an unknown CA
said plainly, with /readyz saying why, instead of a retry loop that looks healthy."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator
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


class ManagementStandIn:
    """Stands in for RabbitMQ's management API over https on 127.0.0.1:15671 (the shared
    broker serves it on plain http only, and is not ours to reconfigure), with the
    stack's server certificate, so a client that trusts the stack's CA verifies it. It
    records each request and answers a queue's description with a delivery limit of 9,
    which the dispatcher then logs: proof that the answer came over TLS."""

    PORT = 15671

    def __init__(self, cert: Path, key: Path) -> None:
        self.requests: list[tuple[str, str | None]] = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.requests.append((self.path, self.headers.get("Authorization")))
                # A 3.x broker, and a quorum queue whose policy sets its delivery limit
                # (classic queues have none: RabbitMQ ignores the key there).
                answer: dict[str, object] = (
                    {"rabbitmq_version": "3.13.7"}
                    if self.path == "/api/overview"
                    else {
                        "type": "quorum",
                        "arguments": {},
                        "effective_policy_definition": {"delivery-limit": 9},
                    }
                )
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.PORT), Handler)
        except OSError as exc:
            pytest.fail(f"127.0.0.1:{self.PORT} is taken ({exc}); this test needs it free")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def management_over_https() -> Iterator[ManagementStandIn]:
    tls_dir = Path(str(services.setting("JOBRUNNER_TEST_RABBITMQ_TLS_CA"))).parent
    stand_in = ManagementStandIn(tls_dir / "server.crt", tls_dir / "server.key")
    try:
        yield stand_in
    finally:
        stand_in.stop()


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


async def test_an_amqps_broker_is_asked_its_queue_settings_over_https_never_http(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
    management_over_https: ManagementStandIn,
) -> None:
    """Issue #20 item 6: with amqps:// the management lookup used to go to
    http://user:password@host:15672 with Basic auth, the credentials in clear."""
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
    await publish(rabbitmq_url, queue, b"{}", message_id="settings-over-tls")
    await dispatcher.settled("ack", 1)
    token = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode()
    # The queue's settings, and the broker's version (4.x sets a delivery limit of its own),
    # each asked once, over https only.
    assert sorted(management_over_https.requests) == [
        ("/api/overview", f"Basic {token}"),
        (f"/api/queues/%2F/{queue}", f"Basic {token}"),
    ]
    logs = dispatcher.logs()
    assert f"queue {queue} is a quorum queue with delivery limit 9" in logs
    assert str(parsed.password) not in logs
