"""The HTTP trigger without a server: its metadata and the rules a tenant is held to,
the CloudEvents binding (checked against the cloudevents SDK's own encoders), who gets
in, and the dead letter a failed event becomes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent
from multidict import CIMultiDict

from jobrunner.core.models import Decision, TokenReview
from jobrunner.manifest.loader import parse_scaledjob
from jobrunner.manifest.scaledjob import ManifestError, TriggerAuthentication
from jobrunner.manifest.triggers import (
    Reach,
    ResolveContext,
    check_trigger,
    resolve_trigger,
)
from jobrunner.manifest.triggers.http import HttpTrigger
from jobrunner.sources.http import open_source
from jobrunner.sources.http.auth import Authenticator
from jobrunner.sources.http.binding import (
    EventRejected,
    dead_letter_event,
    location,
    parse_event,
)

TOKEN = "0123456789abcdef0123"


def scaledjob(metadata: dict[str, str], *, namespace: str = "ns", **spec: Any) -> Any:
    return parse_scaledjob(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledJob",
            "metadata": {"name": "hooks", "namespace": namespace},
            "spec": {
                "jobTargetRef": {"template": {}},
                "triggers": [
                    {
                        "type": "http",
                        "metadata": metadata,
                        **(
                            {"authenticationRef": {"name": "hook-auth"}}
                            if "auth_ref" in spec
                            else {}
                        ),
                    }
                ],
                **{k: v for k, v in spec.items() if k != "auth_ref"},
            },
        }
    )


def authentication(namespace: str = "ns") -> TriggerAuthentication:
    return TriggerAuthentication.model_validate(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": "hook-auth", "namespace": namespace},
            "spec": {"secretTargetRef": [{"parameter": "token", "name": "hook", "key": "token"}]},
        }
    )


async def resolve(
    metadata: dict[str, str], *, tenant: bool = False, token: str | None = TOKEN, **spec: Any
) -> HttpTrigger:
    if token is not None:
        spec["auth_ref"] = True
    sj = scaledjob(metadata, **spec)

    async def read_secret(namespace: str, name: str) -> dict[str, str] | None:
        if token is None or name != "hook":
            return None
        return {"token": base64.b64encode(token.encode()).decode()}  # a Secret's data

    context = ResolveContext(
        scaledjob=sj,
        trigger=sj.spec.triggers[0],
        authentications={"hook-auth": authentication()} if token is not None else {},
        read_secret=read_secret,
        state_dir=Path("."),
        reach=Reach.for_tenants({}) if tenant else Reach.own({}),
    )
    resolved: HttpTrigger = (await resolve_trigger(context))[1]
    return resolved


# ---------------------------------------------------------------------- the manifest
def test_an_http_trigger_is_accepted_once_its_job_exists() -> None:
    sj = scaledjob({"path": "/events"})
    assert sj.spec.ackPolicy == "onJobCreation"
    with pytest.raises(ManifestError, match=r"field spec\.ackPolicy: an HTTP event is accepted"):
        scaledjob({"path": "/events"}, ackPolicy="onJobCompletion")


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({}, "metadata.path"),
        ({"path": "events"}, "metadata.path"),
        ({"path": "/a/../b"}, "metadata.path"),
        ({"path": "/a//b"}, "metadata.path"),
        ({"path": "/a b"}, "metadata.path"),
        ({"path": "/" + "a" * 200}, "metadata.path"),
        ({"path": "/e", "auth": "basic"}, "metadata.auth"),
        ({"path": "/e", "maxPendingRequests": "0"}, "metadata.maxPendingRequests"),
        ({"path": "/e", "maxPendingRequests": "many"}, "metadata.maxPendingRequests"),
        ({"path": "/e", "bodyTimeoutSeconds": "301"}, "metadata.bodyTimeoutSeconds"),
        ({"path": "/e", "listenAddress": "8080"}, "metadata.listenAddress"),
        ({"path": "/e", "listenAddress": "example.com:80"}, "metadata.listenAddress"),
        ({"path": "/e", "listenAddress": "0.0.0.0:70000"}, "metadata.listenAddress"),
        (
            {"path": "/e", "auth": "tokenReview", "serviceAccounts": "ns/sa"},
            "metadata.serviceAccounts",
        ),
        ({"path": "/e", "serviceAccounts": "ns:sa"}, "metadata.serviceAccounts"),
        ({"path": "/e", "pathh": "/x"}, "metadata.pathh"),
    ],
)
def test_metadata_mistakes_are_named(metadata: dict[str, str], field: str) -> None:
    problems = check_trigger(
        scaledjob({"path": "/ok"}).spec.triggers[0].model_copy(update={"metadata": metadata})
    )
    assert field in [p.field for p in problems], problems


def test_dead_letter_url_mistakes_are_named() -> None:
    for url, said in [
        ("ftp://sink/x", "http:// or https://"),
        ("https://user:pw@sink/x", "no credentials"),
    ]:
        with pytest.raises(ManifestError, match=f"field spec.deadLetter.url: .*{said}"):
            scaledjob({"path": "/e"}, deadLetter={"url": url})


async def test_resolve_takes_the_token_from_the_trigger_authentication() -> None:
    trigger = await resolve({"path": "/events/"})
    assert (trigger.path, trigger.auth, trigger.token) == ("/events", "bearer", TOKEN)
    assert TOKEN not in repr(trigger)


async def test_a_short_token_is_refused() -> None:
    with pytest.raises(ManifestError, match="at least 16 characters"):
        await resolve({"path": "/e"}, token="secret")


@pytest.mark.parametrize(
    ("metadata", "token", "said"),
    [
        ({"path": "/other/e"}, TOKEN, "starts with /ns/"),
        ({"path": "/ns/e", "listenAddress": "0.0.0.0:9000"}, TOKEN, "remove listenAddress"),
        ({"path": "/ns/e", "auth": "none"}, None, "no unauthenticated path"),
        (
            {"path": "/ns/e", "auth": "tokenReview", "serviceAccounts": "ns:*,kube-system:*"},
            None,
            "only ServiceAccounts of namespace ns",
        ),
    ],
)
async def test_a_tenant_keeps_to_its_namespace(
    metadata: dict[str, str], token: str | None, said: str
) -> None:
    with pytest.raises(ManifestError, match=said):
        await resolve(metadata, tenant=True, token=token)


async def test_a_tenant_token_review_defaults_to_its_namespace() -> None:
    trigger = await resolve({"path": "/ns/e", "auth": "tokenReview"}, tenant=True, token=None)
    assert trigger.service_accounts == ("ns:*",)
    assert trigger.tenant


async def test_no_authentication_is_refused_outside_local() -> None:
    from jobrunner.core.settings import Executor, Settings

    trigger = await resolve({"path": "/e"}, token=None)
    assert trigger.auth == "none"
    sj = scaledjob({"path": "/e"})
    cluster = Settings(executor=Executor.KUBERNETES)
    assert cluster.http.listen_address == "0.0.0.0:8081"  # not /metrics' 8080
    assert cluster.telemetry.http_port in (None, 8080)
    with pytest.raises(ManifestError, match="needs authentication outside --local"):
        open_source(trigger, scaledjob=sj, settings=Settings(executor=Executor.KUBERNETES))
    local = open_source(trigger, scaledjob=sj, settings=Settings(executor=Executor.LOCAL))
    assert local.address == "127.0.0.1:8080"


# ---------------------------------------------------------------------- the binding
def sdk_event(data: Any, **attributes: str) -> CloudEvent:
    return CloudEvent({"source": "/sensors/7", "type": "dev.example.reading", **attributes}, data)


def headers_of(pairs: dict[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


@pytest.mark.parametrize(
    ("data", "content_type", "body"),
    [
        ({"celsius": 21.5}, "application/json", b""),
        (b"\x00\xffraw", "application/octet-stream", b"\x00\xffraw"),
        ("plain text", "text/plain", b"plain text"),
    ],
)
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_the_sdks_events_parse_as_sent(
    data: Any, content_type: str, body: bytes, mode: str
) -> None:
    event = sdk_event(data, datacontenttype=content_type, id="e-1", traceextension="x")
    encode = to_binary if mode == "binary" else to_structured
    headers, payload = encode(event)
    headers = {**headers, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    delivery = parse_event(path="/e", headers=headers_of(headers), body=payload)
    if mode == "binary":
        assert delivery.body == payload  # the body as sent, byte for byte
    elif content_type == "application/json":  # JSON data is re-serialised: the same value
        assert json.loads(delivery.body) == data
    else:
        assert delivery.body == body
    assert delivery.identity == "/sensors/7#e-1"
    assert delivery.message_id == "e-1"
    assert delivery.content_type is not None
    assert delivery.content_type.startswith(content_type.split(";")[0])
    assert delivery.headers["ce-type"] == "dev.example.reading"
    assert delivery.headers["ce-traceextension"] == "x"
    assert delivery.headers["traceparent"].startswith("00-111")
    assert delivery.positional  # a retry of the event adopts its Job
    assert delivery.metadata["path"] == "/e"


def test_binary_and_structured_of_one_event_are_one_identity() -> None:
    event = sdk_event({"k": 1}, id="same")
    one = parse_event(path="/e", headers=headers_of(to_binary(event)[0]), body=to_binary(event)[1])
    two = parse_event(
        path="/e", headers=headers_of(to_structured(event)[0]), body=to_structured(event)[1]
    )
    assert one.identity == two.identity


def test_the_same_id_from_two_sources_is_two_events() -> None:
    a = parse_event(path="/e", headers=headers_of(to_binary(sdk_event(1, id="1"))[0]), body=b"1")
    other = sdk_event(1, id="1", source="/sensors/8")
    b = parse_event(path="/e", headers=headers_of(to_binary(other)[0]), body=b"1")
    assert a.identity != b.identity


def test_a_plain_body_takes_its_id_from_idempotency_key_else_its_digest() -> None:
    keyed = parse_event(path="/e", headers=headers_of({"Idempotency-Key": "k-1"}), body=b"x")
    assert (keyed.identity, keyed.message_id) == ("k-1", "k-1")
    one = parse_event(path="/e", headers=headers_of({}), body=b"x")
    two = parse_event(path="/e", headers=headers_of({"User-Agent": "other"}), body=b"x")
    assert one.identity == two.identity
    assert one.identity.startswith("sha256:")


def test_no_request_header_but_ce_and_trace_reaches_the_job() -> None:
    headers = headers_of(
        {
            "Authorization": f"Bearer {TOKEN}",
            "Cookie": "session=1",
            "ce-id": "1",
            "ce-source": "/s",
            "ce-type": "t",
            "ce-specversion": "1.0",
        }
    )
    delivery = parse_event(path="/e", headers=headers, body=b"")
    assert all(k.startswith("ce-") for k in delivery.headers), delivery.headers
    assert TOKEN not in json.dumps(dict(delivery.headers))


@pytest.mark.parametrize(
    ("headers", "body", "status", "said"),
    [
        ({"ce-id": "1", "ce-source": "/s", "ce-specversion": "1.0"}, b"", 400, "type"),
        (
            {"ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-specversion": "2.0"},
            b"",
            400,
            "specversion",
        ),
        (
            {"ce-id": "x" * 1025, "ce-source": "/s", "ce-type": "t", "ce-specversion": "1.0"},
            b"",
            400,
            "at most",
        ),
        ({**{f"ce-x{i}": "v" for i in range(70)}, "ce-id": "1"}, b"", 400, "more than 64"),
        ({"Content-Type": "application/cloudevents+json"}, b"{not json", 400, "must be JSON"),
        ({"Content-Type": "application/cloudevents+json"}, b"[1]", 400, "JSON object"),
        (
            {"Content-Type": "application/cloudevents+json"},
            b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}',
            400,
            "not both",
        ),
        (
            {"Content-Type": "application/cloudevents+json"},
            b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"!!"}',
            400,
            "not base64",
        ),
        (
            {"Content-Type": "application/cloudevents+json"},
            b'{"specversion":"1.0","id":{"a":1},"source":"/s","type":"t"}',
            400,
            "not a scalar",
        ),
        ({"Content-Type": "application/cloudevents-batch+json"}, b"[]", 415, "each event alone"),
        ({"Idempotency-Key": "k" * 1025}, b"", 400, "Idempotency-Key"),
    ],
)
def test_requests_that_break_the_binding_are_refused(
    headers: dict[str, str], body: bytes, status: int, said: str
) -> None:
    with pytest.raises(EventRejected) as caught:
        parse_event(path="/e", headers=headers_of(headers), body=body)
    assert caught.value.status == status
    assert said in caught.value.text


def test_a_location_survives_any_id() -> None:
    for identity in ["/sensors/7#e-1", "a b?c=d&e#f", "ünï", "../../etc"]:
        where = location("/e", identity)
        assert where.startswith("/e/")
        assert "/" not in where[3:]
        assert "?" not in where


def test_a_failed_event_becomes_a_dead_letter_cloudevent() -> None:
    original = {
        "identity": "/s#1",
        "headers": {"ce-source": "/s", "ce-id": "1", "ce-type": "t"},
        "content_type": "application/json",
        "body": b'{"k":1}',
    }
    decision = Decision.dead_letter("BackoffLimitExceeded", "worker exited 3", "hooks-abc")
    event = dead_letter_event(original, decision, namespace="ns", scaledjob="hooks")
    assert event["id"] == "hooks-abc/dead-letter"  # the same on every retry: a sink drops repeats
    assert event["jobrunnerreason"] == "BackoffLimitExceeded"
    assert base64.b64decode(event["data_base64"]) == b'{"k":1}'
    assert (event["jobrunnereventsource"], event["jobrunnereventid"]) == ("/s", "1")
    # CloudEvents: extension names are lower-case alphanumerics, at most 20 characters.
    for key in event:
        assert key == "data_base64" or (key.isalnum() and key.islower()), key
        assert len(key) <= 20, key


# ---------------------------------------------------------------------- who gets in
class Reviewer:
    """The API server's verdicts for a few tokens (the real TokenReview is tested on
    the stack, tests/integration/test_http_operator.py)."""

    def __init__(self, verdicts: dict[str, TokenReview]) -> None:
        self.verdicts = verdicts

    async def review_token(self, token: str, *, audiences: tuple[str, ...] = ()) -> TokenReview:
        return self.verdicts.get(token, TokenReview(authenticated=False))


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("", 401),
        ("Basic dXNlcjpwYXNz", 401),
        ("Bearer ", 401),
        (f"Bearer {TOKEN}x", 401),
        (f"Bearer {TOKEN[:-1]}", 401),
        (f"bearer {TOKEN}", None),
        (f"Bearer {TOKEN}", None),
    ],
)
async def test_a_bearer_token_must_match(authorization: str | None, status: int | None) -> None:
    auth = Authenticator(mode="bearer", token=TOKEN)
    if status is None:
        await auth.check(authorization)
        return
    with pytest.raises(EventRejected) as caught:
        await auth.check(authorization)
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("username", "allowed", "status"),
    [
        ("system:serviceaccount:ns:producer", ("ns:*",), None),
        ("system:serviceaccount:ns:producer", ("ns:producer",), None),
        ("system:serviceaccount:ns:other", ("ns:producer",), 403),
        ("system:serviceaccount:other:producer", ("ns:*",), 403),
        ("system:serviceaccount:ns:producer:extra", ("ns:*",), 403),
        ("admin", ("ns:*",), 403),
        ("system:serviceaccount:ns", ("ns:*",), 403),
    ],
)
async def test_a_service_account_must_be_allowed(
    username: str, allowed: tuple[str, ...], status: int | None
) -> None:
    reviewer = Reviewer({"good": TokenReview(authenticated=True, username=username)})
    auth = Authenticator(mode="tokenReview", service_accounts=allowed, reviewer=reviewer)
    with pytest.raises(EventRejected) as unknown:
        await auth.check("Bearer forged")
    assert unknown.value.status == 401
    if status is None:
        await auth.check("Bearer good")
        return
    with pytest.raises(EventRejected) as caught:
        await auth.check("Bearer good")
    assert caught.value.status == status


# ---------------------------------------------------------------------- one path, one owner
class Owner:
    def __init__(self, namespace: str, scaledjob: str) -> None:
        self.namespace, self.scaledjob = namespace, scaledjob

    async def post(self, request: Any) -> Any:
        raise AssertionError("not called")

    async def get(self, request: Any, identity: str) -> Any:
        raise AssertionError("not called")


async def test_a_path_is_one_scaledjobs_and_its_next_dispatcher_takes_it_over() -> None:
    from jobrunner.core.protocols import SourceError
    from jobrunner.sources.http.listener import Listeners

    listeners = Listeners()
    old, new, other = Owner("ns", "hooks"), Owner("ns", "hooks"), Owner("other", "hooks")
    listener = await listeners.add("127.0.0.1:0", "/ns/e", old)
    try:
        with pytest.raises(SourceError, match="already served by ScaledJob ns/hooks"):
            await listeners.add("127.0.0.1:0", "/ns/e", other)
        assert await listeners.add("127.0.0.1:0", "/ns/e", new) is listener
        await listeners.remove("127.0.0.1:0", "/ns/e", old)  # the old one leaves it alone
        assert listener.routes["/ns/e"] is new
    finally:
        await listeners.remove("127.0.0.1:0", "/ns/e", new)
    assert listener.routes == {}


def test_forwarded_headers_reach_the_job_and_credentials_never_do() -> None:
    headers = headers_of(
        {"X-Hub-Signature-256": "sha256=ab", "X-Other": "no", "Authorization": "Bearer t"}
    )
    delivery = parse_event(
        path="/e", headers=headers, body=b"{}", forward=("x-hub-signature-256", "authorization")
    )
    assert delivery.headers == {"x-hub-signature-256": "sha256=ab", "authorization": "Bearer t"}
    # ...which is why the manifest refuses to name a credential:
    for name in ("Authorization", "cookie", "Proxy-Authorization", "ce-id", "bad name"):
        trigger = scaledjob({"path": "/e"}).spec.triggers[0]
        problems = check_trigger(
            trigger.model_copy(update={"metadata": {"path": "/e", "forwardHeaders": name}})
        )
        assert [p.field for p in problems] == ["metadata.forwardHeaders"], name
    many = ",".join(f"x-h{i}" for i in range(17))
    trigger = scaledjob({"path": "/e"}).spec.triggers[0]
    problems = check_trigger(
        trigger.model_copy(update={"metadata": {"path": "/e", "forwardHeaders": many}})
    )
    assert [p.field for p in problems] == ["metadata.forwardHeaders"]


def test_distinct_sources_and_ids_never_share_an_identity() -> None:
    def identity(source: str, event_id: str) -> str:
        headers = {"ce-specversion": "1.0", "ce-type": "t", "ce-source": source, "ce-id": event_id}
        return parse_event(path="/e", headers=headers_of(headers), body=b"").identity

    assert identity("a#b", "c") != identity("a", "b#c")
    assert identity("a%23b", "c") != identity("a#b", "c")
    assert identity("/s", "1") == "/s#1"  # the common case reads as it is


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "\x1b[31mred", "nul\x00", "c1\x85"])
def test_control_characters_in_attributes_are_refused(value: str) -> None:
    body = json.dumps({"specversion": "1.0", "type": "t", "source": "/s", "id": value})
    with pytest.raises(EventRejected) as caught:
        parse_event(
            path="/e",
            headers=headers_of({"Content-Type": "application/cloudevents+json"}),
            body=body.encode(),
        )
    assert caught.value.status == 400
    assert "control character" in caught.value.text


def test_bearer_without_an_authentication_is_refused_by_validate() -> None:
    trigger = scaledjob({"path": "/e"}).spec.triggers[0]
    problems = check_trigger(
        trigger.model_copy(update={"metadata": {"path": "/e", "auth": "bearer"}})
    )
    assert [p.field for p in problems] == ["metadata.auth"]


async def test_paths_inside_one_another_are_refused() -> None:
    from jobrunner.core.protocols import SourceError
    from jobrunner.sources.http.listener import Listeners

    listeners = Listeners()
    a, b = Owner("ns", "a"), Owner("ns", "b")
    await listeners.add("127.0.0.1:0", "/ns/a", a)
    try:
        for path in ("/ns/a/b", "/ns"):
            with pytest.raises(SourceError, match="nests with /ns/a"):
                await listeners.add("127.0.0.1:0", path, b)
        await listeners.add("127.0.0.1:0", "/ns/ab", b)  # a sibling, not inside
        await listeners.remove("127.0.0.1:0", "/ns/ab", b)
    finally:
        await listeners.remove("127.0.0.1:0", "/ns/a", a)
