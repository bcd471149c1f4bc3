"""Any Kubernetes object as raw JSON, by API path: custom resources (ScaledJobs and their
status), Leases and Events, for the operator.

It rides on a ``KubeJobClient``'s transport (the same ApiClient, connection pool, thread
pool and watch bridge), so an operator process has one client for everything it asks the
API server, and one place that counts the requests. Like the Job client it sends plain
JSON, never the generated model classes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from jobrunner.core.protocols import ApiRejected, JobPage, WatchEvent
from jobrunner.kube.client import KubeJobClient

_MERGE_PATCH = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"


class KubeObjects:
    """List, watch, read and write objects at API paths (``/apis/<group>/<version>
    [/namespaces/<ns>]/<resource>[/<name>[/<subresource>]]``). A refusal is
    ``ApiRejected`` (404, 409 on a stale ``resourceVersion``, 403...); an API server that
    cannot be reached, or answers 5xx, is ``TransientError``."""

    def __init__(self, transport: KubeJobClient) -> None:
        self._t = transport

    @property
    def requests(self) -> dict[str, int]:
        """Requests sent through the shared transport so far, by verb."""
        return self._t.requests

    async def list(
        self, path: str, *, selector: str = "", limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        query: list[tuple[str, Any]] = [("limit", limit)]
        if selector:
            query.append(("labelSelector", selector))
        if continue_token:
            query.append(("continue", continue_token))
        raw = await self._t._call("GET", path, query=query)
        meta = raw.get("metadata") or {}
        return JobPage(
            items=raw.get("items") or [],
            resource_version=meta.get("resourceVersion", ""),
            continue_token=meta.get("continue") or None,
        )

    def watch(
        self, path: str, *, selector: str = "", resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        return self._t.watch_path(path, selector=selector, resource_version=resource_version)

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self._t._call("GET", path)
        except ApiRejected as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return await self._t._call("POST", path, body=dict(obj))

    async def replace(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: refused with 409 when ``metadata.resourceVersion`` is not the current one."""
        return await self._t._call("PUT", path, body=dict(obj))

    async def patch(self, path: str, patch: Any, *, json_patch: bool = False) -> dict[str, Any]:
        """A JSON merge patch (custom resources take no strategic merge), or a JSON patch.
        A merge patch that carries ``metadata.resourceVersion`` is refused with 409 when
        the object changed since."""
        return await self._t._call(
            "PATCH", path, body=patch, content_type=_JSON_PATCH if json_patch else _MERGE_PATCH
        )

    async def delete(self, path: str, *, resource_version: str | None = None) -> None:
        """Delete; a missing object is no error. With ``resource_version``, only that
        version of it (409 otherwise)."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if resource_version:
            body["preconditions"] = {"resourceVersion": resource_version}
        try:
            await self._t._call("DELETE", path, body=body)
        except ApiRejected as exc:
            if exc.status != 404:
                raise
