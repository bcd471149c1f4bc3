"""jobrunner's CloudEvents HTTP binding (jobrunner.sources.http.binding.parse_event)
agrees with the real ``cloudevents`` SDK's own encoders: an event the SDK encodes in
binary mode (``to_binary``) and in structured mode (``to_structured``) parses to the same
identity, attributes, content type and data, and that data is the event's (JSON data,
bytes as ``data_base64``, text, extensions, ``traceparent``). Headers are given as the
server gives them (case-insensitive), with Go's canonical casing (``Ce-Id``) as Knative
sends them."""

from __future__ import annotations

import json
from typing import Any

from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from jobrunner.core.models import Delivery
from jobrunner.sources.http.binding import event_identity, parse_event

TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)
NAMES = st.from_regex(r"[a-z][a-z0-9]{0,19}", fullmatch=True).filter(
    lambda n: (
        n not in {"id", "source", "type", "specversion", "time", "subject", "data", "dataschema"}
        and n not in {"datacontenttype", "data_base64"}
    )
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)
TRACEPARENT = st.from_regex(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", fullmatch=True)


def canonical(headers: dict[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(
        {"-".join(p.capitalize() for p in k.split("-")): v for k, v in headers.items()}
    )


def both(ce: CloudEvent, **binary: Any) -> tuple[Delivery, Delivery]:
    b_headers, b_body = to_binary(ce, **binary)
    s_headers, s_body = to_structured(ce)
    return (
        parse_event(path="/events", headers=canonical(b_headers), body=b_body),
        parse_event(path="/events", headers=canonical(s_headers), body=s_body),
    )


def agree(b: Delivery, s: Delivery, ce: CloudEvent) -> None:
    assert b.identity == s.identity == event_identity(ce["source"], ce["id"])
    assert b.message_id == s.message_id == ce["id"]
    assert b.headers == s.headers
    assert b.content_type == s.content_type
    if b.content_type == "application/json":
        # The same value; binary keeps the sender's bytes (a signature may cover them).
        assert json.loads(b.body) == json.loads(s.body)
    else:
        assert b.body == s.body  # one body digest: one Job, whichever mode
    for name, value in ce.get_attributes().items():
        if name != "datacontenttype":
            assert b.headers[f"ce-{name}"] == str(value)


@settings(max_examples=150, deadline=None)
@given(
    event_id=TEXT,
    source=TEXT,
    data=JSON,
    extensions=st.dictionaries(NAMES, TEXT, max_size=5),
    traceparent=st.none() | TRACEPARENT,
    subject=st.none() | TEXT,
)
def test_json_events_parse_alike_from_both_sdk_encodings(
    event_id: str,
    source: str,
    data: Any,
    extensions: dict[str, str],
    traceparent: str | None,
    subject: str | None,
) -> None:
    attributes = {
        "type": "dev.test",
        "source": source,
        "id": event_id,
        "datacontenttype": "application/json",
        **extensions,
    }
    if traceparent:
        attributes["traceparent"] = traceparent
    if subject:
        attributes["subject"] = subject
    ce = CloudEvent(attributes, data if data is not None else {"empty": True})
    b, s = both(ce)
    agree(b, s, ce)
    assert json.loads(b.body) == ce.data
    assert b.content_type == "application/json"
    if traceparent:
        assert b.headers["ce-traceparent"] == traceparent


@settings(max_examples=100, deadline=None)
@given(event_id=TEXT, data=st.binary(min_size=1, max_size=200))
def test_bytes_data_is_data_base64_structured_and_the_body_binary(
    event_id: str, data: bytes
) -> None:
    ce = CloudEvent(
        {
            "type": "dev.test",
            "source": "/bytes",
            "id": event_id,
            "datacontenttype": "application/octet-stream",
        },
        data,
    )
    b, s = both(ce)
    agree(b, s, ce)
    assert b.body == data
    assert b.content_type == "application/octet-stream"


@settings(max_examples=100, deadline=None)
@given(event_id=TEXT, text=st.text(max_size=80).filter(bool))
def test_text_data_is_the_text_in_both_modes(event_id: str, text: str) -> None:
    ce = CloudEvent(
        {"type": "dev.test", "source": "/text", "id": event_id, "datacontenttype": "text/plain"},
        text,
    )
    # The SDK's default marshaller JSON-encodes even text: a text body is its bytes.
    b, s = both(ce, data_marshaller=lambda value: value.encode())
    agree(b, s, ce)
    assert b.body == text.encode()
    assert b.content_type == "text/plain"


def test_a_w3c_traceparent_header_reaches_the_job_beside_the_event() -> None:
    ce = CloudEvent({"type": "dev.test", "source": "/t", "id": "1"}, {"a": 1})
    headers, body = to_binary(ce)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    given_headers = canonical({**headers, "content-type": "application/json"})
    given_headers["traceparent"] = parent
    delivery = parse_event(path="/events", headers=given_headers, body=body)
    assert delivery.headers["traceparent"] == parent
    assert json.loads(delivery.body) == {"a": 1}
