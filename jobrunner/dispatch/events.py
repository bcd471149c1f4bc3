"""Kubernetes Events on a ScaledJob's Jobs for the dispatcher's decisions (a delivery
adopted a Job, a message was dead-lettered): best effort, each written in its own short
task, never in the way of settling.

Imports only ``scope`` of the dispatch modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jobrunner.core.protocols import ApiRejected, TransientError
from jobrunner.dispatch.scope import Scope


class JobEvents:
    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    def on_job(self, job: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        """An Event on ``job`` (the object: its uid is at hand)."""
        meta = job.get("metadata") or {}
        self._scope.spawn(
            self._record(meta.get("name", ""), meta.get("uid"), kind, reason, message),
            name=f"event-{reason}-{meta.get('name', '')}",
        )

    def on_name(self, name: str, kind: str, reason: str, message: str) -> None:
        """An Event on Job ``name`` (its uid from the tracker, when it knows the Job)."""
        state = self._scope.tracker.jobs.get(name)
        self._scope.spawn(
            self._record(name, state.uid if state else None, kind, reason, message),
            name=f"event-{reason}-{name}",
        )

    async def _record(
        self, name: str, uid: str | None, kind: str, reason: str, message: str
    ) -> None:
        try:
            await self._scope.jobs.record_event(
                namespace=self._scope.namespace,
                job_name=name,
                job_uid=uid,
                type=kind,
                reason=reason,
                message=message,
            )
        except (ApiRejected, TransientError) as exc:
            self._scope.log.info("could not record %s event on Job %s: %s", reason, name, exc)
