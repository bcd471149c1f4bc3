"""The dispatch units of one operator replica, keyed by (namespace, name), reconciled
against what the replica wants to serve (kopf's ``orchestration.adjust_tasks`` is the
model: desired against running, stop before start).

Each key has a slot and, while it has something to do, one worker that walks it to its
desired state a step at a time, so a slow drain of one ScaledJob never holds up another,
and steps of one key never overlap:

* not wanted any more (deleted, paused, its bucket given up), or its essence changed (the
  trigger, the template, its TriggerAuthentication): stop the unit — stop consuming,
  settle what is decided within the grace, release the rest to the broker; running Jobs
  are never touched — and only then build and start the new one;
* only limits changed (a new generation, same essence): applied to the running unit
  (``DispatchUnit.resize``); replaced when the source cannot grant them;
* a unit that cannot be built (a Secret missing, a template the schema refuses) or whose
  essential task fails is reported and tried again with backoff; other keys go on.

Whatever happens is told through ``on_event`` (for Kubernetes Events) and ``on_change``
(for status), never by the registry writing to the API itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobrunner.core.redaction import describe_error
from jobrunner.core.tasks import is_essential, start_guarded
from jobrunner.manifest.scaledjob import ManifestError
from jobrunner.operator.resources import Key, Wanted
from jobrunner.runner import DispatchUnit

logger = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSED = "Paused"
    INVALID = "Invalid"
    """The object cannot be served as it is; waits for a change to it."""
    FAILED = "Failed"
    """Building or running the unit failed; tried again with backoff."""
    STOPPED = "Stopped"


EventSink = Callable[[Wanted, str, str, str], None]
"""(the object, Normal|Warning, reason, message)."""


@dataclass
class Slot:
    key: Key
    desired: Wanted | None = None
    current: Wanted | None = None
    """What the unit was built from (None while there is no unit)."""
    unit: DispatchUnit | None = None
    phase: Phase = Phase.STARTING
    problem: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    unit_failed: str | None = None
    """Set when an essential task of the unit ended: why."""
    grace: float = 0.0
    worker: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    observed: int = 0
    """The generation last acted on."""
    reported: str | None = None
    """The failure last told in an Event (a retry failing the same way is not told again)."""
    reason: str = ""
    """The reason of the last failure: ``InvalidSpec`` or ``DispatcherFailed``."""

    @property
    def seen(self) -> Wanted | None:
        return self.desired or self.current


class Registry:
    def __init__(
        self,
        *,
        build: Callable[[Wanted], Awaitable[DispatchUnit]],
        start: Callable[[DispatchUnit], None],
        on_event: EventSink = lambda *_: None,
        on_change: Callable[[Key], None] = lambda _: None,
        retry_initial: float = 1.0,
        retry_ceiling: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        gives_up: Callable[[str], bool] = lambda _what: False,
    ) -> None:
        """``gives_up``: whether the owner stops on a failure of this kind (``"unit"``: a
        running dispatcher failed; ``"build"``: one could not be built), as file mode
        does (exit 1 for the one, exit 2 at start for the other): such a failure is
        logged without the retry it would not see."""
        self._build = build
        self._start = start
        self._event = on_event
        self._changed = on_change
        self._retry_initial = retry_initial
        self._retry_ceiling = retry_ceiling
        self._clock = clock
        self._gives_up = gives_up
        self.slots: dict[Key, Slot] = {}

    # ------------------------------------------------------------------ desired state
    def reconcile(
        self, wanted: Mapping[Key, Wanted], *, grace: float | Callable[[Key], float]
    ) -> None:
        """Make ``wanted`` the desired state (keys absent from it are not wanted here);
        returns at once, the workers do the rest."""
        if callable(grace):
            grace_of = grace
        else:
            fixed = float(grace)

            def grace_of(_key: Key) -> float:
                return fixed

        for key, slot in self.slots.items():
            if key not in wanted and slot.desired is not None:
                slot.desired = None
                slot.grace = grace_of(key)
                self._kick(slot)
        for key, want in wanted.items():
            found = self.slots.get(key)
            if found is None:
                found = self.slots[key] = Slot(key=key)
            slot = found
            if slot.desired != want:
                slot.desired = want
                slot.grace = grace_of(key)
                self._kick(slot)

    def _kick(self, slot: Slot) -> None:
        if slot.worker is None or slot.worker.done():
            slot.worker = start_guarded(
                self._converge(slot),
                name=f"reconcile-{slot.key[0]}/{slot.key[1]}",
                long_lived=False,
            )
        else:
            slot.wake.set()

    def converged(self) -> bool:
        """Every worker idle (tests wait on it)."""
        return all(s.worker is None or s.worker.done() for s in self.slots.values())

    async def close(self, *, grace: float) -> None:
        """Stop every unit (running Jobs are left running) and wait for it."""
        self.reconcile({}, grace=grace)
        workers = [s.worker for s in self.slots.values() if s.worker is not None]
        await asyncio.gather(*workers, return_exceptions=True)

    # ------------------------------------------------------------------ one key
    async def _converge(self, slot: Slot) -> None:
        while True:
            slot.wake.clear()
            wait = await self._step(slot)
            if wait is None:
                continue
            if wait <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await slot.wake.wait()
        if slot.desired is None and slot.unit is None and self.slots.get(slot.key) is slot:
            del self.slots[slot.key]
            self._changed(slot.key)

    async def _step(self, slot: Slot) -> float | None:
        """One step toward the desired state. None: look again at once; 0: converged;
        a positive number: nothing to do before that many seconds (a retry)."""
        if slot.unit is not None:
            return await self._step_with_unit(slot, slot.unit)
        return await self._step_without_unit(slot)

    async def _step_with_unit(self, slot: Slot, unit: DispatchUnit) -> float | None:
        """A unit runs: stop it (it failed, or is no longer wanted), replace it (what it
        was made from changed), apply a new generation, or leave it be."""
        desired, current = slot.desired, slot.current
        assert current is not None
        if slot.unit_failed is not None:
            await self._stop(slot, grace=0.0)
            self._failed(
                slot,
                f"the dispatcher failed: {slot.unit_failed}",
                retry=not self._gives_up("unit"),
            )
            return None
        if desired is None or not desired.runnable:
            await self._stop(slot, grace=slot.grace)
            if desired is None:
                self._event(
                    current, "Normal", "Stopped", "dispatcher stopped; running Jobs continue"
                )
            return None
        if desired.essence != current.essence or desired.uid != current.uid:
            await self._stop(slot, grace=slot.grace)
            self._event(
                desired,
                "Normal",
                "Replacing",
                f"generation {desired.generation}: the trigger, the template or a Secret "
                "they read changed; dispatcher replaced, running Jobs untouched",
            )
            return None
        if desired.generation != current.generation:
            await self._new_generation(slot, unit, desired)
            return None
        return 0

    async def _new_generation(self, slot: Slot, unit: DispatchUnit, desired: Wanted) -> None:
        """A generation that changed only the limits: applied live when the unit can
        (``resize``), else the unit is replaced."""
        assert desired.scaledjob is not None
        if unit.resize(desired.scaledjob):
            slot.current = desired
            slot.observed = desired.generation
            spec = desired.scaledjob.spec
            self._event(
                desired,
                "Normal",
                "Updated",
                f"generation {desired.generation} applied live: maxReplicaCount "
                f"{spec.maxReplicaCount}, history {spec.successfulJobsHistoryLimit}/"
                f"{spec.failedJobsHistoryLimit}",
            )
            self._changed(slot.key)
            return
        await self._stop(slot, grace=slot.grace)
        self._event(
            desired,
            "Normal",
            "Replacing",
            f"generation {desired.generation}: maxReplicaCount above what the source was "
            "opened with; dispatcher replaced, running Jobs untouched",
        )

    async def _step_without_unit(self, slot: Slot) -> float | None:
        """No unit runs: say why none should (stopped, invalid, paused), wait out a
        failure's retry delay, or build and start one."""
        desired = slot.desired
        if desired is None:
            slot.phase = Phase.STOPPED
            return 0
        if desired.invalid is not None:
            self._set(slot, Phase.INVALID, desired.invalid, event=("Warning", "InvalidSpec"))
            slot.observed = desired.generation
            return 0
        if desired.paused is not None:
            self._set(
                slot,
                Phase.PAUSED,
                f"paused by the annotation {desired.paused}; running Jobs continue",
                event=("Normal", "Paused"),
            )
            slot.observed = desired.generation
            return 0
        if slot.phase is Phase.FAILED and slot.current is None:
            left = slot.retry_at - self._clock()
            if left > 0 and slot.observed == desired.generation:
                return left
        return await self._build_and_start(slot, desired)

    async def _build_and_start(self, slot: Slot, desired: Wanted) -> float | None:
        if slot.phase is not Phase.FAILED:  # a retry stays Failed until it works
            slot.phase = Phase.STARTING
            self._changed(slot.key)
        try:
            unit = await self._build(desired)
        except ManifestError as exc:
            slot.observed = desired.generation
            self._failed(
                slot,
                str(exc).replace("\n", "; "),
                reason="InvalidSpec",
                retry=not self._gives_up("build"),
            )
            return None
        except Exception as exc:  # never let one ScaledJob stop the others
            logger.exception("building the dispatcher of %s/%s failed", *slot.key)
            slot.observed = desired.generation
            self._failed(slot, describe_error(exc), retry=not self._gives_up("build"))
            return None
        slot.unit, slot.current, slot.unit_failed = unit, desired, None
        try:
            self._start(unit)
        except Exception as exc:
            logger.exception("starting the dispatcher of %s/%s failed", *slot.key)
            await self._stop(slot, grace=0.0)
            self._failed(slot, describe_error(exc))
            return None
        watch = functools.partial(self._task_ended, slot, unit)
        for task in unit.tasks:
            if is_essential(task):
                task.add_done_callback(watch)
        was_failing = slot.failures > 0
        slot.failures = 0
        slot.reported = None
        slot.observed = desired.generation
        slot.problem = None
        slot.phase = Phase.RUNNING
        self._event(
            desired,
            "Normal",
            "Started",
            f"dispatching from {unit.kind.destination} {unit.destination}"
            + (" (after failures)" if was_failing else ""),
        )
        self._changed(slot.key)
        return None

    def _task_ended(self, slot: Slot, unit: DispatchUnit, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or slot.unit is not unit:
            return
        exc = task.exception()
        # Status and Events are the ScaledJob author's to read: jobrunner's words only.
        slot.unit_failed = describe_error(exc) if exc else f"{task.get_name()} ended"
        self._kick(slot)

    async def _stop(self, slot: Slot, *, grace: float) -> None:
        unit, slot.unit = slot.unit, None
        slot.current = None
        if unit is None:
            return
        slot.phase = Phase.STOPPED
        try:
            await unit.stop(grace=grace)
        except Exception:
            logger.exception("stopping the dispatcher of %s/%s failed", *slot.key)
        self._changed(slot.key)

    def _failed(
        self, slot: Slot, problem: str, *, reason: str = "DispatcherFailed", retry: bool = True
    ) -> None:
        slot.failures += 1
        delay = min(self._retry_ceiling, self._retry_initial * 2 ** (slot.failures - 1))
        slot.retry_at = self._clock() + delay
        slot.phase, slot.problem, slot.reason = Phase.FAILED, problem, reason
        if retry:
            logger.warning("%s/%s: %s; trying again in %.0fs", *slot.key, problem, delay)
        else:
            logger.warning("%s/%s: %s", *slot.key, problem)
        if slot.reported != problem and slot.desired is not None:
            slot.reported = problem
            self._event(slot.desired, "Warning", reason, problem)
        self._changed(slot.key)

    def _set(
        self, slot: Slot, phase: Phase, problem: str | None, *, event: tuple[str, str]
    ) -> None:
        if slot.phase is phase and slot.problem == problem:
            return
        slot.phase, slot.problem = phase, problem
        if slot.desired is not None and problem is not None:
            self._event(slot.desired, event[0], event[1], problem)
        self._changed(slot.key)
