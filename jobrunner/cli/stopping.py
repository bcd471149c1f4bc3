"""How the long-running commands (``run``, ``operator``) are asked to stop, and the exit
code that says which way: SIGTERM and SIGINT (Ctrl-C) stop them the same graceful way
(no new messages, what is decided settled within the grace), but the exit code follows
the signal, as every other command's does: 0 after SIGTERM (a Pod stopped by its kubelet
ended as it should), 130 after Ctrl-C (128 + SIGINT: a shell, ``make`` or a script that
ran it learns that the user interrupted it)."""

from __future__ import annotations

import asyncio
import signal

from jobrunner.cli.errors import INTERRUPTED


class StopSignals:
    """SIGTERM and SIGINT set ``stop``; ``exit_code`` then says which came first."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.first: signal.Signals | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received, sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.first is None:
            self.first = sig
        self.stop.set()

    @property
    def exit_code(self) -> int:
        return INTERRUPTED if self.first is signal.SIGINT else 0
