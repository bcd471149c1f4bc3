"""The Secrets a served ScaledJob's dispatcher was built from, read again to notice a
correction or a rotation.

A dispatcher resolves its trigger once, when it is built: the password of a
TriggerAuthentication's ``secretTargetRef`` ends up in the source's connection, and a
reconnect uses it again. Without this, a Secret fixed after a wrong password (or rotated)
was never picked up until the TriggerAuthentication itself was touched.

The operator's RBAC on Secrets is ``get`` (by name, possibly limited to a
``resourceNames`` allow-list: the chart's ``permissions.operator.restrict.secret``), never
``list``/``watch``, which would let it read every Secret of every tenant namespace. So the
Secrets are *polled* by name, and only those a served dispatcher actually read: every
``refresh_seconds`` (30 s) for a dispatcher that consumes, every ``failing_seconds``
(5 s) for one that cannot (refused credentials, missing vhost: the reconnect after an
auth failure then meets the new value within one reconnect of the source's backoff).
A change (or a Secret gone) bumps the ScaledJob's *epoch*, which is part of its essence
(``resources.essence``): the registry replaces the dispatcher as for a changed
TriggerAuthentication (stop, then build with the new value; running Jobs untouched).

Only a digest (SHA-256) of each Secret's data is kept, never the values.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from jobrunner.core.protocols import ApiRejected, TransientError
from jobrunner.manifest.triggers.auth import SecretReader
from jobrunner.operator.resources import Key

logger = logging.getLogger(__name__)

SecretRef = tuple[str, str]
"""(namespace, name) of a Secret."""

MISSING = "-"
"""The digest of a Secret that is not there (or that we may not read)."""


def digest(data: Mapping[str, str] | None) -> str:
    """A digest of a Secret's ``data`` (MISSING for None): equal exactly when the values
    are."""
    if data is None:
        return MISSING
    text = json.dumps(dict(data), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Built:
    """The Secrets one ScaledJob's dispatcher read while it was built, by digest."""

    read: dict[SecretRef, str] = field(default_factory=dict)
    checked_at: float = 0.0


class SecretVersions:
    """Records the Secrets each dispatcher reads (``reader``), reads them again
    (``refresh``, from the operator's loop) and bumps ``epoch(key)`` when one changed."""

    def __init__(
        self,
        read_secret: SecretReader,
        *,
        on_change: Callable[[], None] = lambda: None,
        refresh_seconds: float = 30.0,
        failing_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read_secret
        self._on_change = on_change
        self.refresh_seconds = refresh_seconds
        self.failing_seconds = failing_seconds
        self._clock = clock
        self._built: dict[Key, _Built] = {}
        self._epochs: dict[Key, int] = {}
        self.reads = 0
        """Secrets read again so far (for tests: the cost of the poll)."""

    def epoch(self, key: Key) -> int:
        """How many times a Secret of ``key``'s dispatcher changed (0: never)."""
        return self._epochs.get(key, 0)

    def reader(self, key: Key) -> SecretReader:
        """A SecretReader for building ``key``'s dispatcher that remembers what it read
        (a fresh build forgets what the previous one read)."""
        built = self._built[key] = _Built(checked_at=self._clock())

        async def read(namespace: str, name: str) -> Mapping[str, str] | None:
            data = await self._read(namespace, name)
            built.read[(namespace, name)] = digest(data)
            return data

        return read

    def retain(self, keys: Iterable[Key]) -> None:
        """Forget every ScaledJob but ``keys`` (those served here)."""
        keep = set(keys)
        for key in [k for k in self._built if k not in keep]:
            del self._built[key]
        for key in [k for k in self._epochs if k not in keep]:
            del self._epochs[key]

    async def refresh(self, serving: Mapping[Key, bool]) -> list[Key]:
        """Read again the Secrets of the dispatchers in ``serving`` (key -> True while
        it consumes) that are due; returns the keys whose epoch was bumped. A read that
        fails (the API server unreachable, 403) changes nothing: the next is tried at
        the next due time."""
        now = self._clock()
        bumped: list[Key] = []
        for key, consuming in serving.items():
            built = self._built.get(key)
            if built is None or not built.read:
                continue
            every = self.refresh_seconds if consuming else self.failing_seconds
            if now - built.checked_at < every:
                continue
            built.checked_at = now
            changed = await self._changed(built)
            if changed is not None and self._built.get(key) is built:
                self._epochs[key] = self.epoch(key) + 1
                bumped.append(key)
                logger.info(
                    "%s/%s: Secret %s changed; the dispatcher is rebuilt with it",
                    *key,
                    changed,
                    extra={"scaledjob": key[1]},
                )
        if bumped:
            self._on_change()
        return bumped

    async def _changed(self, built: _Built) -> str | None:
        """The name of the first Secret of ``built`` whose data differs now, or None."""
        for (namespace, name), before in list(built.read.items()):
            try:
                self.reads += 1
                now = digest(await self._read(namespace, name))
            except (TransientError, ApiRejected) as exc:
                logger.debug("reading Secret %s/%s again failed: %s", namespace, name, exc)
                return None
            if now != before:
                return name
        return None


async def refresh_loop(
    versions: SecretVersions, serving: Callable[[], Mapping[Key, bool]], *, tick: float = 1.0
) -> None:
    """``versions.refresh`` every ``tick`` seconds until cancelled (each ScaledJob is
    read only when due, see SecretVersions)."""
    while True:
        await asyncio.sleep(tick)
        await versions.refresh(serving())
