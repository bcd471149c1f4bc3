"""A local copy of one collection, kept current: list, then watch from the list's
resourceVersion; on 410 Gone list again; on any other break reconnect with backoff and
list again (events may have been missed). The loop the Job tracker runs, for any kind.

``on_change`` is called after every change to the store (and once after each listing);
it must not block. ``synced`` is set while the store matches the server as of its last
listing plus the events since.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from jobrunner.core.protocols import ApiRejected, TransientError, WatchExpired
from jobrunner.operator.api import ObjectClient

logger = logging.getLogger(__name__)

StoreKey = tuple[str, str]
"""(namespace, name); namespace "" for cluster-scoped objects."""


def key_of(obj: dict[str, Any]) -> StoreKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class Informer:
    def __init__(
        self,
        api: ObjectClient,
        path: str,
        *,
        selector: str = "",
        on_change: Callable[[], None] = lambda: None,
        what: str = "",
        forbidden: str = "",
        backoff_ceiling: float = 30.0,
    ) -> None:
        """``forbidden``: what to say on a 403 (which Role or binding is missing), instead
        of the generic advice to check the chart's RBAC."""
        self._api = api
        self._forbidden = forbidden
        self.path = path
        self.selector = selector
        self._on_change = on_change
        self.what = what or path
        self.store: dict[StoreKey, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.problem: str | None = "not listed yet"
        self._ceiling = backoff_ceiling

    async def _list(self) -> str:
        seen: dict[StoreKey, dict[str, Any]] = {}
        token: str | None = None
        version = ""
        while True:
            page = await self._api.list(self.path, selector=self.selector, continue_token=token)
            version = version or page.resource_version
            for item in page.items:
                obj = dict(item)
                seen[key_of(obj)] = obj
            token = page.continue_token
            if not token:
                break
        self.store = seen
        return version

    def _hint(self, exc: Exception) -> str:
        """What to do about a refusal that no retry will cure (it is retried anyway: a
        CRD or a RoleBinding may be applied while the operator waits)."""
        if not isinstance(exc, ApiRejected):
            return ""
        if exc.status == 404 and self.path.startswith("/apis/"):
            group = self.path.split("/")[2]
            if group == "keda.sh":
                return "; KEDA's CRDs are not installed: --keda-takeover needs them"
            # Said so that it works from any directory (a relative crds/ did not).
            return (
                f"; the {group} CRDs are not installed: `helm show crds CHART | kubectl apply "
                "-f -` (CHART: the jobrunner chart installed from; helm install does it), or "
                "`kubectl apply -f deploy/crds/` in jobrunner's source tree"
            )
        if exc.status == 403:
            return self._forbidden or (
                "; this identity may not list and watch them: check the chart's RBAC"
            )
        if exc.status == 400 and self.selector:
            return f"; is the label selector {self.selector!r} right?"
        return ""

    async def run(self) -> None:
        """List and watch until cancelled."""
        version: str | None = None
        delay = 0.0
        while True:
            try:
                if version is None:
                    version = await self._list()
                    self.synced.set()
                    self.problem = None
                    self._on_change()
                async for event in self._api.watch(
                    self.path, selector=self.selector, resource_version=version
                ):
                    delay = 0.0
                    obj = dict(event.object)
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event.type == "BOOKMARK":
                        continue
                    if event.type == "DELETED":
                        self.store.pop(key_of(obj), None)
                    else:
                        self.store[key_of(obj)] = obj
                    self._on_change()
            except WatchExpired:
                logger.info("watch on %s expired (410 Gone); listing again", self.what)
                version = None
            except (TransientError, ApiRejected) as exc:
                self.synced.clear()
                hint = self._hint(exc)
                self.problem = f"{self.what}: {exc}{hint}"
                delay = min(self._ceiling, max(0.2, delay * 2))
                pause = delay * (0.5 + random.random() / 2)
                logger.warning(
                    "watch on %s broke (%s%s); listing again in %.1fs",
                    self.what,
                    exc,
                    hint,
                    pause,
                )
                await asyncio.sleep(pause)
                version = None
