"""A broker's password never reaches the log, however the connection goes: a dispatcher
on the real NATS and Redis, reached through a TCP proxy that the test cuts, so the
client sees its broker drop it and reconnects (the lines a reconnect writes are where
``nats://user:password@…`` used to appear, on every one; issue #20 item 3)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests import services
from tests.helpers import eventually
from tests.integration.brokers import make_kit
from tests.integration.harness import Dispatcher, busybox_job, wait_for_jobs
from tests.integration.internal_service import Proxy

pytestmark = [pytest.mark.kube]


def write(tmp_path: Path, namespace: str, trigger: dict[str, Any], *extra: dict[str, Any]) -> Path:
    docs = [
        {
            "apiVersion": "jobrunner.dev/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "work", "namespace": namespace},
            "spec": {"jobTargetRef": busybox_job(), "triggers": [trigger]},
        },
        *extra,
    ]
    path = tmp_path / "work.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


@pytest.mark.parametrize("kind", [pytest.param("nats", marks=pytest.mark.nats),
                                  pytest.param("redis", marks=pytest.mark.redis)])  # fmt: skip
async def test_a_brokers_password_is_never_logged_across_a_reconnect(
    request: pytest.FixtureRequest,
    kube_api: client.ApiClient,
    namespace: str,
    tmp_path: Path,
    dispatchers: Callable[..., Dispatcher],
    kind: str,
) -> None:
    kit = make_kit(kind, request)
    await kit.prepare()
    extra: list[dict[str, Any]] = []
    if kind == "nats":
        server = urllib.parse.urlsplit(kit.url)
        proxy = await Proxy(str(server.hostname), int(server.port or 4222)).start()
        # The local NATS has no authorization: it takes any user and password, so the
        # password can ride in the URL as a tenant would write it.
        password = "nats-pw-4e1b-never-logged"
        trigger = kit.trigger(natsServer=f"nats://probe:{password}@127.0.0.1:{proxy.port}")
    else:
        user = services.setting("JOBRUNNER_TEST_REDIS_USER")
        secret = services.setting("JOBRUNNER_TEST_REDIS_PASSWORD")
        if not user or not secret:
            services.missing("Redis's ACL user", "JOBRUNNER_TEST_REDIS_USER is unset")
        password = str(secret)
        host, _, port = kit.address.rpartition(":")
        proxy = await Proxy(host, int(port)).start()
        trigger = kit.trigger(address=f"127.0.0.1:{proxy.port}")
        trigger["authenticationRef"] = {"name": "redis-auth"}
        extra = [
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "TriggerAuthentication",
                "metadata": {"name": "redis-auth", "namespace": namespace},
                "spec": {
                    "secretTargetRef": [
                        {"parameter": p, "name": "redis-credentials", "key": p}
                        for p in ("username", "password")
                    ]
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "redis-credentials", "namespace": namespace},
                "stringData": {"username": str(user), "password": password},
            },
        ]
    try:
        dispatcher = dispatchers(write(tmp_path, namespace, trigger, *extra), kit.env)
        await kit.publish(b'{"task": "before"}', message_id="before")
        await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete", within=60)
        await dispatcher.settled("ack", 1)
        connected = proxy.connections
        proxy.cut()

        async def reconnected() -> bool:
            return proxy.connections > connected

        await eventually(reconnected, within=60, interval=0.3)
        await kit.publish(b'{"task": "after"}', message_id="after")
        await wait_for_jobs(kube_api, namespace, "work", 2, state="Complete", within=90)
        await dispatcher.settled("ack", 2, within=90)
    finally:
        await proxy.stop()
        await kit.cleanup()
    logs = dispatcher.logs()
    assert proxy.cuts == 1
    assert password not in logs, [line for line in logs.splitlines() if password in line][:5]
    if kind == "nats":  # nats-py tells each disconnect (redis-py reconnects in silence)
        assert f"NATS at nats://127.0.0.1:{proxy.port}" in logs, "the host, without userinfo"
