"""`make demo-functions`: the two example function apps as Jobs, with no cluster and no
Azure.

Imports ``examples/functions/custom-handler`` (a Node custom handler) and
``examples/functions/python-app`` (a Python v2 app) with ``jobrunner functions import
--local --embedded`` (the local executor runs the Jobs, the embedded queue stands in for
the Storage queues), publishes a batch of orders and thumbnail requests, runs one
dispatcher for both ScaledJobs in this process, waits until every message is settled
and prints what became of each: its Job, the outcome, the output it published. Exits 0
when every message ended as expected.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.table import Table
from rich.text import Text

from jobrunner import filemode
from jobrunner.cli import main as cli
from jobrunner.core.naming import job_name
from jobrunner.core.settings import Executor, Settings
from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.triggers import Reach
from jobrunner.observability.telemetry import Telemetry, configure_logging
from jobrunner.sources.sqlite import SQLiteQueue
from jobrunner.views.console import rows_of, seconds
from jobrunner.views.queries import list_all, make_console, publish, read_client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_common import (
    EXIT_INTERRUPTED,
    Interrupt,
    demo_dir,
    exit_interrupted,
    stop_local_jobs,
)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0


@dataclass(frozen=True)
class Message:
    scaledjob: str
    id: str
    body: dict[str, object]
    expected: str


MESSAGES = [
    *(
        Message(
            "custom-handler-processorder",
            f"order-{i}",
            {"id": f"order-{i}", "qty": q, "seconds": s},
            "succeeded",
        )
        for i, (q, s) in enumerate([(2, 0.5), (1, 1.5), (5, 0.2), (3, 1.0)], start=1)
    ),
    Message(
        "custom-handler-processorder",
        "order-5",
        {"id": "order-5", "qty": 9, "fail": True},
        "dead-lettered (FunctionFailed)",
    ),
    *(
        Message(
            "python-app-renderthumbnail",
            f"photo-{i}",
            {"image": f"photo-{i}.png", "seconds": s},
            "succeeded",
        )
        for i, s in enumerate([0.8, 0.3, 1.2, 0.5], start=1)
    ),
    Message(
        "python-app-renderthumbnail",
        "photo-5",
        {"image": "photo-5.png", "corrupt": True},
        "dead-lettered (FunctionFailed)",
    ),
]
OUTPUT_QUEUE = {
    "custom-handler-processorder": "receipts",
    "python-app-renderthumbnail": "thumbnails-done",
}
INPUT_QUEUE = {"custom-handler-processorder": "orders", "python-app-renderthumbnail": "thumbnails"}


def import_examples(work: Path) -> Path:
    """Both apps imported for the embedded mode, in one manifest file."""
    documents = []
    for app in ("custom-handler", "python-app"):
        out = work / app
        code = cli(
            [
                "functions",
                "import",
                str(ROOT / "examples/functions" / app),
                "-o",
                str(out),
                "--local",
                "--embedded",
            ]
        )
        if code != 0:
            raise SystemExit(f"importing {app} failed")
        for path in sorted(out.glob("*.yaml")):
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for doc in documents:
        if doc["kind"] == "ScaledJob":
            doc["spec"]["maxReplicaCount"] = 3
    combined = work / "functions.yaml"
    combined.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return combined


async def queue_contents(state: Path, queue: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    db = await SQLiteQueue.open(state / "queue.db")
    try:
        return {m.message_id or "": (m.body, m.headers) for m in await db.messages(queue)}
    finally:
        await db.close()


async def main() -> int:
    console = make_console()
    configure_logging("ERROR")
    interrupt = Interrupt()
    interrupt.install()
    if shutil.which("node") is None:
        console.print("the custom-handler example needs Node (node on PATH)")
        return 1
    work = demo_dir("functions-")
    manifest = import_examples(work)
    manifests = load_manifest(manifest)
    state = work / "state"
    settings = Settings(executor=Executor.LOCAL, local={"state_dir": state, "retry_seconds": 0.5})
    by_name = {s.name: s for s in manifests.scaledjobs}
    console.print("[bold]jobrunner functions demo[/]: two function apps, one Job per message")
    console.print(f"  imported with `jobrunner functions import --local --embedded` -> {manifest}")
    for message in MESSAGES:
        await publish(
            by_name[message.scaledjob],
            settings,
            [json.dumps(message.body).encode()],
            message_id=message.id,
        )
    console.print(
        f"  published {len(MESSAGES)} messages (orders to a Node custom handler, "
        "thumbnails to a Python v2 app); dispatching, 3 Jobs at a time per app"
    )
    telemetry = Telemetry.create()
    stop = asyncio.Event()
    start = time.monotonic()
    dispatcher = asyncio.create_task(
        filemode.run(
            manifests, settings, stop=stop, telemetry=telemetry, reach=Reach.own(os.environ)
        ),
        name="demo-dispatcher",
    )
    try:
        while time.monotonic() - start < TIMEOUT and not dispatcher.done():
            pending = 0
            for queue in INPUT_QUEUE.values():
                pending += len(await queue_contents(state, queue))
            if pending == 0 or interrupt.is_set:
                break
            await interrupt.sleep(0.25)
        stop.set()
        await dispatcher
        if interrupt.is_set:
            stopped = await stop_local_jobs(state, remove=work)
            console.print(
                f"demo-functions: interrupted; stopped the dispatcher, stopped its {stopped} "
                f"running Job(s) and removed its directory {work} (its state and manifests)"
            )
            return EXIT_INTERRUPTED
        reader = read_client(settings)
        rows = {}
        for scaledjob in manifests.scaledjobs:
            rows.update({r.name: r for r in rows_of(await list_all(reader, scaledjob))})
        await reader.close()
        dead: dict[str, str] = {}
        outputs: dict[str, bytes] = {}
        for name, queue in INPUT_QUEUE.items():
            for mid, (_, headers) in (await queue_contents(state, f"{queue}.dead-letter")).items():
                dead[mid] = headers.get("x-jobrunner-reason", "")
            for mid, (body, _) in (await queue_contents(state, OUTPUT_QUEUE[name])).items():
                outputs[mid.split("/")[0]] = body
        table = Table(title="what became of each message", title_justify="left")
        for column in ("MESSAGE", "FUNCTION", "OUTCOME", "DURATION", "OK"):
            table.add_column(column, no_wrap=True)
        table.add_column("OUTPUT PUBLISHED", no_wrap=True, overflow="ellipsis", max_width=40)
        all_ok = True
        for message in MESSAGES:
            name = job_name(message.scaledjob, message.id)
            row = rows.get(name)
            if message.id in dead:
                outcome = f"dead-lettered ({dead[message.id]})"
            else:
                outcome = row.state if row is not None else "lost"
            output = outputs.get(name, b"").decode(errors="replace")
            ok = outcome == message.expected and (bool(output) == (outcome == "succeeded"))
            all_ok = all_ok and ok
            style = "green" if outcome == "succeeded" else "red" if "dead" in outcome else "yellow"
            table.add_row(
                message.id,
                by_name[message.scaledjob].spec.function.name,  # type: ignore[union-attr]
                Text(outcome, style=style),
                seconds(row.duration) if row is not None else "-",
                Text("yes", style="green") if ok else Text(f"NO ({message.expected})", "red"),
                output or "-",
            )
        console.print(table)
        console.print(
            f"  look around: jobrunner jobs --local --state-dir {state} -f {manifest}; "
            f"jobrunner logs --local --state-dir {state} <job>"
        )
        verdict = "every message ended as expected" if all_ok else "UNEXPECTED outcome"
        console.print(f"demo-functions: {verdict} in {time.monotonic() - start:.1f}s")
        return 0 if all_ok else 1
    finally:
        if not dispatcher.done():
            stop.set()
            await dispatcher


if __name__ == "__main__":
    faulthandler.dump_traceback_later(TIMEOUT + 30, exit=True)
    code = asyncio.run(main())
    if code == EXIT_INTERRUPTED:
        exit_interrupted()
    sys.exit(code)
