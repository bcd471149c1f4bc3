"""``run`` and ``operator`` stop the same graceful way on SIGTERM and on Ctrl-C, and say
which in their exit code: 0 after SIGTERM, 130 after SIGINT (i21, F2)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from jobrunner.cli.stopping import StopSignals


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
async def test_the_first_stop_signal_decides_the_exit_code(sig: signal.Signals, code: int) -> None:
    signals = StopSignals()
    loop = asyncio.get_running_loop()
    signals.install(loop)
    try:
        os.kill(os.getpid(), sig)
        await asyncio.wait_for(signals.stop.wait(), timeout=10)
        # A second signal during the stop (Ctrl-C pressed again) changes nothing.
        signals._received(signal.SIGINT if sig is signal.SIGTERM else signal.SIGTERM)
    finally:
        for each in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(each)
    assert signals.exit_code == code
