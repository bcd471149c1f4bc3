"""The HTTP trigger under the operator, attacked as a hostile tenant, on the real API
server: every HTTP ScaledJob shares the operator's one listener; a tenant's POST makes
one Job only with the right credentials (a bearer token from its Secret, or a
ServiceAccount token checked by a real TokenReview); a ScaledJob asking for what a tenant
may not have (another namespace's path, its own address, no authentication, another
namespace's ServiceAccounts, a path already taken) is not Ready and says why, without
stopping the others; a tenant's dead-letter URL never reaches the operator's host; the
bearer token is nowhere a tenant or the log can read."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import busybox_job
from tests.integration.operator_harness import (
    GROUP,
    VERSION,
    OperatorProcess,
    ScaledJobs,
    events_of,
)

pytestmark = [pytest.mark.kube, pytest.mark.integration, pytest.mark.usefixtures("jobrunner_crds")]

TOKEN_A = f"tenant-a-{uuid.uuid4().hex}"
TOKEN_B = f"tenant-b-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_scaledjob(
    name: str, *, namespace: str, metadata: dict[str, str], auth: str | None, **spec: Any
) -> dict[str, Any]:
    trigger: dict[str, Any] = {"type": "http", "metadata": metadata}
    if auth:
        trigger["authenticationRef"] = {"name": auth}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"jobTargetRef": busybox_job(), "triggers": [trigger], **spec},
    }


def bearer_secret(api: client.ApiClient, namespace: str, name: str, token: str) -> None:
    """A Secret with the token and a TriggerAuthentication ``name`` giving it."""
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data={"token": token}),
    )
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "triggerauthentications",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TriggerAuthentication",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "token", "name": name, "key": "token"}]},
        },
    )


def sa_token(api: client.ApiClient, namespace: str, name: str, audience: str = "") -> str:
    """A real ServiceAccount token from the TokenRequest API (the SA made if missing)."""
    core = client.CoreV1Api(api)
    try:
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    spec = client.V1TokenRequestSpec(
        audiences=[audience] if audience else [], expiration_seconds=600
    )
    answer = core.create_namespaced_service_account_token(
        name, namespace, client.AuthenticationV1TokenRequest(spec=spec)
    )
    return str(answer.status.token)


def jobs_of(api: client.ApiClient, namespace: str, scaledjob: str) -> list[Any]:
    return list(
        client.BatchV1Api(api)
        .list_namespaced_job(namespace, label_selector=f"jobrunner.dev/scaledjob={scaledjob}")
        .items
    )


@pytest.fixture
def other_namespace(kube_api: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        batch = client.BatchV1Api(kube_api)
        for job in batch.list_namespaced_job(name).items:
            if job.metadata.finalizers:
                batch.patch_namespaced_job(
                    job.metadata.name, name, {"metadata": {"finalizers": None}}
                )
        core.delete_namespace(name, propagation_policy="Background")


class Served:
    def __init__(self, process: OperatorProcess, base: str) -> None:
        self.process, self.base = process, base


@pytest.fixture
def operator(
    kubeconfig: Path,
    tmp_path: Path,
    namespace: str,
    other_namespace: str,
    request: pytest.FixtureRequest,
) -> Iterator[Served]:
    port = free_port()
    process = OperatorProcess(
        kubeconfig,
        tmp_path / "op.log",
        namespaces=[namespace, other_namespace],
        lease_namespace=namespace,
        identity="op-http",
        env={"JOBRUNNER_HTTP__LISTEN_ADDRESS": f"127.0.0.1:{port}"},
    ).start()
    yield Served(process, f"http://127.0.0.1:{port}")
    process.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"----- operator -----\n{process.logs()[-20000:]}")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def event_headers(event_id: str, token: str | None = None, **extra: str) -> dict[str, str]:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": "/tests/http",
        "ce-type": "dev.jobrunner.test",
        "Content-Type": "application/json",
        **extra,
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes = b'{"task": "t"}'
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(url, data=body, headers=headers) as response:
        text = await response.text()
        try:
            data = json.loads(text)
        except ValueError:
            data = {"text": text}
        return response.status, data, dict(response.headers)


async def test_a_tenants_post_makes_one_job_and_its_authorization_reaches_nothing(
    kube_api: client.ApiClient, namespace: str, operator: Served, http: aiohttp.ClientSession
) -> None:
    await asyncio.to_thread(bearer_secret, kube_api, namespace, "hook", TOKEN_A)
    crs = ScaledJobs(kube_api, namespace)
    await crs.apply(
        http_scaledjob(
            "hook", namespace=namespace, metadata={"path": f"/{namespace}/events"}, auth="hook"
        )
    )
    await crs.wait_condition("hook", "Ready", "True", within=90)
    url = f"{operator.base}/{namespace}/events"

    status, body, headers = await post(http, url, event_headers("e-1", TOKEN_A))
    assert status == 202, body
    assert headers["Location"] == f"/{namespace}/events/%2Ftests%2Fhttp%23e-1"
    again, _, _ = await post(http, url, event_headers("e-1", TOKEN_A))
    assert again == 202
    jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "hook")
    assert len(jobs) == 1
    job = jobs[0]
    env = {e.name: e.value for e in job.spec.template.spec.containers[0].env or []}
    message_headers = json.loads(env["JOBRUNNER_MESSAGE_HEADERS"])
    assert message_headers["ce-id"] == "e-1"
    assert not any(k.lower() == "authorization" for k in message_headers)
    everything = json.dumps(job.to_dict(), default=str)
    assert TOKEN_A not in everything
    assert "Bearer" not in everything

    # Refusals: no token, a wrong one, a garbage scheme; nothing more is created.
    for wrong in (
        event_headers("e-2"),
        event_headers("e-2", "x" * 40),
        {**event_headers("e-2"), "Authorization": f"Basic {TOKEN_A}"},
    ):
        code, _, answered = await post(http, url, wrong)
        assert code == 401
        assert answered.get("WWW-Authenticate") == "Bearer"

    # Oversized or overlong input: refused before any Job.
    code, _, _ = await post(http, url, event_headers("x" * 1025, TOKEN_A))
    assert code == 400
    many = {f"ce-x{i}": "v" for i in range(70)}
    code, _, _ = await post(http, url, event_headers("e-3", TOKEN_A, **many))
    assert code == 400
    code, _, _ = await post(http, url, event_headers("e-4", TOKEN_A, **{"x-big": "a" * 9000}))
    assert code in (400, 431)
    code, _, _ = await post(http, url, event_headers("e-5", TOKEN_A), body=b"a" * (2 << 20))
    assert code == 413
    assert len(await asyncio.to_thread(jobs_of, kube_api, namespace, "hook")) == 1

    async with http.get(
        f"{operator.base}{headers['Location']}", headers={"Authorization": f"Bearer {TOKEN_A}"}
    ) as r:
        assert r.status in (200, 202), await r.text()
    readable = json.dumps(
        [
            await crs.get("hook"),
            client.CoreV1Api(kube_api).list_namespaced_event(namespace).to_dict(),
        ],
        default=str,
    )
    assert TOKEN_A not in readable
    assert TOKEN_A not in operator.process.logs()


async def test_tenant_a_cannot_post_to_or_read_tenant_b(
    kube_api: client.ApiClient,
    namespace: str,
    other_namespace: str,
    operator: Served,
    http: aiohttp.ClientSession,
) -> None:
    a, b = namespace, other_namespace
    await asyncio.to_thread(bearer_secret, kube_api, a, "hook", TOKEN_A)
    await asyncio.to_thread(bearer_secret, kube_api, b, "hook", TOKEN_B)
    for ns in (a, b):
        await ScaledJobs(kube_api, ns).apply(
            http_scaledjob("hook", namespace=ns, metadata={"path": f"/{ns}/in"}, auth="hook")
        )
    for ns in (a, b):
        await ScaledJobs(kube_api, ns).wait_condition("hook", "Ready", "True", within=90)
    b_url = f"{operator.base}/{b}/in"
    status, _, headers = await post(http, b_url, event_headers("b-1", TOKEN_B))
    assert status == 202
    code, _, _ = await post(http, b_url, event_headers("a-into-b", TOKEN_A))
    assert code == 401
    async with http.get(
        f"{operator.base}{headers['Location']}", headers={"Authorization": f"Bearer {TOKEN_A}"}
    ) as r:
        assert r.status == 401
    # Traversal out of one's own prefix into B's path is no route of A's.
    code, _, _ = await post(
        http, f"{operator.base}/{a}/in/../../{b}/in", event_headers("a-2", TOKEN_A)
    )
    assert code in (401, 404)
    code, _, _ = await post(
        http, f"{operator.base}/{a}/in/%2E%2E/%2E%2E/{b}/in", event_headers("a-3", TOKEN_A)
    )
    assert code in (401, 404)
    assert len(await asyncio.to_thread(jobs_of, kube_api, b, "hook")) == 1
    assert await asyncio.to_thread(jobs_of, kube_api, a, "hook") == []


async def test_service_account_tokens_are_reviewed_by_the_api_server(
    kube_api: client.ApiClient,
    namespace: str,
    other_namespace: str,
    operator: Served,
    http: aiohttp.ClientSession,
) -> None:
    crs = ScaledJobs(kube_api, namespace)
    await crs.apply(
        http_scaledjob(
            "any-sa",
            namespace=namespace,
            metadata={"path": f"/{namespace}/any", "auth": "tokenReview"},
            auth=None,
        )
    )
    await crs.apply(
        http_scaledjob(
            "one-sa",
            namespace=namespace,
            metadata={
                "path": f"/{namespace}/one",
                "auth": "tokenReview",
                "serviceAccounts": f"{namespace}:poster",
            },
            auth=None,
        )
    )
    await crs.apply(
        http_scaledjob(
            "aud",
            namespace=namespace,
            metadata={"path": f"/{namespace}/aud", "auth": "tokenReview", "audience": "hooks"},
            auth=None,
        )
    )
    for name in ("any-sa", "one-sa", "aud"):
        await crs.wait_condition(name, "Ready", "True", within=90)
    poster = await asyncio.to_thread(sa_token, kube_api, namespace, "poster")
    other = await asyncio.to_thread(sa_token, kube_api, namespace, "other")
    foreign = await asyncio.to_thread(sa_token, kube_api, other_namespace, "poster")
    for_hooks = await asyncio.to_thread(sa_token, kube_api, namespace, "poster", "hooks")
    base = f"{operator.base}/{namespace}"

    async def code(path: str, token: str | None, event: str) -> int:
        return (await post(http, f"{base}/{path}", event_headers(event, token)))[0]

    assert await code("any", poster, "p1") == 202
    assert await code("any", other, "o1") == 202
    assert await code("any", foreign, "f1") == 403
    assert await code("any", "garbage.not.a.jwt", "g1") == 401
    assert await code("any", None, "n1") == 401
    assert await code("any", for_hooks, "h1") == 401  # not for the API server's audience
    assert await code("one", poster, "p2") == 202
    assert await code("one", other, "o2") == 403
    assert await code("aud", poster, "p3") == 401  # an API-server token, not for "hooks"
    assert await code("aud", for_hooks, "h3") == 202
    counts = [
        len(await asyncio.to_thread(jobs_of, kube_api, namespace, n))
        for n in ("any-sa", "one-sa", "aud")
    ]
    assert counts == [2, 1, 1]
    logs = operator.process.logs()
    for token in (poster, other, foreign, for_hooks):
        assert token not in logs


async def test_scaledjobs_asking_too_much_are_not_ready_and_say_why(
    kube_api: client.ApiClient,
    namespace: str,
    other_namespace: str,
    operator: Served,
    http: aiohttp.ClientSession,
) -> None:
    await asyncio.to_thread(bearer_secret, kube_api, namespace, "hook", TOKEN_A)
    crs = ScaledJobs(kube_api, namespace)
    ns = namespace
    bodies = {
        "foreign-path": {"path": f"/{other_namespace}/steal"},
        "own-address": {"path": f"/{ns}/addr", "listenAddress": "0.0.0.0:9999"},
        "foreign-sa": {
            "path": f"/{ns}/sa",
            "auth": "tokenReview",
            "serviceAccounts": f"{other_namespace}:*",
        },
    }
    for name, metadata in bodies.items():
        await crs.apply(http_scaledjob(name, namespace=ns, metadata=metadata, auth="hook"))
    await crs.apply(
        http_scaledjob("open", namespace=ns, metadata={"path": f"/{ns}/open"}, auth=None)
    )
    await crs.apply(
        http_scaledjob("first", namespace=ns, metadata={"path": f"/{ns}/shared"}, auth="hook")
    )
    await crs.wait_condition("first", "Ready", "True", within=90)
    await crs.apply(
        http_scaledjob("second", namespace=ns, metadata={"path": f"/{ns}/shared"}, auth="hook")
    )
    expected = {
        "foreign-path": f"starts with /{ns}/",
        "own-address": "remove listenAddress",
        "foreign-sa": f"only ServiceAccounts of namespace {ns}",
        "open": "serves no unauthenticated path",
    }
    for name, words in expected.items():
        refused = await crs.wait_condition(name, "Ready", "False", within=60)
        assert words in refused["message"], (name, refused)
        assert refused["reason"] in ("InvalidSpec", "DispatcherFailed"), refused
    conflict = await crs.wait_condition(
        "second", "Ready", "False", reason="SourceUnavailable", within=60
    )
    assert f"path /{ns}/shared" in conflict["message"]
    assert f"already served by ScaledJob {ns}/first" in conflict["message"]

    async def told() -> bool:
        return "SourceFailed" in await asyncio.to_thread(events_of, kube_api, ns, "second")

    await eventually(told, within=30, interval=0.5)
    # The first goes on serving the path, the operator goes on running.
    status, _, _ = await post(http, f"{operator.base}/{ns}/shared", event_headers("s1", TOKEN_A))
    assert status == 202
    assert operator.process.alive
    assert len(await asyncio.to_thread(jobs_of, kube_api, ns, "first")) == 1
    assert await asyncio.to_thread(jobs_of, kube_api, ns, "second") == []
    # The path freed, the second one takes it.
    await crs.delete("first")
    await crs.wait_condition("second", "Ready", "True", within=90)


async def test_a_tenants_dead_letter_url_never_reaches_the_operators_host(
    kube_api: client.ApiClient, namespace: str, operator: Served, http: aiohttp.ClientSession
) -> None:
    received: list[bytes] = []

    async def sink(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", sink)
    runner = web.AppRunner(app)
    await runner.setup()
    sink_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", sink_port).start()
    try:
        await asyncio.to_thread(bearer_secret, kube_api, namespace, "hook", TOKEN_A)
        crs = ScaledJobs(kube_api, namespace)
        await crs.apply(
            http_scaledjob(
                "doomed",
                namespace=namespace,
                metadata={"path": f"/{namespace}/doomed"},
                auth="hook",
                deadLetter={"url": f"http://127.0.0.1:{sink_port}/dead"},
            )
        )
        await crs.wait_condition("doomed", "Ready", "True", within=90)
        status, _, _ = await post(
            http,
            f"{operator.base}/{namespace}/doomed",
            event_headers("d1", TOKEN_A),
            body=b'{"fail": "failed"}',
        )
        assert status == 202

        async def failed() -> bool:
            jobs = await asyncio.to_thread(jobs_of, kube_api, namespace, "doomed")
            return any(
                c.type == "Failed" and c.status == "True"
                for j in jobs
                for c in j.status.conditions or []
            )

        await eventually(failed, within=60, interval=0.5)

        async def refused() -> bool:
            return "does not post to" in operator.process.logs()

        await eventually(refused, within=30, interval=0.5)
        await asyncio.sleep(2)
        assert received == []
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://169.254.169.254/latest",
        "http://[::1]:9/x",
        "http://localhost:9/x",
        "http://0.0.0.0:9/x",
    ],
)
async def test_internal_dead_letter_hosts_are_refused(url: str) -> None:
    from jobrunner.core.protocols import SourceError
    from jobrunner.sources.http.deadletters import refuse_internal

    with pytest.raises(SourceError):
        await refuse_internal(url)


async def test_a_rotated_token_takes_over_and_the_old_one_is_refused(
    kube_api: client.ApiClient, namespace: str, operator: Served, http: aiohttp.ClientSession
) -> None:
    """The Secret changes: the ScaledJob's dispatcher is replaced (the old one gives up
    the path, the new one takes it: never two holders, never a crash), the new token gets
    in and the old one no longer does."""
    await asyncio.to_thread(bearer_secret, kube_api, namespace, "hook", TOKEN_A)
    crs = ScaledJobs(kube_api, namespace)
    await crs.apply(
        http_scaledjob(
            "hook", namespace=namespace, metadata={"path": f"/{namespace}/rot"}, auth="hook"
        )
    )
    await crs.wait_condition("hook", "Ready", "True", within=90)
    url = f"{operator.base}/{namespace}/rot"
    assert (await post(http, url, event_headers("r1", TOKEN_A)))[0] == 202
    rotated = f"rotated-{uuid.uuid4().hex}"
    await asyncio.to_thread(
        client.CoreV1Api(kube_api).patch_namespaced_secret,
        "hook",
        namespace,
        {"stringData": {"token": rotated}},
    )

    async def new_one_in() -> bool:
        return (await post(http, url, event_headers("r2", rotated)))[0] == 202

    await eventually(new_one_in, within=60, interval=0.5)
    assert (await post(http, url, event_headers("r3", TOKEN_A)))[0] == 401
    await crs.wait_condition("hook", "Ready", "True", within=30)
    assert len(await asyncio.to_thread(jobs_of, kube_api, namespace, "hook")) == 2
    assert rotated not in operator.process.logs()
    assert operator.process.alive
