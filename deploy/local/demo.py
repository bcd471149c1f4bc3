"""`make demo`: the dispatcher on the local stack, end to end, in under a minute.

Publishes a handful of messages to RabbitMQ (one that makes its Job fail, one that is not
JSON), runs a dispatcher for the example ScaledJob in this process, waits until every
message is settled, and prints what became of each: its Job, the outcome and how long
the Job took. Exits 0 when every message ended as expected.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import yaml
from kubernetes import client, config

from jobrunner import runner
from jobrunner.config import Settings, load_manifest
from jobrunner.naming import job_name
from jobrunner.telemetry import Telemetry, configure_logging

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [
    ("resize-1", {"task": "resize", "seconds": 2}, "succeeded"),
    ("resize-2", {"task": "resize", "seconds": 4}, "succeeded"),
    ("thumb-1", {"task": "thumbnail", "seconds": 1}, "succeeded"),
    ("report-1", {"task": "report", "seconds": 3}, "succeeded"),
    ("broken-1", {"task": "crash", "fail": "failed"}, "dead-lettered"),
    ("garbage-1", "this is not JSON", "dead-lettered"),
]


def stack_env() -> dict[str, str]:
    path = Path(os.environ.get("JOBRUNNER_STACK_ENV", "/tmp/jobrunner-stack/stack.env"))
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )


def manifest(path: Path, namespace: str, queue: str, url: str) -> Path:
    doc = {
        "apiVersion": "jobrunner.dev/v1alpha1",
        "kind": "ScaledJob",
        "metadata": {"name": "demo", "namespace": namespace},
        "spec": {
            "jobTemplate": str(ROOT / "job_templates/echo-job.yaml"),
            "maxReplicaCount": 3,
            "triggers": [{"type": "rabbitmq", "metadata": {"queueName": queue, "host": url}}],
        },
    }
    template = yaml.safe_load((ROOT / "job_templates/echo-job.yaml").read_text())
    # The demo's Jobs may fail on request (KWOK honours the annotation).
    template["spec"]["template"]["metadata"]["annotations"]["kwok.jobrunner.dev/outcome"] = (
        "{{ message.json.get('fail', 'no') }}"
    )
    (path.parent / "demo-job.yaml").write_text(yaml.safe_dump(template))
    doc["spec"]["jobTemplate"] = str(path.parent / "demo-job.yaml")
    path.write_text(yaml.safe_dump(doc))
    return path


async def main() -> int:
    env = stack_env()
    url, kubeconfig = env["JOBRUNNER_TEST_RABBITMQ_URL"], env["JOBRUNNER_TEST_KUBECONFIG"]
    run = uuid.uuid4().hex[:6]
    namespace, queue = f"jobrunner-demo-{run}", f"demo-{run}"
    api = config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    work = Path(f"/tmp/jobrunner-demo-{run}")
    work.mkdir()
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True)
    configure_logging("ERROR")  # the table below tells the story
    settings = Settings()
    settings.kube.kubeconfig = kubeconfig
    stop = asyncio.Event()
    telemetry = Telemetry.create()
    task = asyncio.create_task(
        runner.run(
            load_manifest(manifest(work / "demo.yaml", namespace, queue, url)),
            settings,
            stop=stop,
            telemetry=telemetry,
        )
    )
    start = time.monotonic()
    print(f"demo: namespace {namespace}, queue {queue}; publishing {len(MESSAGES)} messages")
    for message_id, body, _ in MESSAGES:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
        await channel.default_exchange.publish(
            aio_pika.Message(raw, message_id=message_id), routing_key=queue
        )
    registry = telemetry.metrics.registry
    done = 0.0
    while time.monotonic() - start < 60:
        done = (
            registry.get_sample_value("jobrunner_jobs_succeeded_total", {"scaledjob": "demo"}) or 0
        ) + sum(
            s.value
            for m in telemetry.metrics.dead_lettered.collect()
            for s in m.samples
            if s.name.endswith("_total")
        )
        print(
            f"\r  settled {int(done)}/{len(MESSAGES)}  ({time.monotonic() - start:4.1f}s)",
            end="",
            flush=True,
        )
        if done >= len(MESSAGES):
            break
        await asyncio.sleep(0.5)
    print()
    stop.set()
    await task
    jobs = {j.metadata.name: j for j in batch.list_namespaced_job(namespace).items}
    rows: list[tuple[str, str, str, str]] = []
    ok = True
    for message_id, _, expected in MESSAGES:
        name = job_name("demo", message_id)
        job = jobs.get(name)
        outcome, duration = "dead-lettered (no Job)", "-"
        if job is not None:
            conditions = {c.type: c for c in job.status.conditions or [] if c.status == "True"}
            if "Complete" in conditions:
                outcome = "succeeded"
            elif "Failed" in conditions:
                outcome = f"dead-lettered ({conditions['Failed'].reason})"
            else:
                outcome = "running"
            if job.status.start_time and (job.status.completion_time or conditions):
                end = job.status.completion_time or max(
                    c.last_transition_time for c in conditions.values()
                )
                duration = f"{(end - job.metadata.creation_timestamp).total_seconds():.0f}s"
        ok = ok and outcome.startswith(expected)
        rows.append((message_id, name if job is not None else "-", outcome, duration))
    widths = [
        max(len(r[i]) for r in [("message", "Job", "outcome", "duration"), *rows]) for i in range(4)
    ]
    for row in [("message", "Job", "outcome", "duration"), *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    dead = await channel.declare_queue(f"{queue}.dead-letter", passive=True)
    print(
        f"  dead-letter queue {dead.name}: {dead.declaration_result.message_count} messages, "
        f"each with x-jobrunner-reason"
    )
    await channel.queue_delete(queue)
    await channel.queue_delete(f"{queue}.dead-letter")
    await connection.close()
    core.delete_namespace(namespace)
    print(
        f"demo: {'every message ended as expected' if ok else 'UNEXPECTED outcome'} "
        f"in {time.monotonic() - start:.1f}s"
    )
    return 0 if ok else 1


def _main() -> Any:
    return asyncio.run(main())


if __name__ == "__main__":
    sys.exit(_main())
