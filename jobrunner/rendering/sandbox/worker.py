"""A render worker: a process that renders Job templates for the dispatcher, one message
at a time, under the limits it was started with (see ``pool``, which starts it as
``python -I -c ...`` with the limits as arguments, an empty environment, and pipes).

Its bounds, each enforced by the kernel or by the worker's own clock:

* memory: ``RLIMIT_AS`` set before the first message, so an allocation past it fails
  with MemoryError (answered as a TemplateError naming the limit); its
  ``oom_score_adj`` is raised to the most, so if the pod's cgroup runs out of memory
  anyway the kernel kills a worker, never the dispatcher;
* time: ``ITIMER_REAL`` raises ``Deadline`` into the render when its time is up (it
  interrupts Python code; a single long C call, such as building one huge string, is
  cut short by the pool, which kills the worker a little later);
* output: counted while it streams (``templates.Strings.render``);
* CPU: it runs at nice ``NICE``, so a render spinning to its time limit yields the CPU
  to the dispatcher's event loop.

The protocol, on stdin and stdout, each frame a 4-byte big-endian length then its bytes:
the worker first sends ``{"ready": pid}``; then for each message it reads a JSON header
(``key``, ``templates`` [[source, escaped], ...], ``context``: the message's fields
without the body, ``scaledjob``, ``job``) and a frame with the body, and answers
``{"values": [...]}`` or ``{"failure": [index, reason, detail]}``. The header carries
the templates every time; the worker keeps the last ``CACHE_SIZE`` compiled, by key.

Standard library, jinja2 and ``jobrunner.rendering.sandbox.templates`` only (see the package).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import sys
from collections import OrderedDict
from collections.abc import Mapping
from types import FrameType
from typing import IO, Any

from jobrunner.rendering.sandbox.templates import (
    Deadline,
    MessageView,
    RenderLimits,
    StringFailure,
    Strings,
)

CACHE_SIZE = 64
"""Compiled templates kept per worker (one entry per ScaledJob template version)."""
HEADER = struct.Struct(">I")
NICE = 10
"""A worker runs at a lower CPU priority than the dispatcher: a render that spins to its
time limit takes CPU the event loop (Lease renewals, Job watches) does not want."""


def context_of(data: Mapping[str, Any], body: bytes) -> dict[str, Any]:
    """What a template sees, from the fields the dispatcher sends (``Renderer`` builds
    the same in-process)."""
    return {
        "message": MessageView(body=body, **data["message"]),
        "scaledjob": dict(data["scaledjob"]),
        "job": dict(data["job"]),
    }


def read_frame(stream: IO[bytes]) -> bytes | None:
    """One frame; None at end of input (the dispatcher closed the pipe or exited)."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def write_frame(stream: IO[bytes], data: bytes) -> None:
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def encode(reply: Mapping[str, Any]) -> bytes:
    # surrogatepass: a header decoded with surrogateescape may reach the output.
    return json.dumps(reply, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _deadline(signum: int, frame: FrameType | None) -> None:
    raise Deadline()


def _confine(limits: RenderLimits) -> None:
    """The kernel's bounds on this process (see the module docstring)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("1000")
    except OSError:
        pass  # not Linux, or /proc read-only: the memory limit below still holds
    os.nice(NICE)
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    signal.signal(signal.SIGALRM, _deadline)


class Worker:
    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self._cache: OrderedDict[str, Strings] = OrderedDict()

    def strings(self, key: str, templates: list[list[Any]]) -> Strings:
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        made = Strings([(str(s), bool(e)) for s, e in templates], limits=self.limits)
        self._cache[key] = made
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return made

    def handle(self, header: bytes, body: bytes) -> dict[str, Any]:
        """One message's strings, or why not. Time runs from here (compiling a template
        new to this worker counts: it is the template's cost)."""
        limits = self.limits
        signal.setitimer(signal.ITIMER_REAL, limits.seconds)
        try:
            try:
                request = json.loads(header)
                strings = self.strings(request["key"], request["templates"])
                values = strings.render(context_of(request, body))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except StringFailure as failure:
            return {"failure": [failure.index, failure.reason, failure.detail]}
        except Deadline:
            return {"failure": [None, "TemplateError", limits.too_slow()]}
        except MemoryError:
            return {"failure": [None, "TemplateError", limits.too_much_memory()]}
        return {"values": values}


def serve(limits: RenderLimits, source: IO[bytes], sink: IO[bytes]) -> None:
    worker = Worker(limits)
    write_frame(sink, encode({"ready": os.getpid()}))
    while True:
        header = read_frame(source)
        body = read_frame(source) if header is not None else None
        if header is None or body is None:
            return
        try:
            reply = worker.handle(header, body)
        except Deadline:
            # The timer fired between the end of the render and its cancellation.
            reply = {"failure": [None, "TemplateError", limits.too_slow()]}
        write_frame(sink, encode(reply))


def main(argv: list[str]) -> None:
    """``<seconds> <output bytes> <memory bytes>``."""
    # Ctrl-C in a terminal reaches the whole process group, this worker included: the
    # dispatcher decides when rendering stops (it closes the pipe, and the worker ends),
    # so a worker neither dies mid-render nor prints a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limits = RenderLimits(
        seconds=float(argv[0]), output_bytes=int(argv[1]), memory_bytes=int(argv[2])
    )
    # The protocol owns the pipes: anything printed by mistake goes to stderr instead.
    source = os.fdopen(os.dup(0), "rb")
    sink = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    _confine(limits)
    serve(limits, source, sink)


if __name__ == "__main__":
    main(sys.argv[1:])
