"""The small interface the operator needs from the API server, and the paths it uses.

Objects are plain dicts at API paths, so one interface serves ScaledJobs (and their
status subresource), TriggerAuthentications, Leases and Events; the real client is
``jobrunner.kube.objects.KubeObjects``, the in-memory twin ``jobrunner.testing.MemoryObjects``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from jobrunner.core import apipath
from jobrunner.core.protocols import JobPage, WatchEvent

GROUP = "jobrunner.dev"
VERSION = "v1alpha1"
KEDA_GROUP = "keda.sh"
KEDA_VERSION = "v1alpha1"


class ObjectClient(Protocol):
    async def list(
        self, path: str, *, selector: str = "", limit: int = 500, continue_token: str | None = None
    ) -> JobPage: ...

    def watch(
        self, path: str, *, selector: str = "", resource_version: str
    ) -> AsyncIterator[WatchEvent]: ...

    async def get(self, path: str) -> dict[str, Any] | None: ...

    async def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def replace(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def patch(self, path: str, patch: Any, *, json_patch: bool = False) -> dict[str, Any]: ...

    async def delete(self, path: str, *, resource_version: str | None = None) -> None: ...


def collection(group: str, version: str, plural: str, namespace: str | None) -> str:
    """The path of a collection: in one namespace, or across all (``namespace`` None);
    ``group`` "" is the core group. InvalidName for a namespace that is not one."""
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace is None:
        return f"{base}/{plural}"
    return f"{base}/namespaces/{apipath.namespace(namespace)}/{plural}"


def item(collection_path: str, name: str, subresource: str | None = None, *, what: str) -> str:
    """The path of the object ``name`` in a collection (``collection(...)``), or of its
    ``subresource`` (``status``); InvalidName naming ``what`` (``ScaledJob name``, ``Lease
    name``...) when ``name`` is not a Kubernetes object name."""
    path = f"{collection_path}/{apipath.name(name, field=what)}"
    return f"{path}/{subresource}" if subresource else path


def scaledjobs(namespace: str | None, *, keda: bool = False) -> str:
    if keda:
        return collection(KEDA_GROUP, KEDA_VERSION, "scaledjobs", namespace)
    return collection(GROUP, VERSION, "scaledjobs", namespace)


def trigger_authentications(namespace: str | None, *, keda: bool = False) -> str:
    if keda:
        return collection(KEDA_GROUP, KEDA_VERSION, "triggerauthentications", namespace)
    return collection(GROUP, VERSION, "triggerauthentications", namespace)


def leases(namespace: str) -> str:
    return collection("coordination.k8s.io", "v1", "leases", namespace)


def events(namespace: str) -> str:
    return collection("", "v1", "events", namespace)
