"""``type: azure-queue``: an Azure Storage queue, with KEDA's azure-queue scaler metadata.

Keys (KEDA's names, kedacore/keda ``pkg/scalers/azure_queue_scaler.go``):

* ``queueName`` (required): 3-63 characters, lower-case letters, digits and single
  dashes, starting and ending with a letter or digit (the Storage service's rule; so
  no dots, which is why failures go to ``<queue>-poison``, the Functions convention,
  rather than ``<queue>.dead-letter``);
* the connection string: a TriggerAuthentication parameter ``connection`` or
  ``connectionFromEnv`` (the name of an environment variable of the dispatcher that
  holds it). ``accountName`` alone means workload identity, which jobrunner does not
  support: give a connection;
* ``messageEncoding`` (jobrunner's; the Functions host.json
  ``extensions.queues.messageEncoding``): ``base64`` (the Functions default) or
  ``none``;
* KEDA's scaling keys (``queueLength``, ``activationQueueLength``,
  ``queueLengthStrategy``, ``cloud``, ``endpointSuffix``) are accepted and ignored: a
  push dispatcher takes every message as it arrives.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.redaction import connection_string_endpoint
from jobrunner.triggers import (
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


async def _resolve(context: ResolveContext) -> AzureQueueTrigger:
    meta = await context.parameters()
    where = context.where()
    connection = meta.get("connection")
    if not connection and meta.get("connectionFromEnv"):
        connection = os.environ.get(meta["connectionFromEnv"])
        if not connection:
            raise_problems(
                where,
                [
                    Problem(
                        "metadata.connectionFromEnv",
                        f"${meta['connectionFromEnv']} is not set in the dispatcher's environment",
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
                    "workload identity (accountName alone) is not supported",
                )
            ],
        )
    assert connection is not None
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
    resolve=_resolve,
    source="jobrunner.sources.azure_queue:open_source",
    sink="jobrunner.sources.azure_queue:open_sink",
    summary="an Azure Storage queue (azure-storage-queue; Azurite locally)",
)
