"""``type: nats-jetstream``: KEDA's NATS JetStream scaler metadata, consumed through a
durable pull consumer.

KEDA's scaler reads the consumer's lag from the monitoring endpoint only; jobrunner
consumes, so it also needs the client URL: ``natsServer`` (``nats://`` or ``tls://``,
or ``natsServerFromEnv``, or a TriggerAuthentication ``natsServer`` parameter), by
default ``nats://<host of natsServerMonitoringEndpoint>:4222``. ``stream`` and
``consumer`` (KEDA's, both required): the durable pull consumer is created when it does
not exist (explicit acks, deliver all); an existing one is used as it is configured.
Credentials (jobrunner's, from the TriggerAuthentication): ``username`` and ``password``,
or ``token``, or ``creds`` (the text of a ``.creds`` file); ``ca`` for TLS. ``account``,
``accountID``, ``useHttps`` and the lag keys are KEDA's monitoring settings: accepted and
ignored.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.manifest.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    raise_problems,
    required,
)


@dataclass(frozen=True)
class NatsJetStreamTrigger:
    server: str
    stream: str
    consumer: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    ca: str = ""


def _server(context: ResolveContext, meta: Mapping[str, str]) -> str | None:
    server = context.from_env(meta, "natsServer")
    if server:
        return server
    monitoring = meta.get("natsServerMonitoringEndpoint")
    if not monitoring:
        return None
    host = urllib.parse.urlsplit(
        monitoring if "://" in monitoring else f"http://{monitoring}"
    ).hostname
    return f"nats://{host}:4222" if host else None


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = required(metadata, "stream", "consumer")
    if not (
        metadata.get("natsServer")
        or metadata.get("natsServerFromEnv")
        or metadata.get("natsServerMonitoringEndpoint")
        or has_auth
    ):
        problems.append(
            Problem(
                "metadata.natsServer",
                "give natsServer (nats://host:4222) or natsServerMonitoringEndpoint",
            )
        )
    server = metadata.get("natsServer")
    if server and urllib.parse.urlsplit(server).scheme not in ("nats", "tls"):
        problems.append(Problem("metadata.natsServer", f"a nats:// or tls:// URL; got {server!r}"))
    return problems


async def _resolve(context: ResolveContext) -> NatsJetStreamTrigger:
    meta = await context.parameters()
    server = _server(context, meta)
    if not server:
        raise_problems(
            context.where(),
            [Problem("metadata.natsServer", "no client URL; add natsServer (nats://host:4222)")],
        )
    assert server is not None
    return NatsJetStreamTrigger(
        server=server,
        stream=meta["stream"],
        consumer=meta["consumer"],
        username=meta.get("username") or None,
        password=meta.get("password") or None,
        token=meta.get("token") or None,
        creds=meta.get("creds") or None,
        ca=meta.get("ca", ""),
    )


TRIGGER = TriggerType(
    name="nats-jetstream",
    destination="stream",
    metadata=frozenset(
        {
            "natsServer",
            "natsServerFromEnv",
            "natsServerMonitoringEndpoint",
            "stream",
            "consumer",
            # KEDA's monitoring and lag scaling keys: accepted, meaningless for push.
            "account",
            "accountID",
            "useHttps",
            "lagThreshold",
            "activationLagThreshold",
        }
    ),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.nats_jetstream:open_source",
    summary="a NATS JetStream stream, through a durable pull consumer",
)
