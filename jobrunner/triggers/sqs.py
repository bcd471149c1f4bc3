"""``type: aws-sqs-queue``: KEDA's AWS SQS scaler metadata, consumed with long polling.

``queueURL`` (or ``queueURLFromEnv``): the queue's URL, or its name (then the URL is
asked of the endpoint); ``awsRegion`` (metadata or authentication); ``awsEndpoint`` for an
SQS-compatible server (ElasticMQ, LocalStack) or a VPC endpoint. Credentials as KEDA's:
TriggerAuthentication parameters ``awsAccessKeyID`` (or ``awsAccessKeyId``),
``awsSecretAccessKey``, ``awsSessionToken``; or metadata ``awsAccessKeyIDFromEnv`` /
``awsSecretAccessKeyFromEnv``; with none, the AWS SDK's default chain (environment, web
identity / IRSA, instance profile), which is what KEDA's pod identity means here. KEDA's
queue-length keys are accepted and ignored: a push dispatcher takes every message.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from jobrunner.triggers import (
    Problem,
    ResolveContext,
    TriggerType,
    from_env,
    one_of,
    raise_problems,
)

SQS_HOLD_CAP_SECONDS = 43_200.0
"""SQS's longest visibility: 12 h from the receive (ChangeMessageVisibility refuses more;
AWS SQS Developer Guide, "Visibility timeout")."""


@dataclass(frozen=True)
class SQSTrigger:
    queue: str
    """The queue's URL, or its name (resolved with GetQueueUrl at start)."""
    region: str
    endpoint: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    visibility_timeout: int | None = None
    """Seconds each renewal hides the message for; None: the queue's own setting."""

    @property
    def queue_name(self) -> str:
        """The queue's name (the last path part of a URL)."""
        if "://" in self.queue:
            return urllib.parse.urlsplit(self.queue).path.rstrip("/").rsplit("/", 1)[-1]
        return self.queue


def _check(metadata: Mapping[str, str], has_auth: bool) -> list[Problem]:
    problems = []
    if not (metadata.get("queueURL") or metadata.get("queueURLFromEnv")):
        problems.append(Problem("metadata.queueURL", "required (or queueURLFromEnv); add it"))
    if not (metadata.get("awsRegion") or has_auth):
        problems.append(Problem("metadata.awsRegion", "required (or from the authenticationRef)"))
    problems += one_of(metadata, "identityOwner", ("pod", "operator"))
    timeout = metadata.get("visibilityTimeout")
    if timeout is not None and not (timeout.isdigit() and 1 <= int(timeout) <= 43_200):
        problems.append(
            Problem("metadata.visibilityTimeout", f"whole seconds, 1 to 43200; got {timeout!r}")
        )
    return problems


async def _resolve(context: ResolveContext) -> SQSTrigger:
    meta = await context.parameters()
    where = context.where()
    queue = from_env(meta, "queueURL")
    region = meta.get("awsRegion")
    problems = []
    if not queue:
        problems.append(Problem("metadata.queueURL", "required; add it (or set $queueURLFromEnv)"))
    if not region:
        problems.append(Problem("metadata.awsRegion", "required; add it"))
    if meta.get("awsRoleArn"):
        problems.append(
            Problem(
                "authenticationRef",
                "awsRoleArn is not supported: give the dispatcher the role through pod "
                "identity (IRSA: AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE), which the "
                "AWS SDK's default chain uses, or give access keys",
            )
        )
    # KEDA's precedence: the TriggerAuthentication's keys, else the *FromEnv metadata.
    key_id = (
        meta.get("awsAccessKeyID") or meta.get("awsAccessKeyId") or from_env(meta, "awsAccessKeyID")
    )
    secret = meta.get("awsSecretAccessKey") or from_env(meta, "awsSecretAccessKey")
    if key_id and not secret:
        problems.append(
            Problem("authenticationRef", "awsAccessKeyID without awsSecretAccessKey; add it")
        )
    spec = context.scaledjob.spec
    if (
        "consumerTimeoutSeconds" in spec.model_fields_set
        and spec.consumerTimeoutSeconds > SQS_HOLD_CAP_SECONDS
    ):
        problems.append(
            Problem(
                "spec.consumerTimeoutSeconds",
                f"at most {SQS_HOLD_CAP_SECONDS:.0f} for SQS (a message stays invisible "
                "12 h from its receive at most); leave it unset to use that cap",
            )
        )
    raise_problems(where, problems)
    assert queue is not None
    assert region is not None
    timeout = meta.get("visibilityTimeout")
    return SQSTrigger(
        queue=queue,
        region=region,
        endpoint=meta.get("awsEndpoint") or None,
        access_key_id=key_id or None,
        secret_access_key=secret or None,
        session_token=meta.get("awsSessionToken") or None,
        visibility_timeout=int(timeout) if timeout else None,
    )


TRIGGER = TriggerType(
    name="aws-sqs-queue",
    destination="queue",
    metadata=frozenset(
        {
            "queueURL",
            "queueURLFromEnv",
            "awsRegion",
            "awsEndpoint",
            "identityOwner",
            "awsAccessKeyID",
            "awsAccessKeyIDFromEnv",
            "awsSecretAccessKeyFromEnv",
            # jobrunner's own: seconds each visibility renewal hides the message for.
            "visibilityTimeout",
            # KEDA's queue-length scaling keys: accepted, meaningless for push delivery.
            "queueLength",
            "activationQueueLength",
            "scaleOnInFlight",
            "scaleOnDelayed",
        }
    ),
    check=_check,
    resolve=_resolve,
    source="jobrunner.sources.sqs:open_source",
    summary="an AWS SQS queue (standard or FIFO), long-polled",
)
