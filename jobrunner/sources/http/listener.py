"""One aiohttp server per listen address, shared by every HTTP trigger of the process
(the operator serves all its ScaledJobs on one Service): each trigger owns one path;
``<path>/<quoted event id>`` is the status of one of its events.

The server's bounds: request lines and header fields of at most 8190 bytes, 128
headers (aiohttp's parser); a connection that completes no request within
``KEEPALIVE_SECONDS`` is closed (aiohttp arms the keep-alive timer when a connection
opens), so a client that trickles its headers cannot hold a connection; bodies are
read by each route under its own size and time bounds.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Protocol

from aiohttp import web

from jobrunner.core.protocols import SourceError

KEEPALIVE_SECONDS = 15.0
"""An idle (or never completed) connection is closed after this long."""


class Route(Protocol):
    """What a listener needs of the trigger that owns a path."""

    scaledjob: str
    namespace: str

    async def post(self, request: web.BaseRequest) -> web.StreamResponse: ...

    async def get(self, request: web.BaseRequest, identity: str) -> web.StreamResponse: ...


class Listener:
    """One HTTP server on one address, serving the paths of every HTTP source of the
    process that listens there."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.routes: dict[str, Route] = {}
        self._runner: web.ServerRunner | None = None
        self.port: int | None = None
        """The port bound (the given one, or the one the system picked for port 0)."""

    async def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        server = web.Server(
            self._handle,
            handler_cancellation=False,
            access_log=None,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        # In-flight handlers are answered before a listener stops (HttpSource.close).
        runner = web.ServerRunner(server, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port), reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SourceError(
                f"cannot listen on {self.address} for the HTTP trigger ({exc.strerror}): "
                "free the port, or choose another: metadata.listenAddress in file mode, "
                "JOBRUNNER_HTTP__LISTEN_ADDRESS for the operator"
            ) from None
        self._runner = runner
        bound = runner.addresses
        self.port = int(bound[0][1]) if bound else int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = urllib.parse.unquote(request.raw_path.split("?", 1)[0])
        raw = request.raw_path.split("?", 1)[0]
        source = self.routes.get(path.rstrip("/") or "/")
        if source is not None:
            if request.method != "POST":
                return answer(405, "MethodNotAllowed", "POST events here", allow="POST")
            return await source.post(request)
        prefix, _, quoted = raw.rstrip("/").rpartition("/")
        source = self.routes.get(urllib.parse.unquote(prefix) or "/")
        if source is not None and quoted:
            if request.method not in ("GET", "HEAD"):
                return answer(405, "MethodNotAllowed", "GET an event's status", allow="GET")
            return await source.get(request, urllib.parse.unquote(quoted))
        return answer(404, "NotFound", "no HTTP trigger serves this path")


def _nested(one: str, other: str) -> bool:
    """Whether ``one`` and ``other`` differ and one lies inside the other by segments."""
    a, b = one.rstrip("/") + "/", other.rstrip("/") + "/"
    return a != b and (a.startswith(b) or b.startswith(a))


class Listeners:
    """The process's listeners, by address; each stops when its last path goes."""

    def __init__(self) -> None:
        self._by_address: dict[str, Listener] = {}
        self._lock = asyncio.Lock()

    async def add(self, address: str, path: str, source: Route) -> Listener:
        async with self._lock:
            listener = self._by_address.get(address)
            if listener is None:
                listener = Listener(address)
                await listener.start()
                self._by_address[address] = listener
            holder = listener.routes.get(path)
            # A new dispatcher of the same ScaledJob (a spec change, a reload) takes
            # the path over at once, so no POST finds it unserved between the two; the
            # old one's ``remove`` then leaves it alone. Another ScaledJob may not.
            same = holder is not None and (holder.namespace, holder.scaledjob) == (
                source.namespace,
                source.scaledjob,
            )
            if holder is not None and not same:
                raise SourceError(
                    f"path {path} on {address} is already served by ScaledJob "
                    f"{holder.namespace}/{holder.scaledjob}: give this ScaledJob another "
                    "metadata.path"
                )
            nested = next((p for p in listener.routes if _nested(p, path)), None)
            if nested is not None and not same:
                # GET <path>/<id> must name one trigger: /a's event b and /a/b collide.
                raise SourceError(
                    f"path {path} on {address} nests with {nested}, served by ScaledJob "
                    f"{listener.routes[nested].namespace}/{listener.routes[nested].scaledjob}: "
                    "an event's status is read at <path>/<id>, so give paths that are not "
                    "inside one another"
                )
            listener.routes[path] = source
            return listener

    async def remove(self, address: str, path: str, source: Route) -> None:
        async with self._lock:
            listener = self._by_address.get(address)
            if listener is None or listener.routes.get(path) is not source:
                return
            del listener.routes[path]
            if not listener.routes:
                del self._by_address[address]
                await listener.stop()


LISTENERS = Listeners()
"""This process's listeners (one per address, shared by its HTTP triggers)."""


def answer(status: int, reason: str, text: str, **headers: str) -> web.Response:
    names = {"retry_after": "Retry-After", "allow": "Allow", "location": "Location"}
    extra = {names.get(k, k): v for k, v in headers.items()}
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return web.json_response(
        {"status": status, "reason": reason, "message": text}, status=status, headers=extra
    )
