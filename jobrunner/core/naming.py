"""How a message maps to its Job's name: deterministically, so a redelivered message finds
the Job it already has instead of launching a second one.

The rule:

* the message's identity is its ``message_id`` when the producer set one; otherwise a
  SHA-256 digest of the body and the producer's headers (broker-added headers such as
  ``x-death`` or ``x-delivery-count`` excluded, so redeliveries digest the same);
* the Job name is ``<scaledjob>-<16 hex digits of SHA-256(scaledjob, identity)>``, a valid
  DNS label of at most 57 characters.

Guarantee: one Job per identity per ScaledJob for as long as that Job exists. Without a
``message_id``, two publishes of byte-identical content with identical headers are one
message to jobrunner (the second adopts the first's Job); set ``message_id`` to tell them
apart. Kafka records use (topic, partition, offset) as identity.

A replayed dead letter is new work, not a redelivery: ``jobrunner dead-letters --replay``
republishes it with the header ``x-jobrunner-replay`` (any value unique to that replay,
by default its UTC time), and its identity becomes ``<identity>#replay-<value>``, so it
gets a Job of its own instead of being refused as a duplicate of the Job that failed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

REPLAY_HEADER = "x-jobrunner-replay"
"""Set on a replayed dead letter; its value makes the replay's identity unique."""
_BROKER_HEADERS = ("x-death", "x-delivery-count", "x-first-death-", "x-last-death-", "x-jobrunner-")
_NAME_PREFIX_MAX = 40
_INVALID = re.compile(r"[^a-z0-9-]+")


def message_identity(message_id: str | None, body: bytes, headers: Mapping[str, object]) -> str:
    base = _base_identity(message_id, body, headers)
    replay = headers.get(REPLAY_HEADER)
    return f"{base}#replay-{replay}" if replay else base


def _base_identity(message_id: str | None, body: bytes, headers: Mapping[str, object]) -> str:
    if message_id:
        return message_id
    stable = {k: headers[k] for k in sorted(headers) if not k.lower().startswith(_BROKER_HEADERS)}
    digest = hashlib.sha256(body)
    digest.update(b"\0")
    digest.update(json.dumps(stable, sort_keys=True, default=str).encode())
    return f"sha256:{digest.hexdigest()}"


def dns_label(text: str, limit: int) -> str:
    """Lower-case, replace what a DNS label forbids with '-', trim to ``limit``."""
    label = _INVALID.sub("-", text.lower()).strip("-")[:limit].strip("-")
    return label or "job"


def message_key(scaledjob: str, identity: str) -> str:
    """16 hex digits naming (ScaledJob, message); also a valid label value."""
    return hashlib.sha256(f"{scaledjob}\0{identity}".encode()).hexdigest()[:16]


def job_name(scaledjob: str, identity: str) -> str:
    return f"{dns_label(scaledjob, _NAME_PREFIX_MAX)}-{message_key(scaledjob, identity)}"


def message_secret_name(job: str) -> str:
    return f"{job}-message"
