"""The azure-queue trigger's static checks (what `validate` refuses without I/O) and the
per-message text encoding, including the 64 KiB a Storage message holds."""

from __future__ import annotations

import base64

import pytest

from jobrunner.core.protocols import OutputRefused
from jobrunner.manifest.scaledjob import Trigger
from jobrunner.manifest.triggers import check_trigger
from jobrunner.sources.azure_queue import MESSAGE_TEXT_MAX, decode_text, encode_text


def problems(metadata: dict[str, str], auth: bool = False) -> dict[str, str]:
    trigger = Trigger(
        type="azure-queue",
        metadata=metadata,
        authenticationRef={"name": "a"} if auth else None,  # type: ignore[arg-type]
    )
    return {p.field: p.text for p in check_trigger(trigger)}


def test_a_valid_trigger_has_no_problems() -> None:
    assert problems({"queueName": "orders-1", "connectionFromEnv": "STORAGE"}) == {}
    assert problems({"queueName": "orders"}, auth=True) == {}


@pytest.mark.parametrize("name", ["Orders", "or", "orders.dead-letter", "a--b", "-ab", "x" * 64])
def test_a_queue_name_the_storage_service_refuses_is_a_problem(name: str) -> None:
    found = problems({"queueName": name, "connectionFromEnv": "S"})
    assert "is not a Storage queue name" in found["metadata.queueName"]


def test_a_connection_is_required() -> None:
    assert "connectionFromEnv" in problems({"queueName": "orders"})["metadata.connectionFromEnv"]


def test_unknown_keys_and_encodings_are_problems_with_a_hint() -> None:
    found = problems(
        {"queueName": "q1", "connectionFromEnv": "S", "queueNme": "x", "messageEncoding": "hex"}
    )
    assert "did you mean 'queueName'" in found["metadata.queueNme"]
    assert "one of base64, none" in found["metadata.messageEncoding"]


def test_text_is_decoded_strictly_per_message() -> None:
    assert decode_text(base64.b64encode(b"\x00\xff").decode(), "base64") == (b"\x00\xff", None)
    body, problem = decode_text("hello world!", "base64")
    assert body == b"hello world!"
    assert problem is not None
    assert "not base64" in problem
    assert decode_text("hello", "none") == (b"hello", None)


def test_an_output_over_64_kib_of_text_is_refused() -> None:
    fits = b"x" * (MESSAGE_TEXT_MAX // 4 * 3)
    assert len(encode_text(fits, "base64")) == MESSAGE_TEXT_MAX
    with pytest.raises(OutputRefused, match="over the 64 KiB"):
        encode_text(fits + b"xyz", "base64")
    with pytest.raises(OutputRefused, match="not UTF-8"):
        encode_text(b"\xff", "none")
