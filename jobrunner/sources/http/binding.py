"""The CloudEvents HTTP protocol binding as the HTTP trigger takes it: a POST in binary
mode (``ce-*`` headers), structured mode (``application/cloudevents+json``) or a plain
body becomes a Delivery; a failed event becomes the structured CloudEvent sent to the
dead-letter sink. Pure: no I/O.

Rules from the CloudEvents spec v1.0.2 ("HTTP Protocol Binding"): attributes are
``ce-`` headers in binary mode, members of the JSON object in structured mode, where
``data`` holds JSON and ``data_base64`` bytes (never both); ``id``, ``source``,
``specversion`` and ``type`` are required; ``source`` + ``id`` identify an event.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from jobrunner.core.models import Decision, Delivery
from jobrunner.core.naming import message_identity

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
ID_MAX = 1024
"""The longest CloudEvents ``id``, ``source`` or ``Idempotency-Key`` taken (the spec sets
none; each goes into the Job's annotations and the Location)."""
CE_HEADERS_MAX = 64
"""The most ``ce-*`` attributes (headers) of one event passed to its Job."""
_REQUIRED = ("id", "source", "specversion", "type")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class EventRejected(Exception):
    """An HTTP request that cannot become an event: answered ``status`` with ``text``."""

    def __init__(self, status: int, reason: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.reason = reason
        self.text = text


def parse_event(
    *,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    forward: tuple[str, ...] = (),
) -> Delivery:
    """The Delivery of one POST: a CloudEvent in binary mode (``ce-*`` headers), in
    structured mode (``application/cloudevents+json``), or a plain body (its id from
    ``Idempotency-Key``, else the body's digest). EventRejected (400/415) for a request
    that breaks the binding. Only ``ce-*`` attributes, the content type and the trace
    context (``traceparent``, ``tracestate``) and the headers named in ``forward`` (lower
    case: a webhook's signature, say) reach the Job, never ``Authorization``."""
    content_type = headers.get("Content-Type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == BATCH:
        raise EventRejected(
            415, "BatchNotSupported", "batched CloudEvents are not taken: send each event alone"
        )
    trace = {k: headers[k] for k in ("traceparent", "tracestate", *forward) if k in headers}
    if media == STRUCTURED:
        return _structured(path, body, trace)
    attributes = {k.lower()[3:]: v for k, v in headers.items() if k.lower().startswith("ce-")}
    if attributes:
        return _binary(path, attributes, body, content_type or None, trace)
    key = headers.get("Idempotency-Key") or None
    if key is not None and (len(key) > ID_MAX or _CONTROL.search(key)):
        raise EventRejected(
            400, "InvalidMessage", f"Idempotency-Key: at most {ID_MAX} printable characters"
        )
    identity = message_identity(key, body, {})
    return Delivery(
        source="http",
        identity=identity,
        body=body,
        message_id=key,
        headers=trace,
        content_type=content_type or None,
        metadata={"path": path},
        received_at=time.monotonic(),
        positional=True,
    )


def _binary(
    path: str,
    attributes: dict[str, str],
    body: bytes,
    content_type: str | None,
    trace: dict[str, str],
) -> Delivery:
    if len(attributes) > CE_HEADERS_MAX:
        raise EventRejected(400, "InvalidMessage", f"more than {CE_HEADERS_MAX} ce- headers")
    return _event(path, attributes, body, content_type, trace)


def _structured(path: str, body: bytes, trace: dict[str, str]) -> Delivery:
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EventRejected(400, "InvalidMessage", "a structured CloudEvent must be JSON") from None
    if not isinstance(event, dict):
        raise EventRejected(400, "InvalidMessage", "a structured CloudEvent is a JSON object")
    if "data" in event and "data_base64" in event:
        raise EventRejected(400, "InvalidMessage", "an event has data or data_base64, not both")
    content_type = event.get("datacontenttype")
    if "data_base64" in event:
        try:
            data = base64.b64decode(str(event["data_base64"]), validate=True)
        except ValueError:
            raise EventRejected(400, "InvalidMessage", "data_base64 is not base64") from None
    elif "data" not in event or event["data"] is None:
        data = b""
    elif isinstance(event["data"], str) and not _is_json(content_type):
        data = event["data"].encode()
    else:
        data = json.dumps(event["data"], separators=(",", ":")).encode()
        content_type = content_type or "application/json"
    attributes = {}
    for key, value in event.items():
        if key in ("data", "data_base64"):
            continue
        if not isinstance(value, str | int | bool):
            raise EventRejected(400, "InvalidMessage", f"attribute {key[:40]!r} is not a scalar")
        attributes[str(key).lower()] = value if isinstance(value, str) else json.dumps(value)
    if len(attributes) > CE_HEADERS_MAX:
        raise EventRejected(400, "InvalidMessage", f"more than {CE_HEADERS_MAX} attributes")
    return _event(path, attributes, data, content_type, trace)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _event(
    path: str,
    attributes: Mapping[str, str],
    body: bytes,
    content_type: str | None,
    trace: dict[str, str],
) -> Delivery:
    missing = [a for a in _REQUIRED if not attributes.get(a)]
    if missing:
        raise EventRejected(
            400,
            "InvalidMessage",
            f"a CloudEvent needs {', '.join(missing)}: add the attribute(s) (binary mode: "
            "ce- headers; structured mode: members of the JSON object)",
        )
    if attributes["specversion"] not in ("1.0", "0.3"):
        raise EventRejected(400, "InvalidMessage", "specversion 1.0 (or 0.3) is supported")
    event_id, source = attributes["id"], attributes["source"]
    if len(event_id) > ID_MAX or len(source) > ID_MAX:
        raise EventRejected(400, "InvalidMessage", f"id and source are at most {ID_MAX} each")
    for name, value in attributes.items():
        if _CONTROL.search(value):
            # CloudEvents v1.0.2, "Type System": a String excludes the control
            # characters U+0000-U+001F and U+007F-U+009F.
            raise EventRejected(
                400, "InvalidMessage", f"attribute {name[:40]!r} holds a control character"
            )
    headers = {f"ce-{k}": v for k, v in attributes.items() if k != "datacontenttype"}
    headers.update(trace)
    return Delivery(
        source="http",
        # The CloudEvents identity: source + id is unique per distinct event (spec, "id").
        identity=event_identity(source, event_id),
        body=body,
        message_id=event_id,
        headers=headers,
        content_type=attributes.get("datacontenttype") or content_type,
        metadata={"path": path, "ce-source": source, "ce-type": attributes["type"]},
        received_at=time.monotonic(),
        published_at=_epoch(attributes.get("time")),
        positional=True,
    )


def event_identity(source: str, event_id: str) -> str:
    """``<source>#<id>``, with ``%`` and ``#`` of the source escaped (``%25``, ``%23``),
    so the first ``#`` separates them and two distinct (source, id) pairs never share an
    identity (``a#b`` + ``c`` is not ``a`` + ``b#c``)."""
    return f"{source.replace('%', '%25').replace('#', '%23')}#{event_id}"


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def location(path: str, identity: str) -> str:
    """Where the status of the event ``identity`` is read."""
    return f"{path.rstrip('/')}/{urllib.parse.quote(identity, safe='')}"


def dead_letter_event(
    original: Mapping[str, Any], decision: Decision, *, namespace: str, scaledjob: str
) -> dict[str, Any]:
    """The structured CloudEvent of a failed event: its data as received, the reason in
    extension attributes (lower-case alphanumerics of at most 20 characters, as the
    CloudEvents spec advises), its id deterministic per Job so a sink can drop a repeat."""
    headers = original.get("headers") or {}
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"{decision.job_name}/dead-letter",
        "source": f"/jobrunner/{namespace}/{scaledjob}",
        "type": "dev.jobrunner.event.deadlettered",
        "subject": str(original.get("identity") or ""),
        "jobrunnerreason": decision.reason,
        "jobrunnerdetail": decision.detail[:4000],
        "jobrunnerjob": decision.job_name or "",
    }
    if headers.get("ce-source"):
        event["jobrunnereventsource"] = headers["ce-source"]
    if headers.get("ce-id"):
        event["jobrunnereventid"] = headers["ce-id"]
    if headers.get("ce-type"):
        event["jobrunnereventtype"] = headers["ce-type"]
    if original.get("content_type"):
        event["datacontenttype"] = original["content_type"]
    body = original.get("body")
    if body is not None:  # bytes, as the Job keeps it (rendering.original_message)
        event["data_base64"] = base64.b64encode(body).decode()
    return event
