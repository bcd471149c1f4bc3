"""``type: aws-sqs-queue``: KEDA's AWS SQS scaler metadata, consumed with long polling.

``queueURL`` (or ``queueURLFromEnv``): the queue's URL, or its name (then the URL is
asked of the endpoint); ``awsRegion`` (metadata or authentication); ``awsEndpoint`` for an
SQS-compatible server (ElasticMQ, LocalStack) or a VPC endpoint. Credentials as KEDA's:
TriggerAuthentication parameters ``awsAccessKeyID`` (or ``awsAccessKeyId``),
``awsSecretAccessKey``, ``awsSessionToken``; or metadata ``awsAccessKeyIDFromEnv`` /
``awsSecretAccessKeyFromEnv``. KEDA's queue-length keys are accepted and ignored: a push
dispatcher takes every message.

Without keys, the AWS SDK's default chain (environment, web identity / IRSA, instance
profile) gives the dispatcher's *own* identity. KEDA's ``identityOwner`` (kedacore/keda
``pkg/scalers/aws/aws_common.go``) says whose identity a trigger without keys uses:
``pod`` (its default) the scale target's, ``operator`` the KEDA operator's; its newer
TriggerAuthentication ``podIdentity: {provider: aws}`` with ``identityOwner: keda`` (the
default) the operator's, ``workload`` the target's. With ``jobrunner run`` the
dispatcher is the scale target and its own operator, so both mean the default chain. In
operator mode the default chain is the operator's identity, which a tenant may use only
by asking for it (``identityOwner: operator``, or podIdentity aws/keda) where the
operator's owner allows it (``allow_operator_identity``); the Job's own identity (``pod``,
``workload``) is not something the operator can take on, so without keys that is
refused. Keys together with the operator's identity are refused too: KEDA would quietly
ignore the keys.
"""

from __future__ import annotations

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
)
from jobrunner.manifest.triggers.reach import OPERATOR_IDENTITY_SETTING

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
    queue = context.from_env(meta, "queueURL")
    region = meta.get("awsRegion")
    problems = []
    if not queue:
        problems.append(Problem("metadata.queueURL", "required; add it (or set $queueURLFromEnv)"))
    if not region:
        problems.append(Problem("metadata.awsRegion", "required; add it"))
    pod = context.pod_identity()
    if meta.get("awsRoleArn") or pod.get("roleArn"):
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
        meta.get("awsAccessKeyID")
        or meta.get("awsAccessKeyId")
        or context.from_env(meta, "awsAccessKeyID")
    )
    secret = meta.get("awsSecretAccessKey") or context.from_env(meta, "awsSecretAccessKey")
    if key_id and not secret:
        problems.append(
            Problem("authenticationRef", "awsAccessKeyID without awsSecretAccessKey; add it")
        )
    problems += _identity_problems(context, meta, pod, keys=bool(key_id or secret))
    problems += _check_spec(context.scaledjob.spec, context.trigger)
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


QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}(\.fifo)?")
"""SQS queue names: 1 to 80 letters, digits, '-' and '_', '.fifo' ending a FIFO queue's
(AWS SQS Developer Guide, "Amazon SQS queue quotas")."""


def _check_spec(spec: ScaledJobSpec, _trigger: Trigger) -> list[Problem]:
    """SQS's bounds on the ScaledJob's fields: how long a message can be held, and the
    dead-letter queue's name."""
    problems = []
    if (
        "consumerTimeoutSeconds" in spec.model_fields_set
        and spec.consumerTimeoutSeconds > SQS_HOLD_CAP_SECONDS
    ):
        problems.append(
            Problem(
                "spec.consumerTimeoutSeconds",
                f"at most {SQS_HOLD_CAP_SECONDS:.0f} for SQS (a message stays invisible "
                f"12 h from its receive at most); got {spec.consumerTimeoutSeconds:g}; leave "
                "it unset to use that cap",
            )
        )
    queue = spec.deadLetter.queue
    if queue is not None and not QUEUE_NAME.fullmatch(queue.rsplit("/", 1)[-1]):
        problems.append(
            Problem(
                "spec.deadLetter.queue",
                "an SQS queue name (1 to 80 letters, digits, '-' and '_'; '.fifo' at the end "
                f"of a FIFO queue's) or its URL; got {queue[:100]!r}",
            )
        )
    return problems


def _identity_problems(
    context: ResolveContext, meta: Mapping[str, str], pod: Mapping[str, str], *, keys: bool
) -> list[Problem]:
    """Whose identity a trigger uses, as KEDA's ``identityOwner`` and ``podIdentity``
    say (see the module docstring): [] when it can be honoured here."""
    provider = pod.get("provider", "")
    pod_owner = pod.get("identityOwner") or "keda"
    if problems := _pod_identity_problems(provider, pod_owner):
        return problems
    wants_operator = meta.get("identityOwner") == "operator" or (
        provider == "aws" and pod_owner == "keda"
    )
    field = "metadata.identityOwner" if meta.get("identityOwner") else "authenticationRef"
    if keys:
        if wants_operator:
            return [
                Problem(
                    field,
                    "asks for the operator's own identity, and access keys are given too "
                    "(KEDA would ignore the keys); remove the one you do not mean",
                )
            ]
        return []
    return _keyless_problems(context, wants_operator=wants_operator, field=field)


def _pod_identity_problems(provider: str, pod_owner: str) -> list[Problem]:
    """A ``podIdentity`` that gives no AWS credentials, or names an owner KEDA has not."""
    if provider and provider != "aws":
        return [
            Problem(
                "authenticationRef",
                f"podIdentity {provider!r} gives no AWS credentials; use provider aws, or "
                "access keys",
            )
        ]
    if provider and pod_owner not in ("keda", "workload"):
        return [
            Problem(
                "authenticationRef",
                f"podIdentity.identityOwner: one of keda, workload; got {pod_owner!r}",
            )
        ]
    return []


def _keyless_problems(
    context: ResolveContext, *, wants_operator: bool, field: str
) -> list[Problem]:
    """A trigger without access keys: fine for ``jobrunner run`` (the user's own
    identity); in operator mode only with the operator's identity, asked for and lent."""
    reach = context.reach
    if not reach.tenant:
        return []  # jobrunner run: the default chain is the user's own identity
    namespace = context.scaledjob.namespace
    bring_keys = (
        "give awsAccessKeyID and awsSecretAccessKey from a Secret of namespace "
        f"{namespace} (TriggerAuthentication secretTargetRef)"
    )
    if wants_operator:
        if reach.operator_identity:
            return []
        return [
            Problem(
                field,
                "the operator's own AWS identity is not lent to ScaledJobs here "
                f"({OPERATOR_IDENTITY_SETTING} is false); {bring_keys}",
            )
        ]
    return [
        Problem(
            "authenticationRef",
            "no AWS access keys: the operator cannot act with the Job's identity "
            "(identityOwner: pod, KEDA's default) and lends its own only when asked "
            f"(identityOwner: operator) and allowed ({OPERATOR_IDENTITY_SETTING}); "
            f"{bring_keys}",
        )
    ]


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
    check_spec=_check_spec,
    resolve=_resolve,
    source="jobrunner.sources.sqs:open_source",
    summary="an AWS SQS queue (standard or FIFO), long-polled",
)
