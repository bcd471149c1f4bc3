"""A stand-in for an internal service a ScaledJob author should not be able to read: a
TCP server on 127.0.0.1 (a thread, started by the test) that answers every connection
with an HTTP response carrying a recognisable marker — in the status line, a header that
looks like a Storage error code and the body — whatever protocol the client speaks. A
client that talks first (HTTP, Redis, AMQP, Kafka, MQTT) gets it after its first bytes;
one that waits for a greeting (NATS waits for INFO) gets it as a banner, as SSH or SMTP
servers send theirs. TCP proxies for cutting a real broker's connections live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class InternalService:
    marker: str
    status: int = 400
    port: int = 0
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    _server: socketserver.ThreadingTCPServer | None = None

    def answer(self) -> bytes:
        body = f"internal admin panel {self.marker}: db password=hunter2\n".encode()
        head = (
            f"HTTP/1.1 {self.status} {self.marker}\r\n"
            "Content-Type: text/plain\r\n"
            f"x-ms-error-code: {self.marker}\r\n"
            f"x-amzn-query-error: {self.marker}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode() + body

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> InternalService:
        service = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                service.connections += 1
                sock: socket.socket = self.request
                sock.settimeout(0.5)
                with contextlib.suppress(OSError):
                    service.received.append(sock.recv(65536))
                with contextlib.suppress(OSError):
                    sock.sendall(service.answer())
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(2)
                    while sock.recv(65536):
                        pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="internal-service", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@contextlib.contextmanager
def internal_service(marker: str, *, status: int = 400) -> Iterator[InternalService]:
    service = InternalService(marker, status=status).start()
    try:
        yield service
    finally:
        service.stop()


class Proxy:
    """A TCP proxy on 127.0.0.1 to a real broker; ``cut()`` closes every connection
    through it, so the client sees its broker drop it and reconnects."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cuts = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.cuts += 1
        self._abort()

    def _abort(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self._abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
