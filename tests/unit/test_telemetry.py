from __future__ import annotations

import datetime
import json
import logging
import re
import urllib.request

import pytest
from opentelemetry import trace

from jobrunner.observability.httpserver import Heartbeat, HttpEndpoints
from jobrunner.observability.telemetry import (
    Telemetry,
    configure_logging,
    extract_context,
    traceparent_of,
)


def test_health_and_readiness_report_their_state() -> None:
    telemetry = Telemetry.create()
    telemetry.metrics.jobs_created.labels("team-a", "sj").inc()
    heartbeat = Heartbeat(stale_after=30)
    state = {"ready": (False, "sj: broker not connected")}
    endpoints = HttpEndpoints(
        registry=telemetry.metrics.registry, heartbeat=heartbeat, ready=lambda: state["ready"]
    )
    port = endpoints.start("127.0.0.1", 0)
    try:

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        assert get("/healthz")[0] == 200
        assert get("/readyz") == (503, "sj: broker not connected\n")
        state["ready"] = (False, "sj: NATS at nats://u:s3cret@nats:4222 is not reachable")
        assert get("/readyz") == (503, "sj: NATS at nats://***@nats:4222 is not reachable\n")
        state["ready"] = (True, "ready")
        assert get("/readyz")[0] == 200
        status, body = get("/metrics")
        assert status == 200
        assert 'jobrunner_jobs_created_total{namespace="team-a",scaledjob="sj"} 1.0' in body
        heartbeat.last -= 60  # the event loop stopped beating
        assert get("/healthz")[0] == 503
    finally:
        endpoints.stop()


def test_trace_context_round_trips_through_headers() -> None:
    provider_tracer = Telemetry.create().tracer
    parent = extract_context(
        {"Traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    )
    span = provider_tracer.start_span("m", context=parent)
    assert format(span.get_span_context().trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    header = traceparent_of(span)
    assert header is not None
    assert header.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    span.end()
    assert traceparent_of(trace.INVALID_SPAN) is None


def test_json_logs_carry_message_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_lines=True)
    try:
        logging.getLogger("jobrunner.test").info(
            "created Job %s",
            "j-1",
            extra={"scaledjob": "sj", "job_name": "j-1", "message_id": "m-1", "source": "rabbitmq"},
        )
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        logging.getLogger().handlers.clear()
    assert line["message"] == "created Job j-1"
    assert (line["scaledjob"], line["job_name"], line["message_id"], line["source"]) == (
        "sj",
        "j-1",
        "m-1",
        "rabbitmq",
    )
    # ISO 8601 in UTC, what log collectors parse without configuration.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line["time"]
    stamped = datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - stamped).total_seconds()) < 60


def test_a_failed_broker_connect_is_said_once_not_twice(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    try:
        logging.getLogger("aiormq.connection").error(
            "error when creating transport: %r", ConnectionRefusedError(111, "refused")
        )
        logging.getLogger("aiormq.connection").error("Unexpected connection close")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "creating transport" not in err  # the runner's own retry line says it
    assert "Unexpected connection close" in err
