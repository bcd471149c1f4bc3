"""``type: http``: events that arrive over HTTP (the CloudEvents HTTP binding, binary or
structured mode, or a plain body), served by the dispatcher itself; see
jobrunner.sources.http for what is answered and when.

Metadata (jobrunner's own: KEDA has no push trigger):

* ``path`` (required): where events are POSTed, e.g. ``/events/thumbnails``. At most
  200 characters of ``[A-Za-z0-9._~/-]``, starting with ``/``, no ``..`` or ``//``.
  Under the operator it must start with ``/<namespace>/`` (each namespace owns its
  prefix, so a tenant can never take another's path);
* ``listenAddress``: ``host:port``. Default ``0.0.0.0:8081`` in a cluster (8080 is the
  image's ``/metrics``) and ``127.0.0.1:8080`` with ``--local``
  (``settings.http.listen_address``, ``local_listen_address``). Under the operator it
  is the operator's (the chart's Service) and a ScaledJob may not set it;
* ``auth``: ``bearer`` (the default when the TriggerAuthentication gives a ``token``),
  ``tokenReview`` (a Kubernetes ServiceAccount token, checked with a TokenReview; by
  default only ServiceAccounts of the ScaledJob's namespace get in, see
  ``serviceAccounts``), or ``none`` (only with ``--local``: outside it, authentication
  is required);
* ``serviceAccounts``: with ``tokenReview``, the comma-separated
  ``<namespace>:<name>`` (``<namespace>:*`` for all of one namespace) allowed to post.
  Default ``<the ScaledJob's namespace>:*``. Under the operator only ServiceAccounts of
  the ScaledJob's own namespace may be named;
* ``audience``: with ``tokenReview``, the audience the token must be for (default: the
  API server's);
* ``maxPendingRequests`` (default 32, 1-1000): events accepted but whose Job does not
  exist yet (each waits for a free slot under ``maxReplicaCount``); past it a POST is
  answered ``429 Too Many Requests`` with ``Retry-After``;
* ``retryAfterSeconds`` (default 5, 1-3600): what ``Retry-After`` says;
* ``forwardHeaders``: comma-separated request headers passed to the Job beside the
  ``ce-*`` attributes (in ``JOBRUNNER_MESSAGE_HEADERS``, lower case), e.g.
  ``X-Hub-Signature-256,X-GitHub-Event`` so a Job can verify a webhook's signature over
  the body it got byte for byte. At most 16; credentials (``Authorization``, cookies,
  ``Proxy-Authorization``) are refused;
* ``bodyTimeoutSeconds`` (default 10, 1-300): the most a client may take to send its
  body (a slow client cannot hold the server); ``408`` after it.

``spec.deadLetter.url``: where a failed event is POSTed (a structured CloudEvent with the
reason); unset, the failure is only answered on the event's ``Location``. The body bound
is ``spec.messageDelivery.maxMessageBytes`` (``413`` past it).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.manifest.scaledjob import ScaledJobSpec, Trigger
from jobrunner.manifest.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    one_of,
    raise_problems,
    required,
)

PATH_MAX = 200
_PATH = re.compile(r"^/[A-Za-z0-9._~/-]*$")
AUTH_MODES = ("bearer", "tokenReview", "none")
_SERVICE_ACCOUNT = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?:(\*|[a-z0-9]([-.a-z0-9]*[a-z0-9])?)$"
)
FORWARD_MAX = 16
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
_NEVER_FORWARDED = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "host", "content-length"}
)
TOKEN_MIN = 16
"""The shortest bearer token taken: a guessable token is no authentication."""


@dataclass(frozen=True)
class HttpTrigger:
    path: str
    """Where events are POSTed; ``<path>/<message id>`` is each event's Location."""
    listen_address: str | None
    """``host:port`` the trigger asked for; None: the process's default."""
    auth: str
    """``bearer``, ``tokenReview`` or ``none``."""
    token: str = ""
    """The bearer token (from the TriggerAuthentication's ``token`` parameter)."""
    service_accounts: tuple[str, ...] = ()
    """``namespace:name`` (or ``namespace:*``) allowed with ``tokenReview``."""
    audience: str = ""
    max_pending: int = 32
    retry_after_seconds: int = 5
    body_timeout_seconds: float = 10.0
    forward_headers: tuple[str, ...] = ()
    """Request headers (lower case) passed to the Job."""
    dead_letter_url: str | None = None
    tenant: bool = False
    """Served for a tenant by the operator: the dead-letter URL is checked against the
    operator's own and link-local addresses before each POST."""

    def __repr__(self) -> str:  # never the token
        return f"HttpTrigger(path={self.path!r}, auth={self.auth!r})"


def path_problems(path: str) -> list[Problem]:
    """What is wrong with ``path`` as a served path; [] when nothing."""
    if not path:
        return []
    if len(path) > PATH_MAX or not _PATH.match(path) or ".." in path or "//" in path:
        return [
            Problem(
                "metadata.path",
                f"a path of at most {PATH_MAX} characters of A-Z a-z 0-9 . _ ~ / -, "
                f"starting with /, without .. or //; got {path[:80]!r}",
            )
        ]
    return []


def _bounded_int(metadata: Mapping[str, str], key: str, low: int, high: int) -> list[Problem]:
    value = metadata.get(key)
    if value is None:
        return []
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        return [Problem(f"metadata.{key}", f"a whole number from {low} to {high}; got {value!r}")]
    return []


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = required(metadata, "path", what=" (where events are POSTed, e.g. /events)")
    problems += path_problems(metadata.get("path", ""))
    problems += one_of(metadata, "auth", AUTH_MODES)
    problems += _bounded_int(metadata, "maxPendingRequests", 1, 1000)
    problems += _bounded_int(metadata, "retryAfterSeconds", 1, 3600)
    problems += _bounded_int(metadata, "bodyTimeoutSeconds", 1, 300)
    address = metadata.get("listenAddress")
    if address is not None and listen_address_problem(address):
        problems.append(Problem("metadata.listenAddress", listen_address_problem(address)))
    for item in _split(metadata.get("serviceAccounts", "")):
        if not _SERVICE_ACCOUNT.match(item):
            problems.append(
                Problem(
                    "metadata.serviceAccounts",
                    f"<namespace>:<name> or <namespace>:*, comma-separated; got {item[:80]!r}",
                )
            )
    problems += _forward_problems(metadata.get("forwardHeaders", ""))
    if metadata.get("auth") == "bearer" and not has_auth:
        problems.append(
            Problem(
                "metadata.auth",
                "auth bearer needs an authenticationRef whose TriggerAuthentication gives "
                "the token parameter (from a Secret); add it",
            )
        )
    if metadata.get("serviceAccounts") and metadata.get("auth") != "tokenReview":
        problems.append(
            Problem(
                "metadata.serviceAccounts", "only with auth: tokenReview; remove it or set auth"
            )
        )
    return problems


def _forward_problems(text: str) -> list[Problem]:
    names = _split(text)
    problems = []
    if len(names) > FORWARD_MAX:
        problems.append(Problem("metadata.forwardHeaders", f"at most {FORWARD_MAX} headers"))
    for name in names:
        if not _HEADER_NAME.match(name):
            problems.append(Problem("metadata.forwardHeaders", f"not a header name: {name[:80]!r}"))
        elif name.lower() in _NEVER_FORWARDED or name.lower().startswith("ce-"):
            problems.append(
                Problem(
                    "metadata.forwardHeaders",
                    f"{name} is never passed to a Job (credentials, hop-by-hop, or a ce- "
                    "attribute, which is passed anyway); remove it",
                )
            )
    return problems


def listen_address_problem(address: str) -> str:
    """Why ``address`` is not a ``host:port`` to listen on; "" when it is."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return f"host:port with a port from 1 to 65535; got {address[:80]!r}"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            return f"an IP address (or localhost) and a port; got {address[:80]!r}"
    return ""


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def dead_letter_url_problem(url: str) -> str:
    """Why ``url`` cannot be a dead-letter sink; "" when it can. Credentials in the URL
    are refused (they would show wherever the URL is shown)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"an http:// or https:// URL; got {url[:80]!r}"
    if parsed.username or parsed.password:
        return "no credentials in the URL (it is shown in status and logs)"
    return ""


def _check_spec(spec: ScaledJobSpec, trigger: Trigger) -> list[Problem]:
    problems = []
    if spec.ackPolicy != "onJobCreation" and "ackPolicy" in spec.model_fields_set:
        problems.append(
            Problem(
                "spec.ackPolicy",
                "an HTTP event is accepted once its Job exists (the Job is its durable "
                "copy; its outcome is answered on the event's Location): remove ackPolicy "
                "or set it to onJobCreation",
            )
        )
    url = spec.deadLetter.url
    if url is not None and dead_letter_url_problem(url):
        problems.append(Problem("spec.deadLetter.url", dead_letter_url_problem(url)))
    return problems


def _tenant_problems(context: ResolveContext, path: str, auth: str) -> list[Problem]:
    """What the operator refuses of a tenant's HTTP trigger: a path outside the
    namespace's prefix, its own listen address, no authentication."""
    namespace = context.scaledjob.namespace
    problems: list[Problem] = []
    if not path.startswith(f"/{namespace}/"):
        problems.append(
            Problem(
                "metadata.path",
                f"under the operator a path starts with /{namespace}/ (each namespace "
                "owns its prefix); change the path",
            )
        )
    if "listenAddress" in context.trigger.metadata:
        problems.append(
            Problem(
                "metadata.listenAddress",
                "under the operator events are served on the operator's address "
                "(its Service); remove listenAddress",
            )
        )
    if auth == "none":
        problems.append(
            Problem(
                "metadata.auth",
                "the operator serves no unauthenticated path: give a TriggerAuthentication "
                "with a token parameter, or auth: tokenReview",
            )
        )
    return problems


async def _resolve(context: ResolveContext) -> HttpTrigger:
    meta = await context.parameters()
    where = context.where()
    tenant = context.reach.tenant
    namespace = context.scaledjob.namespace
    path = meta["path"].rstrip("/") or "/"
    token = meta.get("token", "")
    auth = meta.get("auth") or ("bearer" if token else "none")
    problems = _tenant_problems(context, path, auth) if tenant else []
    if auth == "bearer" and len(token) < TOKEN_MIN:
        problems.append(
            Problem(
                "authenticationRef",
                f"auth bearer needs a token parameter of at least {TOKEN_MIN} characters "
                "from the TriggerAuthentication (a Secret), e.g. from `openssl rand -hex 32`",
            )
        )
    accounts = tuple(_split(meta.get("serviceAccounts", ""))) or (f"{namespace}:*",)
    if tenant and auth == "tokenReview":
        for item in accounts:
            if item.split(":", 1)[0] != namespace:
                problems.append(
                    Problem(
                        "metadata.serviceAccounts",
                        f"under the operator only ServiceAccounts of namespace {namespace} "
                        f"may post; got {item!r}",
                    )
                )
    raise_problems(where, problems)
    return HttpTrigger(
        path=path,
        listen_address=context.trigger.metadata.get("listenAddress"),
        auth=auth,
        token=token,
        service_accounts=accounts,
        audience=meta.get("audience", ""),
        max_pending=int(meta.get("maxPendingRequests", "32")),
        retry_after_seconds=int(meta.get("retryAfterSeconds", "5")),
        body_timeout_seconds=float(meta.get("bodyTimeoutSeconds", "10")),
        forward_headers=tuple(h.lower() for h in _split(meta.get("forwardHeaders", ""))),
        dead_letter_url=context.scaledjob.spec.deadLetter.url,
        tenant=tenant,
    )


TRIGGER = TriggerType(
    name="http",
    destination="path",
    metadata=frozenset(
        {
            "path",
            "listenAddress",
            "auth",
            "serviceAccounts",
            "audience",
            "maxPendingRequests",
            "retryAfterSeconds",
            "bodyTimeoutSeconds",
            "forwardHeaders",
        }
    ),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.http:open_source",
    summary="events POSTed over HTTP (CloudEvents binary/structured, or plain bodies)",
    check_spec=_check_spec,
)
