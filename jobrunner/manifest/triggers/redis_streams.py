"""``type: redis-streams``: KEDA's Redis Streams scaler metadata, consumed as a member of
a consumer group.

``address`` (``host:port``) or ``host`` and ``port`` (each also ``...FromEnv``, or from the
TriggerAuthentication), ``stream``, ``consumerGroup`` (required here: jobrunner reads as
a group member), ``databaseIndex``, ``enableTLS`` (or the ``tls: enable`` parameter),
``unsafeSsl``; ``username`` and ``password`` from metadata (``...FromEnv``) or
authentication, with ``ca``, ``cert``, ``key`` for TLS. jobrunner's own
``claimMinIdleSeconds`` (default 60): how long an entry of a consumer that stopped
heartbeating waits before another dispatcher claims it. KEDA's pending/lag scaling keys
are accepted and ignored. The group must exist (``XGROUP CREATE <stream> <group> $
MKSTREAM``): where a new group starts reading is the operator's choice, not ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.manifest.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    one_of,
    raise_problems,
    required,
)


@dataclass(frozen=True)
class RedisStreamsTrigger:
    host: str
    port: int
    stream: str
    group: str
    database: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    unsafe_ssl: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""
    claim_min_idle: float = 60.0
    """Seconds an entry must have been idle before another consumer claims it."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _address_given(metadata: Mapping[str, str], has_auth: bool) -> bool:
    return bool(
        metadata.get("address")
        or metadata.get("addressFromEnv")
        or metadata.get("host")
        or metadata.get("hostFromEnv")
        or has_auth
    )


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = required(metadata, "stream", "consumerGroup")
    if not _address_given(metadata, has_auth):
        problems.append(
            Problem(
                "metadata.address",
                "give address (host:port), host and port, or an authenticationRef",
            )
        )
    problems += one_of(metadata, "enableTLS", ("true", "false"))
    problems += one_of(metadata, "unsafeSsl", ("true", "false"))
    idle = metadata.get("claimMinIdleSeconds")
    if idle is not None and not (idle.isdigit() and int(idle) >= 2):
        problems.append(
            Problem("metadata.claimMinIdleSeconds", f"whole seconds, at least 2; got {idle!r}")
        )
    index = metadata.get("databaseIndex")
    if index is not None and not index.isdigit():
        problems.append(Problem("metadata.databaseIndex", f"a number; got {index!r}"))
    return problems


async def _resolve(context: ResolveContext) -> RedisStreamsTrigger:
    meta = await context.parameters()
    where = context.where()
    address = context.from_env(meta, "address")
    host, port = context.from_env(meta, "host"), context.from_env(meta, "port")
    if address:
        host, _, port = address.rpartition(":")
    problems = []
    if not host:
        problems.append(Problem("metadata.address", "no address or host; add one"))
    if port is not None and not str(port).isdigit():
        problems.append(Problem("metadata.port", f"a port number; got {port!r}"))
    raise_problems(where, problems)
    tls = (meta.get("enableTLS") or "").lower() == "true" or meta.get("tls") == "enable"
    return RedisStreamsTrigger(
        host=str(host),
        port=int(port or 6379),
        stream=meta["stream"],
        group=meta["consumerGroup"],
        database=int(meta.get("databaseIndex") or 0),
        username=context.from_env(meta, "username"),
        password=context.from_env(meta, "password"),
        tls=tls,
        unsafe_ssl=(meta.get("unsafeSsl") or "").lower() == "true",
        ca=meta.get("ca", ""),
        cert=meta.get("cert", "") or meta.get("Cert", ""),
        key=meta.get("key", ""),
        claim_min_idle=float(meta.get("claimMinIdleSeconds") or 60),
    )


TRIGGER = TriggerType(
    name="redis-streams",
    destination="stream",
    metadata=frozenset(
        {
            "address",
            "addressFromEnv",
            "host",
            "hostFromEnv",
            "port",
            "portFromEnv",
            "username",
            "usernameFromEnv",
            "password",
            "passwordFromEnv",
            "stream",
            "consumerGroup",
            "databaseIndex",
            "enableTLS",
            "unsafeSsl",
            # jobrunner's own: idle seconds before a dead consumer's entries are claimed.
            "claimMinIdleSeconds",
            # KEDA's pending-entries / lag scaling keys: accepted, meaningless for push.
            "pendingEntriesCount",
            "streamLength",
            "lagCount",
            "activationLagCount",
        }
    ),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.redis_streams:open_source",
    summary="a Redis stream, read by a consumer group",
)
