"""A function app on the embedded queue (``import --local --embedded``): outputs land on
the embedded queue exactly once even when the dispatcher dies between publishing an
output and recording it (the embedded queue keeps one message per output id)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import yaml

from jobrunner.cli import main as cli
from jobrunner.sources.sqlite import SQLiteQueue
from tests import services
from tests.helpers import wait_until
from tests.local.conftest import Dispatchers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node() -> None:
    """The example custom handler is a Node program; the stack's install-system.sh
    installs Node (Azurite needs it), so with CI=true its absence fails the run."""
    if shutil.which("node") is None:
        services.missing("Node", "no node on PATH (deploy/local/install-system.sh installs it)")


def rows(state: Path, queue: str) -> list[tuple[str | None, bytes]]:
    async def read() -> list[tuple[str | None, bytes]]:
        db = await SQLiteQueue.open(state / "queue.db")
        try:
            return [(m.message_id, m.body) for m in await db.messages(queue)]
        finally:
            await db.close()

    return asyncio.run(read())


@pytest.mark.usefixtures("node")
def test_an_output_is_published_once_across_a_crash_between_publishing_and_recording_it(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    app = ROOT / "examples/functions/custom-handler"
    assert cli(["functions", "import", str(app), "-o", str(out), "--local", "--embedded"]) == 0
    manifest = out / "custom-handler-processorder.yaml"
    body = json.dumps({"id": "o-9", "qty": 2})
    assert cli(["publish", "-f", str(manifest), "--state-dir", str(state_dir), body]) == 0
    first = dispatchers.start_with(
        manifest, {"JOBRUNNER_DISPATCHER__FAILPOINTS": '["after-output-sent"]'}
    )
    first.wait(timeout=90)
    assert len(rows(state_dir, "receipts")) == 1  # sent, not recorded on the Job
    dispatchers.start(manifest)
    wait_until(lambda: rows(state_dir, "orders") == [], timeout=90)
    receipts = rows(state_dir, "receipts")
    assert [b for _, b in receipts] == [b'{"order":"o-9","total":19}'], dispatchers.logs()
    assert receipts[0][0] is not None
    assert receipts[0][0].endswith("/receipt/0")


@pytest.mark.usefixtures("node")
def test_outputs_of_a_job_that_keeps_its_message_are_published_when_it_succeeds(
    state_dir: Path, dispatchers: Dispatchers, tmp_path: Path
) -> None:
    """Ack policy onJobCreation: the message is acked once the Job exists; the outputs
    go out when the Job succeeds, before the Job is released."""
    out = tmp_path / "out"
    app = ROOT / "examples/functions/custom-handler"
    assert cli(["functions", "import", str(app), "-o", str(out), "--local", "--embedded"]) == 0
    manifest = out / "custom-handler-processorder.yaml"
    docs = list(yaml.safe_load_all(manifest.read_text()))
    docs[-1]["spec"]["ackPolicy"] = "onJobCreation"
    manifest.write_text(yaml.safe_dump_all(docs))
    body = json.dumps({"id": "o-10", "qty": 1, "seconds": 1})
    assert cli(["publish", "-f", str(manifest), "--state-dir", str(state_dir), body]) == 0
    dispatchers.start(manifest)
    wait_until(lambda: rows(state_dir, "receipts"), timeout=90)
    assert [b for _, b in rows(state_dir, "receipts")] == [b'{"order":"o-10","total":9.5}']
    assert rows(state_dir, "orders") == []
    assert "published 1 output message(s)" in dispatchers.logs()
