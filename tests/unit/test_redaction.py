"""jobrunner.core.redaction: addresses without their secrets, failures in jobrunner's words."""

from __future__ import annotations

import errno
import logging
import ssl

import pytest

from jobrunner.core.protocols import SourceError, SourceUnreachable
from jobrunner.core.redaction import (
    UNPARSEABLE,
    address,
    addresses,
    connection_string_endpoint,
    describe_error,
    describe_traceback,
    known_code,
    redact,
)
from jobrunner.observability.telemetry import configure_logging

KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
BANNER = "banner: internal admin panel"
SAS = "sv=2024-11-04&ss=q&srt=sco&sp=rwdlacup&se=2027-01-01T00:00:00Z&sig=AbC%2Bd%3D"


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("nats://user:s3cret@nats.example:4222", "nats://nats.example:4222"),
        ("nats://token-only@nats.example", "nats://nats.example"),
        ("redis://default:s3cret@redis.example:6379/0", "redis://redis.example:6379"),
        ("rediss://:s3cret@10.0.0.7:6380", "rediss://10.0.0.7:6380"),
        (
            "amqps://guest:p%40ss@rabbit.example:5671/vhost?heartbeat=5",
            "amqps://rabbit.example:5671",
        ),
        (f"https://acct.queue.core.windows.net/jobs?{SAS}", "https://acct.queue.core.windows.net"),
        ("http://user:pw@[::1]:8080/x#frag", "http://[::1]:8080"),
        ("kafka.example:9092", "kafka.example:9092"),
        ("u:pw@redis.example:6379", "redis.example:6379"),
        ("http://host:notaport/", UNPARSEABLE),
        ("", UNPARSEABLE),
    ],
)
def test_an_address_is_shown_without_userinfo_path_or_query(given: str, shown: str) -> None:
    assert address(given) == shown


def test_a_default_port_is_filled_in_and_lists_are_shown_each() -> None:
    assert address("amqp://u:p@rabbit", default_port=5672) == "amqp://rabbit:5672"
    assert addresses("a:9092, u:pw@b:9093,c", default_port=9092) == "a:9092,b:9093,c:9092"


def test_an_azure_connection_string_is_shown_as_its_endpoint_never_its_key_or_sas() -> None:
    azurite = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={KEY};QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
    )
    assert connection_string_endpoint(azurite) == "http://127.0.0.1:10001"
    sas = f"QueueEndpoint=https://acct.queue.core.windows.net/?{SAS};SharedAccessSignature={SAS}"
    assert connection_string_endpoint(sas) == "https://acct.queue.core.windows.net"
    by_account = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={KEY}"
    assert connection_string_endpoint(by_account) == "account acct"
    assert connection_string_endpoint(f"AccountKey={KEY}") == UNPARSEABLE
    assert connection_string_endpoint("AccountName=Not A Name;AccountKey=x") == UNPARSEABLE


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("reconnecting to nats://alice:s3cret-pw@nats:4222 failed", "s3cret-pw"),
        ("Redis redis://default:s3cret-pw@redis:6379/0 refused", "s3cret-pw"),
        ("amqp://bob:p@ss:w0rd@rabbit:5672/ closed", "w0rd"),
        (f"AccountName=a;AccountKey={KEY};QueueEndpoint=http://x", KEY[:20]),
        (f"GET https://acct.queue.core.windows.net/q/messages?{SAS} 403", "AbC%2Bd"),
        (f"SharedAccessSignature={SAS};QueueEndpoint=https://x", "AbC%2Bd"),
        ('CONNECT {"user":"alice","pass":"s3cret-pw","verbose":false}', "s3cret-pw"),
        ("{'auth_token': 's3cret-pw'}", "s3cret-pw"),
        ("Authorization: Basic Z3Vlc3Q6czNjcmV0LXB3", "Z3Vlc3Q6czNjcmV0LXB3"),
        ("'Authorization': 'SharedKey acct:s3cretSig='", "s3cretSig"),
        ("settings password=s3cret-pw region=eu", "s3cret-pw"),
    ],
)
def test_redact_removes_every_kind_of_credential(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert "***" in redacted
    assert redact(redacted) == redacted


def test_redact_leaves_text_without_credentials_alone() -> None:
    for text in (
        "RabbitMQ at amqps://rabbit:5671 refused the credentials of user 'jobrunner'",
        "field metadata.queueNme: unknown key; did you mean 'queueName'?",
        "Kafka at kafka:9092,kafka2:9092: KafkaConnectionError",
        "mail alice@example.com",
    ):
        assert redact(text) == text


def test_describe_error_says_the_class_and_errno_never_the_message() -> None:
    answer = "<html>internal admin panel: token=abc</html>"
    assert describe_error(ValueError(answer)) == "ValueError"
    refused = ConnectionRefusedError(errno.ECONNREFUSED, answer)
    assert describe_error(refused) == "ConnectionRefusedError: ECONNREFUSED (connection refused)"
    wrapped = RuntimeError(answer)
    wrapped.__cause__ = refused
    assert describe_error(wrapped) == "RuntimeError: ECONNREFUSED (connection refused)"
    assert describe_error(TimeoutError(answer)) == "TimeoutError: timed out"
    assert describe_error(OSError(answer)) == "OSError"
    cert = ssl.SSLCertVerificationError(1, answer)
    cert.verify_message = "unable to get local issuer certificate"
    assert describe_error(cert) == (
        "SSLCertVerificationError: TLS certificate not trusted (unable to get local issuer "
        "certificate)"
    )
    for exc in (refused, wrapped, cert, ValueError(answer)):
        assert "admin panel" not in describe_error(exc)


def test_describe_error_passes_jobrunners_own_words_redacted() -> None:
    assert describe_error(SourceError("Redis at redis:6379: stream 's' does not exist")) == (
        "Redis at redis:6379: stream 's' does not exist"
    )
    said = describe_error(SourceUnreachable("NATS at nats://a:pw@nats:4222 is not reachable"))
    assert said == "NATS at nats://***@nats:4222 is not reachable"


def test_known_code_passes_only_the_brokers_own_codes() -> None:
    assert known_code("QueueNotFound", {"QueueNotFound"}) == "QueueNotFound"
    assert known_code("<html>secret</html>", {"QueueNotFound"}) is None
    assert known_code(None, {"QueueNotFound"}) is None


def test_every_log_line_is_redacted_libraries_included(capsys: pytest.CaptureFixture[str]) -> None:
    for json_lines in (False, True):
        configure_logging("INFO", json_lines=json_lines)
        try:
            logging.getLogger("nats.aio.client").warning(
                "reconnecting to %s", "nats://alice:s3cret-pw@nats:4222"
            )
            try:
                raise ConnectionError("redis://default:s3cret-pw@redis:6379 is down")
            except ConnectionError:
                logging.getLogger("jobrunner.test").exception("a bug's traceback")
        finally:
            logging.getLogger().handlers.clear()
        err = capsys.readouterr().err
        assert "nats://***@nats:4222" in err
        assert "redis://***@redis:6379" in err
        assert "s3cret-pw" not in err


def test_a_librarys_line_says_an_exception_by_its_class_not_the_servers_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    answer = "Authentication failed: <html>internal admin panel</html>"
    configure_logging("INFO")
    try:
        logging.getLogger("aiokafka").error(
            'Unable connect to "%s:%s": %s', "10.0.0.9", 9092, RuntimeError(answer)
        )
        try:
            raise ValueError(answer)
        except ValueError:
            logging.getLogger("nats.aio.client").exception("nats: encountered error")
            logging.getLogger("jobrunner.test").exception("a bug")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert 'Unable connect to "10.0.0.9:9092": RuntimeError' in err
    assert "nats: encountered error (ValueError)" in err
    assert "admin panel" not in err
    assert "Traceback (most recent call last)" in err, "a bug's traceback keeps its frames"
    assert "in test_a_librarys_line_says_an_exception_by_its_class" in err


def test_a_traceback_keeps_its_frames_and_says_each_exception_safely() -> None:
    def connect() -> None:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, BANNER)
        except OSError as exc:
            raise SourceUnreachable("Redis at nats://u:pw@10.0.0.9:6379 is not reachable") from exc

    try:
        connect()
    except SourceUnreachable as exc:
        text = describe_traceback(exc)
    assert "admin panel" not in text
    assert ":pw@" not in text
    assert "in connect" in text
    assert "ConnectionRefusedError: ECONNREFUSED (connection refused)" in text
    assert "direct cause" in text
    assert text.endswith(
        "jobrunner.core.protocols.SourceUnreachable: "
        "Redis at nats://***@10.0.0.9:6379 is not reachable"
    )
