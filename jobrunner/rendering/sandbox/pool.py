"""The dispatcher's side of the render workers: a small pool of worker processes shared by
every ScaledJob of the process, each render timed, each ScaledJob held to its share.

* Workers start on first use (about 0.1 s each) and are reused; one that passes its
  time limit is killed (SIGKILL) ``KILL_GRACE`` seconds after its own timer should have
  stopped the render, and replaced on the next render. One that dies mid-render (its
  memory limit, the OOM killer) is replaced and the render tried once more on a fresh
  worker, so a worker lost to something else never costs a message; a second death is
  the message's own doing and is a TemplateError.
* Fairness: a ScaledJob renders one message at a time, the ScaledJobs of one namespace
  (in operator mode, one tenant) hold at most ``per_namespace`` workers at once (fewer
  than there are), and renders wait for a worker first come, first served. So a hostile
  ScaledJob delays only its own renders, and a tenant with any number of hostile
  ScaledJobs leaves other namespaces a worker. (Per ScaledJob alone was not enough: a
  tenant with as many hostile ScaledJobs as there are workers held them all.) The
  Renderer adds the other half: a ScaledJob whose renders keep passing their limits
  waits longer and longer before asking for a worker again.
* Nothing a worker sends is trusted beyond its shape: replies are JSON (never pickle),
  of bounded size, with the fields checked; anything else is the worker's failure.

Errors: ``StringFailure`` when the message (with its template) cannot render, naming
the limit it passed; ``RenderPoolError`` when no worker could be had at all (not the
message's fault: the dispatcher releases it for a retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.rendering.sandbox.templates import RenderLimits, StringFailure

logger = logging.getLogger(__name__)

KILL_GRACE = 1.0
"""Seconds past a render's time limit before its worker is killed: its own timer gets the
first chance (a clean answer, and the worker is kept)."""
START_TIMEOUT = 30.0
"""Seconds a new worker may take to be ready (a Python start on a loaded machine)."""
_FRAME = 4
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
# -I: no PYTHON* variables, no user site, not the current directory on sys.path: the
# worker runs jobrunner's own code and nothing from its environment. The package's
# directory is put on sys.path explicitly so a checkout that is not installed works.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from jobrunner.rendering.sandbox.worker import main; main(sys.argv[2:])"
)


class RenderPoolError(Exception):
    """No worker could render (it would not start, or its answer made no sense): not
    the message's fault."""


class _Died(Exception):
    """The worker ended (or broke the protocol) in the middle of a render."""


class _Worker:
    def __init__(self, process: asyncio.subprocess.Process, limits: RenderLimits) -> None:
        self.process = process
        self.limits = limits
        self.reply_max = 6 * limits.output_bytes + 64 * 1024
        """JSON may spell a character in up to 6 bytes (``\\u001f``)."""

    @classmethod
    async def start(cls, limits: RenderLimits) -> _Worker:
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-c",
                _BOOT,
                _PACKAGE_ROOT,
                str(limits.seconds),
                str(limits.output_bytes),
                str(limits.memory_bytes),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={},
            )
        except OSError as exc:
            raise RenderPoolError(f"cannot start a render worker: {exc}") from None
        worker = cls(process, limits)
        try:
            ready = await asyncio.wait_for(worker._read(), START_TIMEOUT)
        except (_Died, TimeoutError):
            await worker.kill()
            raise RenderPoolError(
                f"a render worker did not start within {START_TIMEOUT:g} s (exit code "
                f"{process.returncode}; with a very low JOBRUNNER_DISPATCHER__RENDER_MEMORY_BYTES "
                "Python cannot start)"
            ) from None
        if not isinstance(ready, dict) or "ready" not in ready:
            await worker.kill()
            raise RenderPoolError("a render worker sent something else than ready")
        return worker

    async def _read(self) -> Any:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            head = await stdout.readexactly(_FRAME)
            size = int.from_bytes(head, "big")
            if size > self.reply_max:
                raise _Died(f"a {size}-byte reply")
            data = await stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Died(str(exc)) from None
        try:
            return json.loads(data.decode("utf-8", "surrogatepass"))
        except ValueError as exc:
            raise _Died(f"a reply that is not JSON ({exc})") from None

    async def call(self, header: bytes, body: bytes) -> list[str]:
        """The strings, or StringFailure; _Died when the worker ended or misbehaved;
        TimeoutError past the limit and its grace (the caller kills the worker)."""
        stdin = self.process.stdin
        assert stdin is not None
        try:
            for data in (header, body):
                stdin.write(len(data).to_bytes(_FRAME, "big") + data)
            await stdin.drain()
        except ConnectionError as exc:
            raise _Died(str(exc)) from None
        reply = await asyncio.wait_for(self._read(), self.limits.seconds + KILL_GRACE)
        if isinstance(reply, dict):
            values = reply.get("values")
            if isinstance(values, list) and all(isinstance(v, str) for v in values):
                return values
            failure = reply.get("failure")
            if (
                isinstance(failure, list)
                and len(failure) == 3
                and (failure[0] is None or isinstance(failure[0], int))
                and all(isinstance(f, str) for f in failure[1:])
            ):
                raise StringFailure(failure[0], failure[1], failure[2])
        raise _Died("a reply of the wrong shape")

    def exit_text(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()


@dataclass
class _Share:
    slots: asyncio.Semaphore
    users: int = 0


class RenderPool:
    """Up to ``workers`` worker processes for the whole dispatcher process; the renders of
    one namespace (``tenant``) hold at most ``per_namespace`` of them at once. ``close``
    ends them."""

    def __init__(
        self,
        limits: RenderLimits,
        *,
        workers: int = 3,
        per_namespace: int = 2,
        cooldown_max: float = 60.0,
    ) -> None:
        """``cooldown_max``: the longest a ScaledJob whose renders keep passing their limits
        waits before it asks for a worker again (seconds; the Renderer applies it)."""
        self.limits = limits
        self.workers = workers
        self.per_namespace = per_namespace
        self.cooldown_max = cooldown_max
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots = asyncio.Semaphore(workers)
        self._shares: dict[str, _Share] = {}
        self._closed = False

    async def render(
        self,
        *,
        tenant: str,
        scaledjob: str,
        key: str,
        templates: Sequence[tuple[str, bool]],
        context: Mapping[str, Any],
        body: bytes,
    ) -> list[str]:
        """The rendered strings of one Job template for one message (``context``: what
        ``worker.context_of`` takes; ``key`` names ``templates``, for the workers'
        cache), for ScaledJob ``scaledjob`` of namespace ``tenant``. StringFailure when
        the message cannot render; RenderPoolError when no worker can be had."""
        if self._closed:
            raise RenderPoolError("the render pool is closed (the dispatcher is stopping)")
        header = json.dumps(
            {"key": key, "templates": [list(t) for t in templates], **context},
            ensure_ascii=False,
        ).encode("utf-8", "surrogatepass")
        # A ScaledJob's renders one at a time, then its namespace's share, then a worker:
        # in that order, so what waits behind a hostile ScaledJob is its own renders only.
        async with (
            self._share(f"scaledjob:{tenant}/{scaledjob}", 1),
            self._share(f"namespace:{tenant}", self.per_namespace),
        ):
            return await self._on_a_worker(header, body)

    @contextlib.asynccontextmanager
    async def _share(self, key: str, size: int) -> AsyncIterator[None]:
        """Hold one of the ``size`` slots of ``key`` (made on first use, forgotten when
        nobody holds or waits for it: the table never grows with ScaledJobs gone)."""
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = _Share(asyncio.Semaphore(size))
        share.users += 1
        try:
            async with share.slots:
                yield
        finally:
            share.users -= 1
            if share.users == 0:
                del self._shares[key]

    async def _on_a_worker(self, header: bytes, body: bytes) -> list[str]:
        async with self._slots:
            for attempt in (1, 2):
                worker = self._idle.pop() if self._idle else await _Worker.start(self.limits)
                self._busy.add(worker)
                keep = False
                try:
                    values = await worker.call(header, body)
                    keep = True
                    return values
                except StringFailure as failure:
                    # After a MemoryError the heap may stay fragmented: start afresh.
                    keep = failure.detail != self.limits.too_much_memory()
                    raise
                except TimeoutError:
                    raise StringFailure(None, "TemplateError", self.limits.too_slow()) from None
                except _Died as exc:
                    await worker.kill()
                    logger.warning(
                        "a render worker ended mid-render (%s; %s)%s",
                        worker.exit_text(),
                        exc,
                        "; trying once more on a new one" if attempt == 1 else "",
                    )
                    if attempt == 2:
                        raise StringFailure(
                            None,
                            "TemplateError",
                            f"the render worker died twice rendering this message "
                            f"({worker.exit_text()}), most likely over its memory limit: "
                            + self.limits.too_much_memory(),
                        ) from None
                finally:
                    self._busy.discard(worker)
                    if keep and not self._closed:
                        self._idle.append(worker)
                    else:
                        # Also on cancellation: its answer would come to the next render.
                        await asyncio.shield(worker.kill())
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Kill every worker (a render under way gets RenderPoolError or is cancelled
        by its caller)."""
        self._closed = True
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        await asyncio.gather(*(w.kill() for w in workers), return_exceptions=True)
