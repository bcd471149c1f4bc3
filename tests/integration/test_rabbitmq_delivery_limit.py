"""A quorum queue's delivery limit as the stack's broker applies it, read through its
management API: the broker's version from /api/overview (which decides the default: none
on 3.x, 20 on 4.x), the smaller of argument and policy. The stack runs RabbitMQ 3.x; the
4.x rules are tested on their own in tests/unit/test_rabbitmq_delivery_limit.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from jobrunner.sources.rabbitmq import QueueSettings, management_queue_settings
from tests import services

pytestmark = [pytest.mark.rabbitmq]


@pytest.fixture
def management() -> str:
    url = services.setting("JOBRUNNER_TEST_RABBITMQ_MANAGEMENT_URL")
    if not url:
        services.missing("RabbitMQ's management API", "JOBRUNNER_TEST_RABBITMQ_MANAGEMENT_URL")
    assert url is not None
    return url


def _call(management: str, method: str, path: str, body: Any = None) -> Any:
    parsed = urllib.parse.urlsplit(management)
    request = urllib.request.Request(
        f"{parsed.scheme}://{parsed.hostname}:{parsed.port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    password = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    password.add_password(
        None,
        f"{parsed.scheme}://{parsed.hostname}:{parsed.port}/",
        parsed.username or "",
        parsed.password or "",
    )
    opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(password))
    with opener.open(request, timeout=10) as response:
        text = response.read()
    return json.loads(text) if text else None


@pytest.fixture
async def queue_name(rabbitmq_url: str, management: str) -> AsyncIterator[str]:
    name = f"dl-{uuid.uuid4().hex[:10]}"
    yield name
    async with await aio_pika.connect(rabbitmq_url) as connection:
        await (await connection.channel()).queue_delete(name)
    with contextlib.suppress(urllib.error.HTTPError):  # a test that made none
        _call(management, "DELETE", f"/api/policies/%2F/{name}")


async def _declare(url: str, name: str, **arguments: Any) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments=arguments)


def _settings(management: str, queue: str) -> QueueSettings:
    parsed = urllib.parse.urlsplit(management)
    return management_queue_settings(
        f"{parsed.scheme}://{parsed.hostname}:{parsed.port}/",
        "/",
        queue,
        credentials=(parsed.username or "", parsed.password or ""),
    )


async def test_the_broker_version_decides_a_quorum_queue_s_default_limit(
    rabbitmq_url: str, management: str, queue_name: str
) -> None:
    version = _call(management, "GET", "/api/overview")["rabbitmq_version"]
    await _declare(rabbitmq_url, queue_name, **{"x-queue-type": "quorum"})
    settings = await asyncio.to_thread(_settings, management, queue_name)
    assert settings.broker_version == version
    assert settings.queue_type == "quorum"
    # The stack's 3.x sets no limit; a 4.x broker would apply (and report) 20.
    expected = None if version.startswith("3.") else 20
    assert settings.delivery_limit == expected


async def test_the_smaller_of_argument_and_policy_is_the_limit(
    rabbitmq_url: str, management: str, queue_name: str
) -> None:
    await _declare(rabbitmq_url, queue_name, **{"x-queue-type": "quorum", "x-delivery-limit": 5})
    _call(
        management,
        "PUT",
        f"/api/policies/%2F/{queue_name}",
        {"pattern": f"^{queue_name}$", "definition": {"delivery-limit": 3}, "apply-to": "queues"},
    )

    def applied() -> bool:
        info = _call(management, "GET", f"/api/queues/%2F/{queue_name}")
        return (info.get("effective_policy_definition") or {}).get("delivery-limit") == 3

    for _ in range(100):  # the policy applies within a few hundred ms
        if await asyncio.to_thread(applied):
            break
        await asyncio.sleep(0.1)
    settings = await asyncio.to_thread(_settings, management, queue_name)
    assert settings.delivery_limit == 3  # not the argument's 5: the broker takes the smaller


async def test_a_classic_queue_has_no_delivery_limit(
    rabbitmq_url: str, management: str, queue_name: str
) -> None:
    await _declare(rabbitmq_url, queue_name)
    settings = await asyncio.to_thread(_settings, management, queue_name)
    assert settings.queue_type == "classic"
    assert settings.delivery_limit is None
