"""Names as segments of API paths (and of the local executor's directories).

Every path jobrunner builds from a name — ``/api/v1/namespaces/<ns>/secrets/<name>``,
``<state>/jobs/<ns>/<name>/`` — takes the name through ``name()`` or ``namespace()``
here, so a name can only ever be one segment, naming the object it says. The pydantic
models (``jobrunner.manifest.scaledjob``) and the CRDs refuse such names first, naming
the field; this is the second line, for a name that reached a path some other way (a
keda.sh object, which has no schema for names, a future field, a command-line argument).

Why a check and not only escaping: ``urllib.parse.quote`` leaves ``.`` and ``..`` as they
are, and urllib3 resolves ``..`` segments of a request path (RFC 3986 section 5.2.4), so
``../../kube-system/secrets/admin`` escaped would still climb out of its namespace. A
valid Kubernetes name can hold neither ``/``, ``%`` nor a dot-only segment, so the names
are checked as the Kubernetes names they are, then percent-escaped anyway (a no-op for a
valid name).
"""

from __future__ import annotations

import urllib.parse

from jobrunner.core.limits import dns1123_label_problem, dns1123_subdomain_problem
from jobrunner.core.protocols import ApiRejected


class InvalidName(ApiRejected):
    """A name refused before any request (or file access) is made: 422 ``Invalid``, as
    the API server answers for an invalid name. ``field`` names what carried it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(422, "Invalid", f"{field}: {problem}")
        self.field = field


def name(value: str, *, field: str) -> str:
    """``value`` (the name of a Secret, Job, Pod, Lease or custom resource: a DNS-1123
    subdomain) as one path segment; InvalidName naming ``field`` otherwise."""
    problem = (
        dns1123_subdomain_problem(value, "a name")
        if isinstance(value, str)
        else f"a name is a string, got {type(value).__name__}"
    )
    if problem:
        raise InvalidName(field, f"{problem}, as Kubernetes requires")
    return urllib.parse.quote(value, safe="")


def namespace(value: str, *, field: str = "namespace") -> str:
    """``value`` (a namespace: a DNS-1123 label) as one path segment; InvalidName naming
    ``field`` otherwise."""
    problem = (
        dns1123_label_problem(value, "a namespace")
        if isinstance(value, str)
        else f"a namespace is a string, got {type(value).__name__}"
    )
    if problem:
        raise InvalidName(field, f"{problem}, as Kubernetes requires")
    return urllib.parse.quote(value, safe="")


def check_path(path: str) -> str:
    """``path`` (an API path, without scheme or query) when every segment is one the API
    server would route as written: no ``.``/``..`` segment (which urllib3 would resolve),
    no empty segment after the first ``/``, no ``%``, ``?`` or ``#`` (an escaped ``/``,
    or a query smuggled in) and nothing outside printable ASCII. InvalidName otherwise:
    the last check before a request, for a path some builder made without ``name()``."""
    segments = path.split("/")
    bad = (
        not path.startswith("/")
        or any(s in ("", ".", "..") for s in segments[1:])
        or any(c in path for c in "%?#\\")
        or not all(0x21 <= ord(c) < 0x7F for c in path)
    )
    if bad:
        raise InvalidName("request path", f"{path!r} is not a plain API path; refused unsent")
    return path
