"""What jobrunner may say about the outside world: addresses without their secrets, and
failures in its own words.

In operator mode a ScaledJob's author names the broker, so whatever jobrunner copies from
a server's answer into the ScaledJob's status, its Events, ``/readyz`` or the log is a
read-back channel: point an Azure ``queueEndpoint`` or a Redis ``address`` at an internal
HTTP service, and its answer would come back in ``kubectl describe``. And a URL logged as
given carries its ``user:password@`` or its SAS token. So the rule, for every source and
every place text leaves the process:

* an address is shown as ``scheme://host:port`` — never userinfo, query string (SAS
  tokens, keys) or fragment (``address``, ``addresses``, ``connection_string_endpoint``);
* a failure is described by what jobrunner itself knows: the exception's class, an
  errno, a TLS verification result, an HTTP status, a broker's error *code* when the
  caller checks it against the broker's own list (``known_code``) — never the text of a
  server's answer (``describe_error``). Texts jobrunner wrote itself (``Refusal`` and its
  subclasses such as ``SourceError``) are passed on, since they are built from these;
* a traceback in the log keeps its frames (where a bug is) but says each exception of
  its chain as ``describe_error`` does (``describe_traceback``);
* last, as a net under all of it, ``redact`` removes credentials from any text (userinfo
  in URLs, URL query strings, ``AccountKey=``/``SharedAccessSignature=``/``password=``
  pairs, ``Authorization`` values); the log formatters run every line through it, library
  lines included.

Core module: the standard library and ``jobrunner.core.protocols`` only, so sources, the
runner, the operator and telemetry can all use it.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import traceback
import urllib.parse
from collections.abc import Collection

from jobrunner.core.protocols import Refusal

__all__ = [
    "address",
    "addresses",
    "connection_string_endpoint",
    "describe_error",
    "describe_traceback",
    "known_code",
    "redact",
]

UNPARSEABLE = "<an address that cannot be parsed>"

_SCHEME_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>(?:[^\s/?#@]*@)+)"
)
"""``scheme://user:password@``: everything between ``://`` and the last ``@`` before the
host (a password with an unescaped ``@`` included)."""
_URL_QUERY = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#]*)[?#][^\s'\"<>)\]]*")
"""A URL's query string and fragment: where SAS tokens (``sig=``) and keys travel."""
_SECRET_PAIR = re.compile(
    r"(?P<key>\b(?:AccountKey|SharedAccessSignature|SharedAccessKey|SharedAccessKeyName|"
    r"sig|password|passwd|pwd|pass|token|auth_token|secret|access_key|secret_access_key|"
    r"aws_secret_access_key|aws_session_token|api[_-]?key)\s*=\s*)(?P<value>[^;&,\s'\"]+)",
    re.IGNORECASE,
)
"""``key=value`` pairs that hold a secret: connection strings (``AccountKey=``), query
strings (``sig=``), settings lines (``password=``)."""
_SECRET_FIELD = re.compile(
    r"(?P<key>[\"'](?:pass|password|auth_token|token|secret|sig|jwt|nkey)[\"']\s*:\s*[\"'])"
    r"(?P<value>[^\"']*)",
    re.IGNORECASE,
)
"""JSON and repr fields that hold a secret (NATS' CONNECT has ``"pass"``, ``"auth_token"``)."""
_AUTHORIZATION = re.compile(
    r"(?P<key>\b(?:authorization|proxy-authorization)[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<value>(?:basic|bearer|sharedkey|aws4-hmac-sha256)?\s*[^\s,'\"]+)",
    re.IGNORECASE,
)

HIDDEN = "***"


_SECRET_WORDS = ("key", "sig", "pass", "pwd", "token", "secret", "jwt")
"""Lower-case parts of every secret key the patterns know: a line with none of them
(most lines) skips those patterns."""


def redact(text: str) -> str:
    """``text`` with every credential it may carry replaced by ``***``: userinfo of URLs
    (``nats://***@host:4222``), URL query strings and fragments (``https://host/q?***``),
    ``AccountKey=***``-style pairs, JSON ``"pass": "***"`` fields and ``Authorization``
    values. Idempotent; what is not a credential is left as it is. Every log line goes
    through it, so each pattern runs only when a substring it needs is there (about
    1 µs for a line without any, against 25 µs for all five patterns)."""
    if "://" in text:
        if "@" in text:
            text = _SCHEME_USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
        if "?" in text or "#" in text:
            text = _URL_QUERY.sub(lambda m: f"{m['head']}?{HIDDEN}", text)
    lower = text.lower()
    if any(word in lower for word in _SECRET_WORDS):
        if "=" in text:
            text = _SECRET_PAIR.sub(lambda m: f"{m['key']}{HIDDEN}", text)
        if ":" in text:
            text = _SECRET_FIELD.sub(lambda m: f"{m['key']}{HIDDEN}", text)
    if "authoriz" in lower:
        text = _AUTHORIZATION.sub(lambda m: f"{m['key']}{HIDDEN}", text)
    return text


def address(value: str, *, default_scheme: str = "", default_port: int | None = None) -> str:
    """``value`` (a URL such as ``amqps://user:pw@host:5671/vhost?x=y``, or a bare
    ``host:port``) as ``scheme://host:port`` — or ``host:port`` when it had no scheme and
    ``default_scheme`` is empty — without userinfo, path, query or fragment. ``port`` is
    left out when neither the value nor ``default_port`` gives one. A value that cannot be
    parsed is not echoed: ``UNPARSEABLE``."""
    value = value.strip()
    has_scheme = "://" in value
    try:
        parts = urllib.parse.urlsplit(value if has_scheme else f"//{value}")
        host = parts.hostname
        port = parts.port or default_port
    except ValueError:
        return UNPARSEABLE
    if not host:
        return UNPARSEABLE
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    scheme = parts.scheme if has_scheme else default_scheme
    return f"{scheme}://{netloc}" if scheme else netloc


def addresses(value: str, *, default_port: int | None = None) -> str:
    """A comma-separated list of addresses (Kafka's ``bootstrap.servers``), each as
    ``address`` shows it."""
    return ",".join(
        address(part, default_port=default_port) for part in value.split(",") if part.strip()
    )


def connection_string_endpoint(connection: str, *, key: str = "QueueEndpoint") -> str:
    """Where an Azure-style connection string (``Key=value;...``) points, without its
    ``AccountKey`` or ``SharedAccessSignature``: the ``key`` endpoint as ``address``
    shows it, else ``account <AccountName>``, else ``UNPARSEABLE``."""
    fields: dict[str, str] = {}
    for part in connection.split(";"):
        name, sep, field_value = part.partition("=")
        if sep:
            fields[name.strip().lower()] = field_value.strip()
    endpoint = fields.get(key.lower())
    if endpoint:
        return address(endpoint)
    account = fields.get("accountname")
    if account and re.fullmatch(r"[a-z0-9]{1,24}", account):
        return f"account {account}"
    return UNPARSEABLE


def known_code(value: object, allowed: Collection[str]) -> str | None:
    """``value`` when it is one of the broker's documented error codes ``allowed`` (so
    a server cannot put words of its choosing into what jobrunner reports), else None."""
    text = str(value) if value is not None else ""
    return text if text in allowed else None


def _os_words(exc: OSError) -> str | None:
    """An OSError by its errno, in the C library's words (never ``exc.strerror``, which a
    library may fill with anything)."""
    number = exc.errno
    if isinstance(exc, socket.gaierror):
        return "the host name cannot be resolved"
    if isinstance(number, int) and number in errno.errorcode:
        return f"{errno.errorcode[number]} ({os.strerror(number).lower()})"
    return None


def _tls_words(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        # OpenSSL's X509_verify_cert_error_string: a fixed table.
        return f"TLS certificate not trusted ({exc.verify_message or 'verification failed'})"
    reason = exc.reason if isinstance(exc.reason, str) else None
    if reason and re.fullmatch(r"[A-Z0-9_]{1,64}", reason):  # an OpenSSL reason code
        return f"TLS failed ({reason})"
    return "TLS failed"


def _specific(exc: BaseException) -> str | None:
    """What the chain of ``exc`` (itself, its causes and its arguments) tells in safe
    words: a TLS failure, a timeout, an errno."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen or len(seen) > 16:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return _tls_words(current)
        if isinstance(current, TimeoutError):
            return "timed out"
        if isinstance(current, OSError) and (words := _os_words(current)):
            return words
        todo += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        linked = (
            current.__cause__,
            current.__context__,
            # azure-core keeps the error it wraps here rather than as the cause.
            getattr(current, "inner_exception", None),
        )
        todo += [e for e in linked if isinstance(e, BaseException)]
        if isinstance(current, BaseExceptionGroup):
            todo += list(current.exceptions)
    return None


def _own_words(exc: BaseException) -> str | None:
    """What ``exc`` itself (not its chain) says safely, or None."""
    if isinstance(exc, Refusal):
        return redact(str(exc))
    if isinstance(exc, ssl.SSLError):
        return _tls_words(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return _os_words(exc)
    return None


def describe_error(exc: BaseException) -> str:
    """``exc`` in jobrunner's own words: the text of a ``Refusal`` (jobrunner wrote it),
    else the exception's class with what its chain says safely (an errno, a TLS
    verification result, a timeout) — e.g. ``ConnectionRefusedError: ECONNREFUSED
    (connection refused)``, ``ResponseError``. Never the exception's message, which may
    be a server's answer. Credentials are redacted from all of it."""
    if isinstance(exc, Refusal):
        return redact(str(exc))
    name = type(exc).__name__
    detail = _specific(exc)
    return f"{name}: {detail}" if detail else name


def describe_traceback(exc: BaseException) -> str:
    """A traceback of ``exc`` and the exceptions it came from, as Python prints one —
    the same frames, oldest cause first — but with each exception said as
    ``describe_error`` says it: where the failure happened is told, what a server
    answered is not (an exception's message may quote it). Ends without a newline."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        else:
            current = None if current.__suppress_context__ else current.__context__
    parts: list[str] = []
    oldest_first = chain[::-1]
    for earlier, later in zip(oldest_first, [*oldest_first[1:], None], strict=True):
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(earlier.__traceback__))
        kind = type(earlier)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__}.{name}"
        detail = _own_words(earlier)
        parts.append(f"{name}: {detail}\n" if detail else f"{name}\n")
        if later is not None:
            link = (
                "The above exception was the direct cause of the following exception:"
                if later.__cause__ is earlier
                else "During handling of the above exception, another exception occurred:"
            )
            parts.append(f"\n{link}\n\n")
    return redact("".join(parts).rstrip("\n"))
