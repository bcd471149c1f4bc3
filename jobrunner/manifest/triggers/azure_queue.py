"""``type: azure-queue``: an Azure Storage queue, with KEDA's azure-queue scaler metadata.

Keys (KEDA's names, kedacore/keda ``pkg/scalers/azure_queue_scaler.go``):

* ``queueName`` (required): 3-63 characters, lower-case letters, digits and single
  dashes, starting and ending with a letter or digit (the Storage service's rule; so
  no dots, which is why failures go to ``<queue>-poison``, the Functions convention,
  rather than ``<queue>.dead-letter``);
* the connection string: a TriggerAuthentication parameter ``connection`` or
  ``connectionFromEnv`` (the name of an environment variable of the dispatcher that
  holds it; in operator mode only one the operator's owner allow-lists). It must carry
  its credentials (``AccountKey`` or ``SharedAccessSignature``; Azurite's
  ``UseDevelopmentStorage=true`` has its well-known key). ``accountName`` alone, or a
  TriggerAuthentication ``podIdentity``, means an ambient identity (in operator mode the
  operator's own), which jobrunner does not use: give a connection;
* ``messageEncoding`` (jobrunner's; the Functions host.json
  ``extensions.queues.messageEncoding``): ``base64`` (the Functions default) or
  ``none``;
* KEDA's scaling keys (``queueLength``, ``activationQueueLength``,
  ``queueLengthStrategy``, ``cloud``, ``endpointSuffix``) are accepted and ignored: a
  push dispatcher takes every message as it arrives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.core.redaction import connection_string_endpoint
from jobrunner.manifest.scaledjob import ScaledJobSpec, Trigger
from jobrunner.manifest.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    one_of,
    raise_problems,
    required,
)

QUEUE_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")
"""Storage queue names (learn.microsoft.com "Naming Queues and Metadata"; the Functions
extension checks the same in QueueClientExtensions.cs)."""
POISON_SUFFIX = "-poison"
"""Where the Functions host moves a message that failed (QueueProcessor.cs)."""
ENCODINGS = ("base64", "none")


def queue_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Storage queue name, or None."""
    if QUEUE_NAME.match(name):
        return None
    return (
        f"{name!r} is not a Storage queue name: 3-63 lower-case letters, digits and single "
        "dashes, starting and ending with a letter or digit"
    )


@dataclass(frozen=True)
class AzureQueueTrigger:
    connection: str
    """The storage account's connection string (a secret: never logged)."""
    queue: str
    poison_queue: str
    encoding: str
    """``base64`` or ``none``: how message text maps to the body's bytes."""

    @property
    def account(self) -> str:
        """Where the connection string points, for messages: the queue endpoint as
        ``scheme://host:port`` (no SAS token, no key), else ``account <name>``."""
        return connection_string_endpoint(self.connection)


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = required(metadata, "queueName")
    name = metadata.get("queueName")
    if name and (why := queue_name_problem(name)):
        problems.append(Problem("metadata.queueName", why))
    if not (metadata.get("connectionFromEnv") or has_auth):
        problems.append(
            Problem(
                "metadata.connectionFromEnv",
                "give connectionFromEnv (an environment variable holding the connection "
                "string) or an authenticationRef with a `connection` parameter",
            )
        )
    problems += one_of(metadata, "messageEncoding", ENCODINGS)
    return problems


def _check_spec(spec: ScaledJobSpec, trigger: Trigger) -> list[Problem]:
    """The poison queue (``deadLetter.queue``, default ``<queueName>-poison``) must be a
    Storage queue name too: 63 characters at most leaves 56 for a queue without one."""
    queue = trigger.metadata.get("queueName")
    if spec.deadLetter.queue is not None:
        why = queue_name_problem(spec.deadLetter.queue)
        return [Problem("spec.deadLetter.queue", why)] if why else []
    if not queue or queue_name_problem(queue):
        return []  # a bad queueName is check's to name
    why = queue_name_problem(f"{queue}{POISON_SUFFIX}")
    if why is None:
        return []
    return [
        Problem(
            "spec.deadLetter.queue",
            f"the default poison queue {why}; set spec.deadLetter.queue, or shorten "
            f"metadata.queueName to {63 - len(POISON_SUFFIX)} characters",
        )
    ]


_CREDENTIAL_KEYS = ("accountkey", "sharedaccesssignature")


def has_credentials(connection: str) -> bool:
    """Whether a connection string authenticates by itself: an account key, a SAS, or
    Azurite's ``UseDevelopmentStorage=true`` (its well-known key). Keys are matched
    without case, as the Storage SDK does."""
    parts = {
        k.strip().lower(): v.strip()
        for k, _, v in (p.partition("=") for p in connection.split(";"))
        if k.strip()
    }
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return True
    return any(parts.get(key) for key in _CREDENTIAL_KEYS)


async def _resolve(context: ResolveContext) -> AzureQueueTrigger:
    meta = await context.parameters()
    where = context.where()
    connection = _connection(context, meta, where)
    queue = meta["queueName"]
    poison = context.scaledjob.spec.deadLetter.queue or f"{queue}{POISON_SUFFIX}"
    if why := queue_name_problem(poison):
        raise_problems(
            where,
            [Problem("metadata.queueName", f"its poison queue {why}; set spec.deadLetter.queue")],
        )
    return AzureQueueTrigger(
        connection=connection,
        queue=queue,
        poison_queue=poison,
        encoding=meta.get("messageEncoding") or "base64",
    )


def _connection(context: ResolveContext, meta: Mapping[str, str], where: str) -> str:
    """The connection string, which must carry its own credentials (an AccountKey or a
    SharedAccessSignature): no pod identity, no ambient identity. ManifestError
    otherwise."""
    if context.pod_identity():
        provider = context.pod_identity().get("provider", "")
        raise_problems(
            where,
            [
                Problem(
                    "authenticationRef",
                    f"podIdentity {provider!r} is not supported for Azure queues (it would "
                    "use an ambient identity, in operator mode the operator's own); give a "
                    "`connection` parameter with an AccountKey or SharedAccessSignature "
                    "from a Secret (TriggerAuthentication secretTargetRef)",
                )
            ],
        )
    connection = context.from_env(meta, "connection")
    if not connection and meta.get("connectionFromEnv"):
        raise_problems(
            where,
            [
                Problem(
                    "metadata.connectionFromEnv",
                    context.reach.unset(meta["connectionFromEnv"]),
                )
            ],
        )
    if not connection:
        raise_problems(
            where,
            [
                Problem(
                    "authenticationRef",
                    "no `connection` parameter came from the TriggerAuthentication; "
                    "workload identity (accountName alone) is not supported: give a "
                    "connection string from a Secret (secretTargetRef, parameter: connection)",
                )
            ],
        )
    assert connection is not None
    if not has_credentials(connection):
        raise_problems(
            where,
            [
                Problem(
                    "authenticationRef",
                    "the connection string carries no credentials (no AccountKey or "
                    "SharedAccessSignature); jobrunner uses no ambient identity: add one",
                )
            ],
        )
    return connection


TRIGGER = TriggerType(
    name="azure-queue",
    destination="queue",
    metadata=frozenset(
        {
            "queueName",
            "connectionFromEnv",
            "accountName",
            "messageEncoding",
            # KEDA's scaling keys: accepted, meaningless for push delivery.
            "queueLength",
            "activationQueueLength",
            "queueLengthStrategy",
            "cloud",
            "endpointSuffix",
        }
    ),
    check=_check,
    check_spec=_check_spec,
    resolve=_resolve,
    source="jobrunner.sources.azure_queue:open_source",
    sink="jobrunner.sources.azure_queue:open_sink",
    summary="an Azure Storage queue (azure-storage-queue; Azurite locally)",
)
