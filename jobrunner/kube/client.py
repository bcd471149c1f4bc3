"""JobClient on the official (synchronous) kubernetes client's transport.

Requests are plain JSON over the client's ApiClient (its configuration, authentication
and connection pool), not through its generated model classes: since the 37.x line those
validate bodies client-side with pydantic and would refuse, or reshape, what the API
server itself accepts (a quantity written as a number, say), and they change between
releases. jobrunner checks Jobs against the API server's own published schema instead
(``jobschema``), and the server has the last word. Calls run on a dedicated thread pool
sized for bursts of creates; the watch stream is bridged into asyncio here and nowhere
else. urllib3's own retries are off: failures come back at once as TransientError, and
the caller retries with its backoff, logging one line per try.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

from jobrunner.core import apipath
from jobrunner.core.admission import LABEL_WORKLOAD_JOB_UID, WorkloadView
from jobrunner.core.failpoints import Failpoints
from jobrunner.core.models import FINALIZER, JobResult, TokenReview
from jobrunner.core.protocols import ApiRejected, JobPage, TransientError, WatchEvent, WatchExpired
from jobrunner.core.timestamps import now_rfc3339
from jobrunner.rendering import messagesecret
from jobrunner.tracking.results import ended_in_pod, result_of

logger = logging.getLogger(__name__)
_POOL_SIZE = 32
_WATCH_SECONDS = 240
_REQUEST_TIMEOUT = (10, 60)
_JSON = "application/json"
_MERGE_PATCH = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"
_CONFLICT_RETRIES = 10


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
    # Our callers retry with backoff and one log line per try; urllib3's own retries
    # would only add warnings and delay.
    configuration.retries = 0
    return client.ApiClient(configuration)


_CAUSE_FIELD = re.compile(r"[A-Za-z0-9_.\[\]/-]{1,200}")
_CAUSE_REASON = re.compile(r"[A-Za-z]{1,64}")


def _causes(body: Any) -> tuple[tuple[str, str], ...]:
    """(field, reason) of metav1.Status ``details.causes`` (at most 5), each kept only
    when it has the shape of a field path and a CauseType: the words that name what is
    wrong without the server's free text (which may quote what was sent)."""
    details = body.get("details") if isinstance(body, dict) else None
    causes = details.get("causes") if isinstance(details, dict) else None
    found: list[tuple[str, str]] = []
    for cause in causes if isinstance(causes, list) else []:
        if not isinstance(cause, dict):
            continue
        field, why = str(cause.get("field") or ""), str(cause.get("reason") or "")
        if _CAUSE_FIELD.fullmatch(field) and _CAUSE_REASON.fullmatch(why):
            found.append((field, why))
        if len(found) == 5:
            break
    return tuple(found)


def _rejection(status: int, reason: str, data: bytes | None) -> Exception:
    message = reason
    causes: tuple[tuple[str, str], ...] = ()
    try:
        body = json.loads(data or b"{}")
        message = body.get("message") or message
        reason = body.get("reason") or reason
        causes = _causes(body)
    except (ValueError, TypeError, AttributeError):
        pass
    if status == 429 or status >= 500 or status == 0:
        return TransientError(f"API server answered {status}: {message}")
    return ApiRejected(status, reason, message, causes=causes)


def _unreachable(host: str, exc: BaseException) -> TransientError:
    """One short line for a failure to reach the API server (urllib3's own text runs to
    hundreds of characters)."""
    reason: BaseException | None = getattr(exc, "reason", None) or exc
    text = str(reason)
    for known in ("Connection refused", "timed out", "Name or service not known", "reset"):
        if known.lower() in text.lower():
            text = known.lower()
            break
    else:
        text = text.split(": ", 1)[-1][:120]
    return TransientError(f"API server {host} unreachable ({text})")


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], item: Any) -> bool:
    """Hand ``item`` from a stream's thread to its reader on ``loop``; False once that loop
    is closed (the process is shutting down and the reader is gone), and the thread then
    ends quietly: ``call_soon_threadsafe`` on a closed loop raises RuntimeError, which
    would end the thread with a traceback on stderr ("Event loop is closed")."""
    if loop.is_closed():
        return False
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # closed between the check and the call
        return False
    return True


def _relay_events(
    response: Any,
    *,
    stop: threading.Event,
    put: Callable[[WatchEvent | BaseException | None], bool],
) -> bool:
    """``put`` each event of a watch response until it ends or ``stop`` is set: True
    then; False when the stream ended otherwise (an ERROR event, put as WatchExpired on
    410 Gone, else TransientError) or nobody reads any more."""
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
            return False
        if not put(WatchEvent(type=event["type"], object=obj)):
            return False  # nobody reads any more
    return True


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
    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        failpoints: Failpoints | None = None,
        read_message_secrets: bool = True,
    ) -> None:
        """``read_message_secrets`` False: this client may not ``get`` message Secrets (the
        chart's ``permissions.operator.restrict.secret``), so it makes them blind: see
        ``create_job``."""
        self._api = api_client
        self._failpoints = failpoints or Failpoints()
        self._read_secrets = read_message_secrets
        self._host = urllib.parse.urlsplit(api_client.configuration.host).netloc
        self._pool = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="kube-api")
        self.requests: dict[str, int] = {}
        """Requests sent, by verb (a watch counts as WATCH): what a process costs the API
        server (the operator reports it as a metric)."""

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str = _JSON,
        timeout: Any = _REQUEST_TIMEOUT,
        accept: str = _JSON,
    ) -> Any:
        """One request; the urllib3 response, unread, when its status is 2xx."""
        apipath.check_path(path)  # the last guard: a path no builder escaped is never sent
        verb = "WATCH" if ("watch", "true") in (query or []) else method
        self.requests[verb] = self.requests.get(verb, 0) + 1
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self._api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(method, url, headers, body, _request_timeout=timeout)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unreachable(self._host, exc) from exc
        if not 200 <= response.status <= 299:
            response.read()
            raise _rejection(response.status, response.reason or "", response.data)
        return response.response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, path, **kwargs)
        try:
            data = response.data
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unreachable(self._host, exc) from exc
        value: dict[str, Any] = json.loads(data)
        return value

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self._json(method, path, **kwargs))

    async def create_job(
        self, job: Mapping[str, Any], secret: Mapping[str, Any] | None
    ) -> tuple[Mapping[str, Any], bool]:
        """The Job first, then its message Secret owned by it (see ``messagesecret``).

        Requests: a new Job costs a GET of the Secret (404), the Job's POST and the
        Secret's POST; a redelivery adopting its Job, the two GETs. The GET first is what
        keeps a Secret that is already there from being mounted by a Job just created:
        the pod would read whatever Secret has the name by the time the kubelet mounts
        it. Raises ApiRejected for a refusal, after removing a Job whose Secret was
        refused (a message is never left with a Job that waits for a Secret that will
        not come); TransientError when it is worth trying again, which then completes
        what this call began (the Job exists: its Secret is made then).

        Without the right to read message Secrets (``read_message_secrets`` False) the
        Secret is made blind: no GET first, and a Secret of the name already there cannot
        be checked. For a Job just made, such a Secret is refused (the Job removed, the
        message dead-lettered ``MessageSecretConflict`` saying so), since the pod might
        mount a body that is not its message's; for a Job adopted, it is taken to be the
        one an earlier attempt made for it (only someone allowed to create Secrets in the
        namespace could have put another there between the two creates)."""
        namespace = job["metadata"]["namespace"]
        name = job["metadata"]["name"]
        if secret is None:
            return await self._create_or_adopt(job)
        if not self._read_secrets:
            return await self._create_blind(job, secret)
        secret_path = _secret(namespace, secret["metadata"]["name"])
        digest = messagesecret.job_digest(job)
        found = await self._read(secret_path)
        live: Mapping[str, Any] | None = None
        if found is not None:
            live = await self.get_job(namespace, name)
            if live is None:
                check = messagesecret.check_existing(
                    found, job_name=name, job_uid=None, digest=digest
                )
                self._before_job(check)
        if live is not None:
            return await self._complete(live, job, secret, found=found), False
        result, created = await self._create_or_adopt(job)
        if not created:
            return await self._complete(result, job, secret, found=None), False
        self._failpoints.hit("between-job-and-secret")
        if found is None:
            await self._create_secret(result, secret)
        return result, True

    async def _create_blind(
        self, job: Mapping[str, Any], secret: Mapping[str, Any]
    ) -> tuple[Mapping[str, Any], bool]:
        """``create_job`` without reading Secrets (see there)."""
        result, created = await self._create_or_adopt(job)
        meta = result.get("metadata") or {}
        if not created and (
            messagesecret.job_digest(result) != messagesecret.job_digest(job)
            or meta.get("deletionTimestamp")
        ):
            return result, False  # refused or settled by the dispatcher, as in _complete
        if created:
            self._failpoints.hit("between-job-and-secret")
        if not await self._post_secret(result, secret) and created:
            why = (
                f"Secret {meta['namespace']}/{secret['metadata']['name']} exists already "
                "and this dispatcher may not read it to check whose body it holds "
                "(permissions.operator.restrict.secret); delete it, then publish the "
                "message again"
            )
            await self._discard(result, why)
            raise ApiRejected(409, messagesecret.CONFLICT_REASON, why)
        return result, created

    @staticmethod
    def _before_job(check: messagesecret.Check) -> None:
        """A Secret of the name exists and its Job does not: create the Job only when the
        Secret holds exactly this body (no Job is made that would mount another)."""
        if check.verdict is messagesecret.Verdict.REFUSE:
            raise messagesecret.conflict(check)
        if check.verdict is messagesecret.Verdict.WAIT:
            raise TransientError(check.why)
        if check.why:
            logger.warning("%s", check.why)

    async def _create_or_adopt(self, job: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
        namespace = job["metadata"]["namespace"]
        name = job["metadata"]["name"]
        try:
            return await self._call("POST", _jobs(namespace), body=dict(job)), True
        except ApiRejected as exc:
            if exc.status != 409:
                raise
            existing = await self.get_job(namespace, name)
            if existing is None:  # deleted between the conflict and the read: try again
                raise TransientError(f"Job {namespace}/{name} vanished during adoption") from exc
            return existing, False

    async def _complete(
        self,
        live: Mapping[str, Any],
        job: Mapping[str, Any],
        secret: Mapping[str, Any],
        *,
        found: Mapping[str, Any] | None,
    ) -> Mapping[str, Any]:
        """An existing Job adopted: make its Secret when an earlier create stopped between
        the two (a crash), check the one it has otherwise. A Job made for another body
        (the dispatcher refuses it, ``MessageIdReused``) or being deleted (settled as
        ``JobDeleted``) is returned as it is: no Secret is made for it."""
        meta = live.get("metadata") or {}
        if messagesecret.job_digest(live) != messagesecret.job_digest(job):
            return live
        if meta.get("deletionTimestamp"):
            return live
        if found is None:
            found = await self._read(_secret(meta["namespace"], secret["metadata"]["name"]))
        check = messagesecret.check_existing(
            found,
            job_name=meta["name"],
            job_uid=meta.get("uid"),
            digest=messagesecret.job_digest(job),
        )
        if check.verdict is messagesecret.Verdict.CREATE:
            await self._create_secret(live, secret)
        elif check.verdict is messagesecret.Verdict.WAIT:
            raise TransientError(check.why)
        elif check.verdict is messagesecret.Verdict.REFUSE:
            # The Job may be running with a body that is not its message's: it goes.
            await self._discard(live, check.why)
            raise messagesecret.conflict(check)
        elif check.why:
            logger.warning("%s", check.why)
        return live

    async def _create_secret(self, job: Mapping[str, Any], secret: Mapping[str, Any]) -> None:
        """Create ``secret`` owned by ``job``. A refusal removes the Job (its pod would
        wait for the Secret for ever) and is raised; a Secret of the name that appeared
        meanwhile is checked as ``_complete`` checks one."""
        meta = job["metadata"]
        namespace = meta["namespace"]
        if await self._post_secret(job, secret):
            return
        found = await self._read(_secret(namespace, secret["metadata"]["name"]))
        check = messagesecret.check_existing(
            found,
            job_name=meta["name"],
            job_uid=meta.get("uid"),
            digest=messagesecret.job_digest(job),
        )
        if check.verdict is messagesecret.Verdict.USE:
            if check.why:
                logger.warning("%s", check.why)
            return
        if check.verdict is messagesecret.Verdict.CREATE:  # gone again: the next try makes it
            raise TransientError(f"Secret {namespace}/{secret['metadata']['name']} vanished")
        await self._discard(job, check.why)
        if check.verdict is messagesecret.Verdict.WAIT:
            raise TransientError(check.why)
        raise messagesecret.conflict(check)

    async def _post_secret(self, job: Mapping[str, Any], secret: Mapping[str, Any]) -> bool:
        """POST ``secret`` owned by ``job``: True when made, False when one of the name is
        there (409). Any other refusal removes the Job (its pod would wait for the Secret
        for ever) and is raised, saying so."""
        namespace = job["metadata"]["namespace"]
        try:
            await self._call("POST", _secrets(namespace), body=messagesecret.owned_by(secret, job))
        except ApiRejected as exc:
            if exc.status == 409:
                return False
            await self._discard(job, f"its message Secret was refused: {exc}")
            raise ApiRejected(
                exc.status,
                exc.reason,
                f"the Job's message Secret was refused, so the Job was removed: {exc.message}",
            ) from exc
        return True

    async def _discard(self, job: Mapping[str, Any], why: str) -> None:
        """Remove a Job made for a message that is then refused: delete it (background:
        its pods go too), then take jobrunner's finalizer off so the deletion finishes. A
        crash between the two leaves a Job being deleted, which the message's redelivery
        settles as ``JobDeleted``."""
        meta = job["metadata"]
        logger.warning("removing Job %s/%s: %s", meta["namespace"], meta["name"], why)
        try:
            await self.delete_job(meta["namespace"], meta["name"])
            await self.release_job(meta["namespace"], meta["name"], {})
        except ApiRejected as exc:  # no right to: say so; the refusal is what is raised
            logger.error(
                "could not remove Job %s/%s (%s): delete it by hand",
                meta["namespace"],
                meta["name"],
                exc,
            )

    async def _read(self, path: str) -> dict[str, Any] | None:
        """GET an object as raw JSON; None when it does not exist."""
        try:
            return await self._call("GET", path)
        except ApiRejected as exc:
            if exc.status == 404:
                return None
            raise

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return await self._read(_job(namespace, name))

    async def annotate_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any]:
        patch = {"metadata": {"annotations": dict(annotations)}}
        return await self._call(
            "PATCH", _job(namespace, name), body=patch, content_type=_MERGE_PATCH
        )

    async def delete_job(self, namespace: str, name: str) -> None:
        try:
            await self._call(
                "DELETE",
                _job(namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
            )
        except ApiRejected as exc:
            if exc.status != 404:
                raise

    async def release_job(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> Mapping[str, Any] | None:
        path = _job(namespace, name)
        # The usual case in one request: the Job carries our finalizer alone (the test op
        # makes the patch fail, 422, otherwise) and has annotations (jobrunner set some).
        fast = [
            {"op": "test", "path": "/metadata/finalizers", "value": [FINALIZER]},
            {"op": "replace", "path": "/metadata/finalizers", "value": []},
            *(
                {"op": "add", "path": f"/metadata/annotations/{_pointer(k)}", "value": v}
                for k, v in annotations.items()
            ),
        ]
        try:
            return await self._call("PATCH", path, body=fast, content_type=_JSON_PATCH)
        except ApiRejected as exc:
            if exc.status == 404:
                return None
            if exc.status not in (409, 422):
                raise
        for _ in range(_CONFLICT_RETRIES):
            job = await self._read(path)
            if job is None:
                return None
            meta = job["metadata"]
            finalizers = meta.get("finalizers") or []
            current = meta.get("annotations") or {}
            if FINALIZER not in finalizers and all(
                current.get(k) == v for k, v in annotations.items()
            ):
                return job
            patch = {
                "metadata": {
                    # The precondition makes the write fail (409) if anyone changed the
                    # Job since the read, instead of overwriting their finalizers.
                    "resourceVersion": meta["resourceVersion"],
                    "finalizers": [f for f in finalizers if f != FINALIZER],
                    "annotations": dict(annotations),
                }
            }
            try:
                return await self._call("PATCH", path, body=patch, content_type=_MERGE_PATCH)
            except ApiRejected as exc:
                if exc.status == 404:
                    return None
                if exc.status != 409:
                    raise
        raise TransientError(
            f"Job {namespace}/{name} kept changing while its finalizer was removed"
        )

    async def list_guarded_jobs(self, selector: str) -> list[Mapping[str, Any]]:
        """Jobs matching ``selector`` in every namespace (one paged cluster-wide list)."""
        items: list[Mapping[str, Any]] = []
        token: str | None = None
        while True:
            query: list[tuple[str, Any]] = [("labelSelector", selector), ("limit", 500)]
            if token:
                query.append(("continue", token))
            raw = await self._call("GET", "/apis/batch/v1/jobs", query=query)
            items += [
                j
                for j in raw.get("items") or []
                if FINALIZER in ((j.get("metadata") or {}).get("finalizers") or [])
            ]
            token = (raw.get("metadata") or {}).get("continue") or None
            if not token:
                return items

    async def read_secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        raw = await self._read(_secret(namespace, name))
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
        await self._call("POST", _core(namespace, "events"), body=event)

    async def list_jobs(
        self, namespace: str, selector: str, *, limit: int = 500, continue_token: str | None = None
    ) -> JobPage:
        query: list[tuple[str, Any]] = [("labelSelector", selector), ("limit", limit)]
        if continue_token:
            query.append(("continue", continue_token))
        raw = await self._call("GET", _jobs(namespace), query=query)
        meta = raw.get("metadata") or {}
        return JobPage(
            items=raw.get("items") or [],
            resource_version=meta["resourceVersion"],
            continue_token=meta.get("continue") or None,
        )

    def watch_jobs(
        self, namespace: str, selector: str, resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        return self.watch_path(
            _jobs(namespace), selector=selector, resource_version=resource_version
        )

    async def watch_path(
        self, path: str, *, selector: str = "", resource_version: str
    ) -> AsyncIterator[WatchEvent]:
        """Watch the collection at ``path`` from ``resource_version``: the one bridge
        from the client's blocking stream into asyncio (a thread per watch). Raises
        WatchExpired on 410 Gone; ends when the server closes the watch."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        holder: dict[str, Any] = {}

        def put(item: WatchEvent | BaseException | None) -> bool:
            return _deliver(loop, queue, item)

        def pump() -> None:
            self._pump_watch(
                path,
                selector=selector,
                resource_version=resource_version,
                put=put,
                stop=stop,
                holder=holder,
            )

        name = path.rsplit("/", 3)
        thread = threading.Thread(
            target=pump, name=f"kube-watch-{'-'.join(name[-3:])}", daemon=True
        )
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

    def _pump_watch(
        self,
        path: str,
        *,
        selector: str,
        resource_version: str,
        put: Callable[[WatchEvent | BaseException | None], bool],
        stop: threading.Event,
        holder: dict[str, Any],
    ) -> None:
        """The watch's thread: open the stream (its response kept in ``holder``, so that
        the reader can interrupt it) and ``put`` each event, then None at its end, or
        what ended it."""
        try:
            query: list[tuple[str, Any]] = [
                ("watch", "true"),
                ("resourceVersion", resource_version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", _WATCH_SECONDS),
            ]
            if selector:
                query.insert(0, ("labelSelector", selector))
            response = self._send("GET", path, query=query, timeout=(10, _WATCH_SECONDS + 30))
            holder["response"] = response
            if _relay_events(response, stop=stop, put=put):
                put(None)
        except ApiRejected as exc:
            put(WatchExpired(str(exc)) if exc.status == 410 else exc)
        except BaseException as exc:
            put(exc if stop.is_set() is False else None)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, self._api.close)

    # ------------------------------------------------------------------ pods (for `logs`)
    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The pods matching ``selector`` (a Job's: ``job-name=<job>``), oldest first."""
        raw = await self._call("GET", _core(namespace, "pods"), query=[("labelSelector", selector)])
        pods: list[dict[str, Any]] = raw.get("items") or []
        pods.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        return pods

    async def pod_log(
        self, namespace: str, pod: str, container: str, *, tail_lines: int | None = None
    ) -> str:
        """A container's log as the kubelet keeps it; ApiRejected when it has none (a
        container not started yet, a pod whose node has no kubelet to ask)."""
        path = _pod_log(namespace, pod)

        def read() -> str:
            response = self._send(
                "GET",
                path,
                query=[("container", container)]
                + ([("tailLines", tail_lines)] if tail_lines is not None else []),
                accept="*/*",
            )
            try:
                data: bytes = response.data
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise _unreachable(self._host, exc) from exc
            return data.decode("utf-8", errors="replace")

        return await asyncio.get_running_loop().run_in_executor(self._pool, read)

    async def follow_pod_log(self, namespace: str, pod: str, container: str) -> AsyncIterator[str]:
        """A container's log from its start, then as it is written, until the container
        ends (``kubectl logs -f``)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        holder: dict[str, Any] = {}
        stop = threading.Event()
        path = _pod_log(namespace, pod)

        def pump() -> None:
            try:
                response = self._send(
                    "GET",
                    path,
                    query=[("container", container), ("follow", "true")],
                    accept="*/*",
                    timeout=(10, None),
                )
                holder["response"] = response
                for chunk in response.stream(4096, decode_content=True):
                    if stop.is_set():
                        break
                    if not _deliver(loop, queue, chunk.decode("utf-8", errors="replace")):
                        return
                _deliver(loop, queue, None)
            except BaseException as exc:
                _deliver(loop, queue, None if stop.is_set() else exc)

        threading.Thread(target=pump, name=f"kube-log-{pod}", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            _interrupt(holder.get("response"))

    async def failure_detail(self, namespace: str, name: str) -> str:
        """The last attempt of a failed Job, as its pod tells it: each container that
        exited non-zero (code and reason), and the last lines of its log when the node
        serves it; "" when nothing can be read (no pod left, no permission)."""
        try:
            pods = await self.list_pods(namespace, f"job-name={name}")
        except (ApiRejected, TransientError):
            return ""
        if not pods:
            return ""
        # The API lists pods by name, and a Job's pod names end in a random suffix: the
        # last attempt is the newest (a retry waits its backoff, 10 s and more, so two
        # attempts never share a second of creationTimestamp; RFC 3339 sorts as text).
        pod = max(
            pods,
            key=lambda p: (
                str((p.get("metadata") or {}).get("creationTimestamp") or ""),
                str((p.get("metadata") or {}).get("name") or ""),
            ),
        )
        pod_name = (pod.get("metadata") or {}).get("name", "")
        status = pod.get("status") or {}
        failed = []
        for item in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            ended = (item.get("state") or {}).get("terminated") or {}
            if ended.get("exitCode"):
                reason = ended.get("reason") or "Error"
                failed.append((item.get("name", ""), f"exited {ended['exitCode']} ({reason})"))
        if not failed:
            return ""
        text = f"attempt {len(pods)} (pod {pod_name}): " + ", ".join(
            f"{c} {what}" for c, what in failed
        )
        container = failed[-1][0]
        try:
            log = await self.pod_log(namespace, pod_name, container, tail_lines=3)
        except (ApiRejected, TransientError):
            return text
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        if lines:
            tail = " | ".join(lines)
            text += f"; last lines of {container}: {tail[-600:]}"
        return text

    async def job_result(self, namespace: str, name: str) -> JobResult | None:
        """The finished Job's result (``ReadsResults``): its condition, and the exit code
        and termination message (``state.terminated.message``: what the container wrote
        to its ``terminationMessagePath``, at most 4096 bytes as the kubelet keeps it) of
        its last pod, the newest by creationTimestamp as in ``failure_detail``. A pod that
        is gone or cannot be read leaves exit code and payload empty."""
        job = await self.get_job(namespace, name)
        if job is None or result_of(job) is None:
            return None
        try:
            pods = await self.list_pods(namespace, f"job-name={name}")
        except (ApiRejected, TransientError):
            pods = []
        if not pods:
            return result_of(job)
        pod = max(
            pods,
            key=lambda p: (
                str((p.get("metadata") or {}).get("creationTimestamp") or ""),
                str((p.get("metadata") or {}).get("name") or ""),
            ),
        )
        return result_of(job, ended_in_pod(pod))

    async def review_token(self, token: str, *, audiences: tuple[str, ...] = ()) -> TokenReview:
        """A TokenReview of ``token`` (authentication.k8s.io/v1; needs ``create`` on
        ``tokenreviews``, as the chart's ClusterRole grants). Only the verdict and the
        user name are kept; the token is neither logged nor returned."""
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = list(audiences)
        answer = await self._call(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec},
        )
        status = answer.get("status") or {}
        user = status.get("user") or {}
        if not status.get("authenticated"):
            return TokenReview(authenticated=False)
        granted = status.get("audiences") or ()
        if audiences and not set(audiences) & set(granted):
            # The API's contract: a reviewer that asks for audiences must find one of them
            # in status.audiences, else the authenticator was not audience-aware (a
            # webhook) and vouched for the token only for the API server itself.
            return TokenReview(authenticated=False)
        return TokenReview(
            authenticated=True,
            username=str(user.get("username", "")),
            groups=tuple(str(g) for g in user.get("groups") or ()),
        )

    async def workload_of(self, namespace: str, job_uid: str) -> WorkloadView | None:
        """The Kueue Workload of the Job of uid ``job_uid``: a list by Kueue's label
        ``kueue.x-k8s.io/job-uid`` in ``namespace`` (needs ``list`` on
        ``workloads.kueue.x-k8s.io``; the chart grants it). kueue.x-k8s.io/v1beta2 (Kueue
        0.15 and later), else v1beta1 for older Kueue; None when neither is served or the
        Workload is not made yet. ValueError for a uid that is not one."""
        if not _UID.fullmatch(job_uid):
            raise ValueError(f"not a Kubernetes uid: {job_uid[:64]!r}")
        query = [("labelSelector", f"{LABEL_WORKLOAD_JOB_UID}={job_uid}"), ("limit", "2")]
        ns = apipath.namespace(namespace)
        for version in ("v1beta2", "v1beta1"):
            path = f"/apis/kueue.x-k8s.io/{version}/namespaces/{ns}/workloads"
            try:
                answer = await self._call("GET", path, query=query)
            except ApiRejected as exc:
                if exc.status == 404:
                    continue  # this version (or Kueue) is not served
                raise
            # Only a Workload the Job controls (its owner reference, as Kueue makes it):
            # another object labelled with the Job's uid decides nothing; two: none.
            views = [WorkloadView.from_object(w) for w in answer.get("items") or []]
            owned = [v for v in views if v.owner_uid == job_uid]
            return owned[0] if len(owned) == 1 else None
        return None

    async def dry_run_create(self, job: Mapping[str, Any]) -> str | None:
        """Create with ``dryRun=All`` and strict field validation (unknown or duplicate
        fields are errors, not warnings): None when the API server would accept the Job,
        else its reason."""
        try:
            await self._call(
                "POST",
                _jobs(job["metadata"]["namespace"]),
                query=[("dryRun", "All"), ("fieldValidation", "Strict")],
                body=dict(job),
            )
        except ApiRejected as exc:
            if exc.status == 409:
                return None
            return f"{exc.status} {exc.reason}: {exc.message}"
        return None


def _pointer(key: str) -> str:
    """``key`` as a JSON Pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


_UID = re.compile(r"[0-9a-fA-F-]{1,64}")
"""A Kubernetes uid (a UUID): only these characters reach a label selector."""


def _jobs(namespace: str) -> str:
    return f"/apis/batch/v1/namespaces/{apipath.namespace(namespace)}/jobs"


def _job(namespace: str, name: str) -> str:
    return f"{_jobs(namespace)}/{apipath.name(name, field='Job name')}"


def _core(namespace: str, plural: str) -> str:
    """A core (``/api/v1``) collection of ``namespace``: secrets, pods, events."""
    return f"/api/v1/namespaces/{apipath.namespace(namespace)}/{plural}"


def _secrets(namespace: str) -> str:
    return _core(namespace, "secrets")


def _secret(namespace: str, name: str) -> str:
    return f"{_secrets(namespace)}/{apipath.name(name, field='Secret name')}"


def _pod_log(namespace: str, pod: str) -> str:
    return f"{_core(namespace, 'pods')}/{apipath.name(pod, field='Pod name')}/log"
