"""JobClient on the official (synchronous) kubernetes client.

Calls run on a dedicated thread pool sized for bursts of creates; bodies are plain dicts
and responses are parsed from raw JSON (``_preload_content=False``), which is several
times cheaper than the client's model classes. The watch stream is bridged into asyncio
here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from jobrunner.protocols import ApiRejected, JobPage, TransientError, WatchEvent, WatchExpired
from jobrunner.timestamps import now_rfc3339

logger = logging.getLogger(__name__)
T = TypeVar("T")
_POOL_SIZE = 32
_WATCH_SECONDS = 240


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """From a kubeconfig path, else in-cluster, else ~/.kube/config."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(context=context, client_configuration=configuration)
    # Room for the watch streams beside the worker threads.
    configuration.connection_pool_maxsize = _POOL_SIZE + 8
    return client.ApiClient(configuration)


def _api_error(exc: ApiException) -> Exception:
    status = exc.status or 0
    message = exc.reason or ""
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message") or message
    except (ValueError, TypeError):
        pass
    if status in (429,) or status >= 500 or status == 0:
        return TransientError(f"API server answered {status}: {message}")
    return ApiRejected(status, exc.reason or "", message)


def _raw(response: Any) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(response.data)
    return value


def _interrupt(response: Any) -> None:
    """Wake a thread blocked reading a watch response. Closing the response from here
    would wait on the reader's buffer lock; shutting the socket down makes its read
    return at once, and the thread then ends by itself."""
    if response is None:
        return
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    threading.Thread(target=response.close, name="kube-watch-close", daemon=True).start()


class KubeJobClient:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._api = api_client
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._pool = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="kube-api")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except ApiException as exc:
            raise _api_error(exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(f"API server unreachable: {exc}") from exc

    async def create_job(
        self, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> tuple[Mapping[str, Any], bool]:
        namespace = job["metadata"]["namespace"]
        name = job["metadata"]["name"]
        if secret is not None:
            try:
                await self._call(
                    self._core.create_namespaced_secret, namespace, secret, _preload_content=False
                )
            except ApiRejected as exc:
                if exc.status != 409:  # a previous attempt made it: same message, same data
                    raise
        created = True
        result: Mapping[str, Any]
        try:
            result = _raw(
                await self._call(
                    self._batch.create_namespaced_job, namespace, job, _preload_content=False
                )
            )
        except ApiRejected as exc:
            if exc.status != 409:
                raise
            created = False
            existing = await self.get_job(namespace, name)
            if existing is None:  # deleted between the conflict and the read: try again
                raise TransientError(f"Job {namespace}/{name} vanished during adoption") from exc
            result = existing
        if secret is not None:
            await self._own_secret(secret["metadata"]["name"], result)
        return result, created

    async def _own_secret(self, secret_name: str, job: Mapping[str, Any]) -> None:
        meta = job["metadata"]
        patch = {
            "metadata": {
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "blockOwnerDeletion": False,
                        "controller": False,
                    }
                ]
            }
        }
        await self._call(
            self._core.patch_namespaced_secret,
            secret_name,
            meta["namespace"],
            patch,
            _preload_content=False,
        )

    async def _read(
        self, fn: Callable[..., Any], name: str, namespace: str
    ) -> dict[str, Any] | None:
        """GET an object as raw JSON; None when it does not exist."""
        try:
            return _raw(await self._call(fn, name, namespace, _preload_content=False))
        except ApiRejected as exc:
            if exc.status == 404:
                return None
            raise

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return await self._read(self._batch.read_namespaced_job, name, namespace)

    async def annotate_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any]:
        patch = {"metadata": {"annotations": dict(annotations)}}
        return _raw(
            await self._call(
                self._batch.patch_namespaced_job, name, namespace, patch, _preload_content=False
            )
        )

    async def delete_job(self, namespace: str, name: str) -> None:
        try:
            await self._call(
                self._batch.delete_namespaced_job,
                name,
                namespace,
                propagation_policy="Background",
                _preload_content=False,
            )
        except ApiRejected as exc:
            if exc.status != 404:
                raise

    async def read_secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        raw = await self._read(self._core.read_namespaced_secret, name, namespace)
        return None if raw is None else raw.get("data") or {}

    async def record_event(
        self,
        *,
        namespace: str,
        job_name: str,
        job_uid: str | None,
        type: str,
        reason: str,
        message: str,
    ) -> None:
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{job_name}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job_name,
                "namespace": namespace,
                **({"uid": job_uid} if job_uid else {}),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "jobrunner"},
            "reportingComponent": "jobrunner.dev/dispatcher",
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(
            self._core.create_namespaced_event, namespace, event, _preload_content=False
        )

    async def list_jobs(
        self, namespace: str, selector: str, *, limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        kwargs: dict[str, Any] = {"label_selector": selector, "limit": limit}
        if continue_token:
            kwargs["_continue"] = continue_token
        raw = _raw(
            await self._call(
                self._batch.list_namespaced_job, namespace, _preload_content=False, **kwargs
            )
        )
        meta = raw.get("metadata") or {}
        return JobPage(
            items=raw.get("items") or [],
            resource_version=meta["resourceVersion"],
            continue_token=meta.get("continue") or None,
        )

    async def watch_jobs(
        self, namespace: str, selector: str, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        holder: dict[str, Any] = {}

        def put(item: WatchEvent | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                response = self._batch.list_namespaced_job(
                    namespace,
                    label_selector=selector,
                    watch=True,
                    resource_version=resource_version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=_WATCH_SECONDS,
                    _preload_content=False,
                    _request_timeout=(10, _WATCH_SECONDS + 30),
                )
                holder["response"] = response
                for line in iter_resp_lines(response):
                    if stop.is_set():
                        break
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            put(WatchExpired(obj.get("message", "410 Gone")))
                        else:
                            put(TransientError(f"watch error: {obj.get('message', obj)}"))
                        return
                    put(WatchEvent(type=event["type"], object=obj))
                put(None)
            except ApiException as exc:
                put(WatchExpired(str(exc)) if exc.status == 410 else _api_error(exc))
            except BaseException as exc:
                put(exc if stop.is_set() is False else None)

        thread = threading.Thread(target=pump, name=f"kube-watch-{namespace}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, WatchExpired | ApiRejected | TransientError):
                    raise item
                if isinstance(item, BaseException):
                    raise TransientError(f"watch stream broke: {item}") from item
                yield item
        finally:
            stop.set()
            _interrupt(holder.get("response"))

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, self._api.close)

    async def dry_run_create(self, job: Mapping[str, Any]) -> str | None:
        """Create with dryRun=All: None when the API server would accept the Job, else
        its reason."""
        try:
            await self._call(
                self._batch.create_namespaced_job,
                job["metadata"]["namespace"],
                job,
                dry_run="All",
                _preload_content=False,
            )
        except ApiRejected as exc:
            if exc.status == 409:
                return None
            return f"{exc.status} {exc.reason}: {exc.message}"
        return None
