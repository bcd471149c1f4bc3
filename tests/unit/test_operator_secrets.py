"""jobrunner.operator.secrets: which Secrets are read again, when, and what a change does."""

from __future__ import annotations

from collections.abc import Mapping

from jobrunner.core.protocols import TransientError
from jobrunner.operator.secrets import SecretVersions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, str]] = {("ns", "s"): {"password": "a"}}
        self.reads: list[tuple[str, str]] = []
        self.down = False

    async def read(self, namespace: str, name: str) -> Mapping[str, str] | None:
        self.reads.append((namespace, name))
        if self.down:
            raise TransientError("API server unreachable")
        return self.secrets.get((namespace, name))


KEY = ("ns", "job")


async def built(cluster: Cluster, clock: Clock) -> SecretVersions:
    versions = SecretVersions(cluster.read, clock=clock, refresh_seconds=30, failing_seconds=5)
    await versions.reader(KEY)("ns", "s")
    cluster.reads.clear()
    return versions


async def test_a_changed_secret_bumps_the_epoch_once_and_only_when_due() -> None:
    cluster, clock = Cluster(), Clock()
    versions = await built(cluster, clock)
    clock.now += 29
    assert await versions.refresh({KEY: True}) == []
    assert cluster.reads == []  # not due for a consuming dispatcher
    clock.now += 2
    assert await versions.refresh({KEY: True}) == []
    assert cluster.reads == [("ns", "s")]  # read, unchanged
    cluster.secrets[("ns", "s")] = {"password": "b"}
    clock.now += 31
    assert await versions.refresh({KEY: True}) == [KEY]
    assert versions.epoch(KEY) == 1
    clock.now += 31
    assert await versions.refresh({KEY: True}) == [KEY]  # the old unit still runs: told again
    assert versions.epoch(KEY) == 2


async def test_a_dispatcher_that_cannot_connect_reads_its_secrets_more_often() -> None:
    cluster, clock = Cluster(), Clock()
    versions = await built(cluster, clock)
    cluster.secrets[("ns", "s")] = {"password": "fixed"}
    clock.now += 5
    assert await versions.refresh({KEY: False}) == [KEY]


async def test_a_rebuild_starts_from_what_it_read_and_a_deleted_secret_counts_as_a_change() -> None:
    cluster, clock = Cluster(), Clock()
    versions = await built(cluster, clock)
    cluster.secrets[("ns", "s")] = {"password": "b"}
    await versions.reader(KEY)("ns", "s")  # the rebuild read the new value
    clock.now += 31
    assert await versions.refresh({KEY: True}) == []
    del cluster.secrets[("ns", "s")]
    clock.now += 31
    assert await versions.refresh({KEY: True}) == [KEY]


async def test_a_failed_read_changes_nothing_and_what_is_not_served_is_forgotten() -> None:
    cluster, clock = Cluster(), Clock()
    versions = await built(cluster, clock)
    cluster.down = True
    clock.now += 31
    assert await versions.refresh({KEY: True}) == []
    assert versions.epoch(KEY) == 0
    versions.retain([])
    cluster.down = False
    clock.now += 31
    assert await versions.refresh({KEY: True}) == []
    assert cluster.reads == [("ns", "s")]  # only the failed one
