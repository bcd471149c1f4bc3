"""KEDA's TriggerAuthentication: parameters taken from Secrets (``secretTargetRef``) and
from environment variables (``env``), as far as the trigger's ``Reach`` lets it read them
(all of the dispatcher's own in file mode; in operator mode only what the operator's
owner allow-lists: see jobrunner.manifest.triggers.reach).

A ``ClusterTriggerAuthentication`` (``authenticationRef.kind``) is KEDA's cluster-wide
kind: its Secrets are read in KEDA's cluster object namespace, not the ScaledJob's
(``cluster_object_namespace``). Only file mode reaches it: the operator refuses it for
tenants (jobrunner.operator.resources), and so does resolving under a tenant's ``Reach``.

Secrets are read from the cluster first. A Secret that the manifest file itself declares
(the way users keep a Secret beside its ScaledJob for ``kubectl apply -f``) is used when
the cluster has none of that name — always so with the local executor, which has no
cluster — and a log line says which copy was used.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from jobrunner.core.protocols import ApiRejected
from jobrunner.manifest.scaledjob import (
    AuthenticationRef,
    ManifestError,
    ScaledJob,
    SecretKeyRef,
    Trigger,
    TriggerAuthentication,
    authentication_key,
)
from jobrunner.manifest.triggers.reach import Reach

logger = logging.getLogger(__name__)

SecretReader = Callable[[str, str], Awaitable[Mapping[str, str] | None]]
"""(namespace, name) -> the Secret's base64 ``data``, or None when it does not exist."""

CLUSTER_OBJECT_NAMESPACE_ENV = "KEDA_CLUSTER_OBJECT_NAMESPACE"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CLUSTER_OBJECT_NAMESPACE_DEFAULT = "keda"


def cluster_object_namespace(
    reach: Reach, *, pod_namespace: Path = SERVICE_ACCOUNT_NAMESPACE
) -> str:
    """Where the Secrets of a ClusterTriggerAuthentication are, by KEDA's rule (kedacore/keda
    ``pkg/util/env_resolver.go``, ``GetClusterObjectNamespace``):
    ``$KEDA_CLUSTER_OBJECT_NAMESPACE`` when set, else the namespace of the pod this runs
    in (its service account's ``namespace`` file), else ``keda`` — where KEDA's docs say
    its operator usually runs (KEDA itself always runs in a pod)."""
    configured = reach.env.get(CLUSTER_OBJECT_NAMESPACE_ENV, "").strip()
    if configured:
        return configured
    try:
        own = pod_namespace.read_text().strip()
    except OSError:
        own = ""
    return own or CLUSTER_OBJECT_NAMESPACE_DEFAULT


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret manifest's values as base64 ``data`` (``stringData`` encoded, and winning
    over ``data`` for the same key, as the API server merges them)."""
    data = {str(k): str(v) for k, v in (secret.get("data") or {}).items()}
    for key, value in (secret.get("stringData") or {}).items():
        data[str(key)] = base64.b64encode(str(value).encode()).decode()
    return data


class FileSecrets:
    """A SecretReader that asks ``cluster`` first, then the Secrets of the manifest file
    (``secrets``: (namespace, name) -> Secret object)."""

    def __init__(
        self,
        cluster: SecretReader | None,
        secrets: Mapping[tuple[str, str], Mapping[str, Any]],
    ) -> None:
        self._cluster = cluster
        self._secrets = secrets
        self.looked_in = "the cluster or the manifest file" if cluster else "the manifest file"
        """Where a Secret is looked for, for the error when it is in neither."""

    async def __call__(self, namespace: str, name: str) -> Mapping[str, str] | None:
        if self._cluster is not None:
            found = await self._cluster(namespace, name)
            if found is not None:
                return found
        local = self._secrets.get((namespace, name))
        if local is None:
            return None
        logger.info(
            "Secret %s/%s: the cluster has none, using the one declared in the manifest file",
            namespace,
            name,
        )
        return secret_data(local)


async def auth_parameters(
    scaledjob: ScaledJob,
    trigger: Trigger,
    authentications: Mapping[str, TriggerAuthentication],
    read_secret: SecretReader,
    reach: Reach,
) -> dict[str, str]:
    """The parameters the trigger's ``authenticationRef`` supplies; {} without one. An
    ``env`` entry naming a variable ``reach`` does not let the ScaledJob read is a
    ManifestError (naming the variable, never its value)."""
    ref = trigger.authenticationRef
    if ref is None:
        return {}
    auth = _referenced(scaledjob, ref, authentications)
    if ref.kind == "ClusterTriggerAuthentication":
        if reach.tenant:
            raise ManifestError(
                f"ScaledJob {scaledjob.name}: field spec.triggers[].authenticationRef.kind: "
                "ClusterTriggerAuthentication is not supported by the operator; use a "
                "TriggerAuthentication in the ScaledJob's namespace"
            )
        secrets_namespace = cluster_object_namespace(reach)
    else:
        secrets_namespace = scaledjob.namespace
    params: dict[str, str] = {}
    for item in auth.spec.secretTargetRef:
        params[item.parameter] = await _secret_value(
            auth,
            item,
            namespace=secrets_namespace,
            cluster=ref.kind == "ClusterTriggerAuthentication",
            read_secret=read_secret,
        )
    for i, env_ref in enumerate(auth.spec.env):
        value = reach.read(
            env_ref.name,
            where=f"{auth.kind} {auth.metadata.name}",
            field_path=f"spec.env[{i}].name",
            namespace=scaledjob.namespace,
            parameter=env_ref.parameter,
        )
        if value is not None:
            params[env_ref.parameter] = value
    return params


def _referenced(
    scaledjob: ScaledJob,
    ref: AuthenticationRef,
    authentications: Mapping[str, TriggerAuthentication],
) -> TriggerAuthentication:
    """The (Cluster)TriggerAuthentication ``ref`` names; ManifestError when the file has
    none, hinting at the other kind when it has one of that name."""
    auth = authentications.get(ref.key)
    if auth is not None:
        return auth
    other = (
        "ClusterTriggerAuthentication"
        if ref.kind == "TriggerAuthentication"
        else "TriggerAuthentication"
    )
    hint = (
        f" (the file has a {other} of that name: set authenticationRef.kind: {other})"
        if authentication_key(other, ref.name) in authentications
        else ""
    )
    raise ManifestError(
        f"ScaledJob {scaledjob.name}: field spec.triggers[].authenticationRef.name: "
        f"{ref.kind} {ref.name!r} is not in the manifest file; add it there{hint}"
    )


async def _secret_value(
    auth: TriggerAuthentication,
    item: SecretKeyRef,
    *,
    namespace: str,
    cluster: bool,
    read_secret: SecretReader,
) -> str:
    """One ``secretTargetRef``'s value, from its Secret in ``namespace``. ManifestError,
    saying what to do, when the Secret may not be read, is not there (``cluster``: the
    reference is to a ClusterTriggerAuthentication, whose Secrets KEDA keeps in its
    cluster object namespace) or lacks the key."""
    where = f"{auth.kind} {auth.metadata.name}: secretTargetRef {item.parameter}"
    try:
        data = await read_secret(namespace, item.name)
    except ApiRejected as exc:
        if exc.status != 403:
            raise
        # RBAC's refusal, in our words (the server's text stays out of status). Also
        # the answer for a Secret that does not exist: 403 comes before 404.
        raise ManifestError(
            f"{where}: Secret {namespace}/{item.name}: the dispatcher is not "
            "allowed to read it (403 Forbidden); with the chart's "
            "permissions.operator.restrict.secret, only Secrets named in "
            "permissions.operator.restrict.namesAllowList can be used: ask the "
            "operator's owner to add it there, or name an allowed Secret"
        ) from exc
    if data is None:
        # Operator mode reads the cluster's Secrets only: no manifest file to name.
        looked_in = getattr(read_secret, "looked_in", "the cluster")
        whose = (
            f" (a ClusterTriggerAuthentication's Secrets are in KEDA's cluster object "
            f"namespace: ${CLUSTER_OBJECT_NAMESPACE_ENV}, default "
            f"{CLUSTER_OBJECT_NAMESPACE_DEFAULT})"
            if cluster
            else ""
        )
        raise ManifestError(
            f"{where}: Secret {namespace}/{item.name} not found in "
            f"{looked_in}{whose}; create it (kubectl create secret generic "
            f"{item.name} -n {namespace} --from-literal={item.key}=...)"
        )
    if item.key not in data:
        raise ManifestError(
            f"{where}: Secret {namespace}/{item.name} has no key {item.key!r} "
            f"(it has: {', '.join(sorted(data)) or 'none'})"
        )
    return base64.b64decode(data[item.key]).decode()


def pod_identity(
    trigger: Trigger, authentications: Mapping[str, TriggerAuthentication]
) -> dict[str, str]:
    """KEDA's ``podIdentity`` of the trigger's TriggerAuthentication (``provider``,
    ``identityOwner``, ``roleArn``...), as strings; {} when there is none or its provider
    is ``none``. jobrunner keeps the field as KEDA wrote it; the trigger types that deal
    in cloud identities (SQS, Azure) read it, so that it is honoured or refused, never
    ignored."""
    ref = trigger.authenticationRef
    auth = authentications.get(ref.key) if ref is not None else None
    extra = (auth.spec.model_extra or {}) if auth is not None else {}
    found = extra.get("podIdentity")
    if not isinstance(found, Mapping):
        return {}
    identity = {str(k): str(v) for k, v in found.items() if v is not None}
    if identity.get("provider", "none") in ("", "none"):
        return {}
    return identity
