"""What an operator sees of a real run: the message's trace joined to the producer's and
handed to the Job, Prometheus counters that match what happened, health endpoints, and
Kubernetes Events on the Jobs."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from jobrunner import filemode
from jobrunner.core.settings import Settings
from jobrunner.manifest.loader import load_manifest
from jobrunner.manifest.triggers import Reach
from jobrunner.observability.telemetry import Telemetry, tracer_provider
from tests.helpers import eventually
from tests.integration.harness import Dispatcher, drain_queue, publish, wait_for_jobs

pytestmark = [pytest.mark.kube, pytest.mark.rabbitmq]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"


async def test_message_span_joins_producer_trace_and_the_job_gets_traceparent(
    kube_api: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
) -> None:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry.create(
        tracer_provider(otlp_endpoint=None, processors=(SimpleSpanProcessor(exporter),))
    )
    settings = Settings()
    settings.kube.kubeconfig = str(kubeconfig)
    stop = asyncio.Event()
    task = asyncio.create_task(
        filemode.run(
            load_manifest(manifest()),
            settings,
            stop=stop,
            telemetry=telemetry,
            reach=Reach.own(os.environ),
        )
    )
    try:
        await publish(
            rabbitmq_url,
            queue,
            b'{"task": "traced"}',
            message_id="traced",
            headers={"traceparent": f"00-{TRACE_ID}-{PRODUCER_SPAN}-01"},
        )
        [job] = await wait_for_jobs(kube_api, namespace, "work", 1, state="Complete")

        async def message_span_ended() -> bool:
            return any(s.name == "jobrunner.message" for s in exporter.get_finished_spans())

        await eventually(message_span_ended, within=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)

    spans = exporter.get_finished_spans()
    [root] = [s for s in spans if s.name == "jobrunner.message"]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None
    assert format(root.parent.span_id, "016x") == PRODUCER_SPAN
    children = {
        s.name for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id
    }
    assert {"render", "create", "wait", "settle"} <= children
    assert root.attributes["jobrunner.job_name"] == job.metadata.name
    env = {e.name: e.value for e in job.spec.template.spec.containers[0].env}
    # The Job's own work can join the same trace, as a child of the message span.
    assert env["TRACEPARENT"] == f"00-{TRACE_ID}-{format(root.context.span_id, '016x')}-01"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_health_and_events_match_what_happened(
    kube_api: client.ApiClient,
    namespace: str,
    queue: str,
    rabbitmq_url: str,
    manifest: Callable[..., Path],
    dispatchers: Callable[..., Dispatcher],
) -> None:
    port = free_port()
    dispatcher = dispatchers(manifest(), {"JOBRUNNER_TELEMETRY__HTTP_PORT": str(port)})
    base = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            return (await asyncio.to_thread(get, f"{base}/readyz"))[0] == 200
        except OSError:
            return False

    await eventually(ready, within=30)
    assert (await asyncio.to_thread(get, f"{base}/healthz"))[0] == 200

    await publish(rabbitmq_url, queue, b'{"seconds": 3}', message_id="ok-1")
    await wait_for_jobs(kube_api, namespace, "work", 1)
    await publish(rabbitmq_url, queue, b'{"seconds": 3}', message_id="ok-1")  # adopts
    await publish(rabbitmq_url, queue, b'{"task": "b"}', message_id="ok-2")
    await publish(rabbitmq_url, queue, b'{"fail": "failed"}', message_id="bad-1")
    await publish(rabbitmq_url, queue, b"not json", message_id="bad-2")
    await dispatcher.settled("ack", 2)
    await dispatcher.settled("dead-letter", 2)

    status, text = await asyncio.to_thread(get, f"{base}/metrics")
    assert status == 200
    values = samples(text)

    def sj(**more: str) -> tuple[tuple[str, str], ...]:
        """The labels of a series of this ScaledJob: its namespace and name, and more."""
        return tuple(sorted({"namespace": namespace, "scaledjob": "work", **more}.items()))

    assert values[("jobrunner_messages_received_total", sj(source="rabbitmq"))] == 5
    assert values[("jobrunner_jobs_created_total", sj())] == 3
    assert values[("jobrunner_jobs_adopted_total", sj())] == 1
    assert values[("jobrunner_jobs_succeeded_total", sj())] == 2
    assert values[("jobrunner_jobs_failed_total", sj(reason="BackoffLimitExceeded"))] == 1
    dead = "jobrunner_messages_dead_lettered_total"
    assert values[(dead, sj(reason="BackoffLimitExceeded"))] == 1
    assert values[(dead, sj(reason="InvalidMessage"))] == 1
    assert values[("jobrunner_receive_to_create_seconds_count", sj())] == 3
    durations = sum(
        v for (name, _), v in values.items() if name == "jobrunner_job_duration_seconds_count"
    )
    assert durations == 3
    assert values[("jobrunner_jobs_active", sj())] == 0
    assert ("jobrunner_queue_depth_messages", sj(queue=queue)) in values
    assert len(await drain_queue(rabbitmq_url, f"{queue}.dead-letter", wait=5)) == 2

    events = client.CoreV1Api(kube_api).list_namespaced_event(namespace).items
    reasons = {
        (e.involved_object.name, e.reason) for e in events if e.source.component == "jobrunner"
    }
    job_names = {
        j.metadata.annotations["jobrunner.dev/message-id"]: j.metadata.name
        for j in client.BatchV1Api(kube_api).list_namespaced_job(namespace).items
    }
    assert (job_names["ok-1"], "Adopted") in reasons
    assert (job_names["bad-1"], "DeadLettered") in reasons
