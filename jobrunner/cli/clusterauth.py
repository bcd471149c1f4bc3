"""TriggerAuthentications of the cluster for a manifest file's ScaledJobs: file mode
(`run -f`, `dead-letters -f`) uses the file's own, and reads from the ScaledJob's
namespace those the file names but does not declare, as `kubectl apply` users keep them
(the ScaledJob in a file, its TriggerAuthentication applied to the cluster once)."""

from __future__ import annotations

from jobrunner.core.protocols import ApiRejected
from jobrunner.kube.client import KubeJobClient
from jobrunner.kube.objects import KubeObjects
from jobrunner.manifest.loader import ManifestSet
from jobrunner.manifest.scaledjob import ManifestError, ScaledJob, TriggerAuthentication
from jobrunner.operator import api
from jobrunner.operator.resources import parse_authentication


async def cluster_authentication(
    jobs: KubeJobClient, scaledjob: ScaledJob, name: str, *, file: str, index: int
) -> TriggerAuthentication:
    """The TriggerAuthentication ``name`` of the ScaledJob's namespace from the cluster,
    for a ScaledJob whose file does not declare it (as `kubectl apply` users keep them:
    the ScaledJob in a file, its TriggerAuthentication applied once). Its group is the
    ScaledJob's (KEDA resolves authenticationRef in its own group: keda.sh for a keda.sh
    ScaledJob, jobrunner.dev for ours). ManifestError naming the field (trigger
    ``index``) when the cluster has none or may not be asked (403)."""

    keda = scaledjob.apiVersion.startswith(f"{api.KEDA_GROUP}/")
    group = api.KEDA_GROUP if keda else api.GROUP
    namespace = scaledjob.namespace
    where = (
        f"ScaledJob {scaledjob.name}: field spec.triggers[{index}].authenticationRef.name: "
        f"TriggerAuthentication {name!r}"
    )
    path = api.item(
        api.trigger_authentications(namespace, keda=keda), name, what="TriggerAuthentication name"
    )
    try:
        found = await KubeObjects(jobs).get(path)
    except ApiRejected as exc:
        if exc.status == 404:  # no such resource: the group's CRDs are not installed
            found = None
        elif exc.status == 403:
            raise ManifestError(
                f"{where} is not in {file}, and this identity may not get "
                f"triggerauthentications.{group} in namespace {namespace} (403 Forbidden): "
                "add it to the file, or use a kubeconfig allowed to read it"
            ) from exc
        else:
            raise
    if found is None:
        raise ManifestError(
            f"{where} is neither in {file} nor in namespace {namespace} of the cluster "
            f"(triggerauthentications.{group}): add it to the file, or kubectl apply it"
        )
    auth = parse_authentication(found)
    if isinstance(auth, str):
        raise ManifestError(f"{where} in namespace {namespace} of the cluster: {auth}")
    return auth


async def with_cluster_authentications(manifests: ManifestSet, jobs: KubeJobClient) -> ManifestSet:
    """``manifests`` with the TriggerAuthentications its triggers name and it does not
    declare, read from the cluster. The set holds them by name, so one name needed from
    two namespaces is a ManifestError (each ScaledJob must get its own namespace's)."""
    found = dict(manifests.authentications)
    fetched: dict[str, str] = {}
    """Name -> the namespace it was read from."""
    for scaledjob in manifests.scaledjobs:
        for index, trigger in enumerate(scaledjob.spec.triggers):
            ref = trigger.authenticationRef
            if ref is None or ref.kind != "TriggerAuthentication":
                continue
            if ref.name in manifests.authentications:
                continue
            earlier = fetched.get(ref.name)
            if earlier is not None and earlier != scaledjob.namespace:
                raise ManifestError(
                    f"ScaledJob {scaledjob.name}: field spec.triggers[{index}]."
                    f"authenticationRef.name: TriggerAuthentication {ref.name!r} is needed "
                    f"from namespaces {earlier} and {scaledjob.namespace}; run one file per "
                    "namespace, or declare them in the file"
                )
            if earlier is None:
                found[ref.name] = await cluster_authentication(
                    jobs, scaledjob, ref.name, file=str(manifests.path), index=index
                )
                fetched[ref.name] = scaledjob.namespace
    return manifests.model_copy(update={"authentications": found})
