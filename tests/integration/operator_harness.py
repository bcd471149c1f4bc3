"""Runs `jobrunner operator` as child processes against the real stack (so tests can
SIGKILL or SIGTERM a replica), and reads and writes ScaledJob custom resources."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from tests.helpers import eventually
from tests.integration.harness import busybox_job

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "jobrunner.dev", "v1alpha1", "scaledjobs"

FAST_LEASES = {
    "JOBRUNNER_OPERATOR__LEASE_DURATION_SECONDS": "6",
    "JOBRUNNER_OPERATOR__RENEW_SECONDS": "1",
    "JOBRUNNER_OPERATOR__RENEW_DEADLINE_SECONDS": "4",
    "JOBRUNNER_OPERATOR__STATUS_INTERVAL_SECONDS": "2",
    "JOBRUNNER_DISPATCHER__SHUTDOWN_GRACE_SECONDS": "5",
}
"""Lease timings for tests: a crashed replica's ScaledJobs move after about 6 s."""


CRDS = ROOT / "deploy" / "crds"


def apply_crds(api: client.ApiClient, paths: list[Path], *, within: float = 60.0) -> list[str]:
    """Server-side apply of the CustomResourceDefinitions in `paths` (YAML files, one or
    more documents each), then wait until each is Established. Returns their names.

    Server-side, because KEDA's ScaledJob CRD is too large for the annotation a
    client-side apply keeps (262,144 bytes); a second apply of the same file changes
    nothing, so the stack can keep them between runs."""
    extensions = client.ApiextensionsV1Api(api)
    names: list[str] = []
    for path in paths:
        for document in yaml.safe_load_all(path.read_text()):
            if not document:
                continue
            name = document["metadata"]["name"]
            extensions.patch_custom_resource_definition(
                name,
                document,
                field_manager="jobrunner-tests",
                force=True,
                _content_type="application/apply-patch+yaml",
            )
            names.append(name)
    deadline = time.monotonic() + within
    for name in names:
        while True:
            status = extensions.read_custom_resource_definition(name).status
            if any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {name} not Established within {within}s")
            time.sleep(0.2)
    return names


class OperatorProcess:
    """One `jobrunner operator` replica; its log goes to a file shown when a test fails."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        *,
        namespaces: list[str],
        lease_namespace: str,
        identity: str,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig, self.log, self.identity = kubeconfig, log, identity
        self.args = [
            "--kubeconfig",
            str(kubeconfig),
            "operator",
            "--lease-namespace",
            lease_namespace,
            "--identity",
            identity,
            *(a for ns in namespaces for a in ("--watch-namespace", ns)),
            *args,
        ]
        self.env = {**os.environ, "JOBRUNNER_LOG_LEVEL": "DEBUG", **FAST_LEASES, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        handle = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobrunner.cli", *self.args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 40) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def dispatching(self, name: str) -> int:
        """How often this replica started a dispatcher for ScaledJob ``name``."""
        return self.logs().count(f"dispatching {name} from ")

    async def started_serving(self, within: float = 60) -> None:
        async def joined() -> bool:
            return "took bucket" in self.logs() or "joined lease group" in self.logs()

        await eventually(joined, within=within, interval=0.2)


def token_kubeconfig(kubeconfig: Path, token: str, path: Path, *, user: str) -> Path:
    """A copy of ``kubeconfig`` at ``path`` whose every context authenticates with the
    bearer ``token`` (a ServiceAccount's, from the TokenRequest API) as ``user``."""
    config = yaml.safe_load(kubeconfig.read_text())
    config["users"] = [{"name": user, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = user
    path.write_text(yaml.safe_dump(config))
    return path


def scaledjob(
    name: str,
    *,
    namespace: str,
    queue: str,
    url: str,
    job_spec: Mapping[str, Any] | None = None,
    annotations: Mapping[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ScaledJob",
        "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations or {})},
        "spec": {
            "jobTargetRef": copy.deepcopy(dict(job_spec or busybox_job())),
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
            **spec,
        },
    }


class ScaledJobs:
    """ScaledJob custom resources of one namespace, through the admin client."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            name = body["metadata"]["name"]
            try:
                current = self.api.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name
                )
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                return dict(
                    self.api.create_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, PLURAL, body
                    )
                )
            updated = copy.deepcopy(body)
            updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return dict(
                self.api.replace_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, updated
                )
            )

        return await asyncio.to_thread(call)

    async def get(self, name: str) -> dict[str, Any] | None:
        def call() -> dict[str, Any] | None:
            try:
                return dict(
                    self.api.get_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, PLURAL, name
                    )
                )
            except client.ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        return await asyncio.to_thread(call)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(
            self.api.delete_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name
        )

    async def status(self, name: str) -> dict[str, Any]:
        found = await self.get(name)
        return dict((found or {}).get("status") or {})

    async def condition(self, name: str, kind: str) -> dict[str, Any]:
        for c in (await self.status(name)).get("conditions") or []:
            if c.get("type") == kind:
                return dict(c)
        return {}

    async def wait_condition(
        self, name: str, kind: str, status: str, *, reason: str | None = None, within: float = 60
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            c = await self.condition(name, kind)
            if c.get("status") == status and (reason is None or c.get("reason") == reason):
                return c
            return None

        found: dict[str, Any] = await eventually(check, within=within, interval=0.3)
        return found

    async def wait_status(self, name: str, key: str, value: Any, *, within: float = 60) -> None:
        async def check() -> bool:
            return (await self.status(name)).get(key) == value

        await eventually(check, within=within, interval=0.3)


def events_of(api_client: client.ApiClient, namespace: str, name: str) -> list[str]:
    items = (
        client.CoreV1Api(api_client)
        .list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind=ScaledJob,involvedObject.name={name}"
        )
        .items
    )
    items.sort(key=lambda e: (e.first_timestamp or e.event_time or 0, e.metadata.name))
    return [e.reason for e in items]


def active(job: Any) -> bool:
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return False
    return True


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
