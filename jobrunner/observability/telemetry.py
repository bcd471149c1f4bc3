"""Tracing, metrics and logs: what an operator needs to follow each message and to see the
dispatcher's health with the tools they already run.

* Tracing (OpenTelemetry SDK): one span per message, children for render, create, wait and
  settle; the W3C trace context is read from the message's headers, so the span joins the
  producer's trace, and handed to the Job as ``TRACEPARENT``. Spans are exported over
  OTLP only when an endpoint is configured; nothing leaves the process by default.
* Metrics (prometheus-client): Prometheus is where they are read, so they are written in
  its model directly: names, ``_total`` counters and ``_seconds`` histograms follow its
  conventions without an OpenTelemetry-to-Prometheus translation in between, and one
  registry per process (no global) keeps tests independent.
  Every series of a ScaledJob is labelled ``namespace`` and ``scaledjob`` (two
  ScaledJobs of one name in two namespaces are two series); label values are bounded:
  names, reasons (at most ``REASONS_PER_SCALEDJOB`` distinct ones per ScaledJob and
  metric, the rest counted as ``Other``), outcomes, partitions — never a message id.
* Logs: plain or JSON lines carrying scaledjob, job_name, message_id and source. Every
  line, libraries' included, is passed through ``jobrunner.core.redaction.redact``: no
  ``user:password@``, SAS token or ``AccountKey`` reaches the log, whoever wrote it.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jobrunner.core.redaction import describe_error, describe_traceback, redact

_CONTEXT = ("scaledjob", "job_name", "message_id", "source")
_PROPAGATOR = TraceContextTextMapPropagator()


def iso_time(created: float) -> str:
    """ISO 8601 / RFC 3339 in UTC with milliseconds (``2026-11-29T16:22:33.123Z``), what
    log collectors parse without configuration."""
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _JsonFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return describe_traceback(ei[1]) if ei and ei[1] is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str))


class _TextFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return describe_traceback(ei[1]) if ei and ei[1] is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in _CONTEXT if hasattr(record, k))
        return redact(f"{base} [{context}]" if context else base)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if json_lines
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(_LibraryWords())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries stay at WARNING whatever the level, because below it they log
    # what must not reach a log (found by running each against the local stack at
    # DEBUG): aiokafka's connection logs the SASL PLAIN bytes, password included;
    # azure-core's HTTP logging policy every request and the server's answer headers
    # (INFO); botocore the signed request and every response body (DEBUG; an SQS answer
    # is a message's body); redis-py the server's error text. aio-pika and the
    # kubernetes client are merely chatty at INFO.
    for noisy in (
        "aio_pika",
        "aiormq",
        "aiokafka",
        "kubernetes",
        "urllib3",
        "azure",
        "botocore",
        "aiobotocore",
        "redis",
        "nats",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # The runner says a failed connect once per try, in words; aiormq's own ERROR line
    # for the same failure would double every retry.
    aiormq = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _DropConnectFailures) for f in aiormq.filters):
        aiormq.addFilter(_DropConnectFailures())


class _DropConnectFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("error when creating transport")


class _LibraryWords(logging.Filter):
    """A library's line keeps its words but says an exception as jobrunner.core.redaction's
    ``describe_error`` does (class and errno, not its text), and loses its traceback:
    at WARNING and above the libraries quote the server's answer there (aiokafka's
    ``Unable connect to ...: <the broker's error message>``, nats-py's
    ``encountered error``). jobrunner's own lines are left as they are: they are built
    from safe words already, and a traceback on one is a bug's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "jobrunner" or record.name.startswith("jobrunner."):
            return True
        if isinstance(record.args, tuple) and any(
            isinstance(a, BaseException) for a in record.args
        ):
            record.args = tuple(
                describe_error(a) if isinstance(a, BaseException) else a for a in record.args
            )
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({describe_error(record.exc_info[1])})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def extract_context(headers: Mapping[str, str]) -> Context:
    """The producer's trace context from W3C ``traceparent``/``tracestate`` headers."""
    return _PROPAGATOR.extract(carrier={k.lower(): v for k, v in headers.items()})


def traceparent_of(span: trace.Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def tracer_provider(
    *, otlp_endpoint: str | None, processors: tuple[SpanProcessor, ...] = ()
) -> TracerProvider:
    """A provider that exports over OTLP/HTTP when an endpoint is given, else nowhere
    (extra processors, such as a test's in-memory exporter, are added as they are)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "jobrunner"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)
# Waiting for quota: Kueue admits a Job with free quota in tens of milliseconds (one
# scheduling cycle); a starved queue makes it hours.
_ADMISSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


REASONS_PER_SCALEDJOB = 32
"""Distinct ``reason`` label values one ScaledJob may add to one metric; any further
reason counts as ``Other``. A Job's failure reason is its Failed condition's, which
whoever may write the Job's status chooses: without a bound, a tenant could make the
registry grow without end."""


class _BoundedLabel:
    """Passes label values through until ``limit`` distinct ones are seen per key, then
    answers ``Other`` for any new one."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: dict[tuple[str, ...], set[str]] = {}

    def __call__(self, key: tuple[str, ...], value: str) -> str:
        seen = self._seen.setdefault(key, set())
        if value in seen:
            return value
        if len(seen) >= self._limit:
            return "Other"
        seen.add(value)
        return value

    def forget(self, key: tuple[str, ...]) -> None:
        self._seen.pop(key, None)


@dataclass
class Metrics:
    registry: CollectorRegistry
    messages_received: Counter
    jobs_created: Counter
    jobs_adopted: Counter
    jobs_succeeded: Counter
    jobs_failed: Counter
    dead_lettered: Counter
    jobs_active: Gauge
    jobs_pending_admission: Gauge
    evictions: Counter
    admission_wait: Histogram
    queue_depth: Gauge
    consumer_lag: Gauge
    receive_to_create: Histogram
    publish_to_create: Histogram
    job_duration: Histogram
    unforeseen_errors: Counter
    bounded: _BoundedLabel

    def reason(self, namespace: str, scaledjob: str, metric: str, reason: str) -> str:
        """``reason`` as a label value of ``metric`` for that ScaledJob: itself, or
        ``Other`` once the ScaledJob has used ``REASONS_PER_SCALEDJOB`` others there."""
        return self.bounded((namespace, scaledjob, metric), reason)

    def forget(self, namespace: str, scaledjob: str) -> None:
        """Drop the reason bookkeeping of a ScaledJob no longer served here."""
        for metric in ("jobs_failed", "dead_lettered", "unforeseen_errors"):
            self.bounded.forget((namespace, scaledjob, metric))

    @classmethod
    def create(cls) -> Metrics:
        """Every series the dispatcher reports, on a registry of its own.

        Long because it is a table, not steps: one entry per series, each with its name,
        help and labels, read (and diffed) in one place as /metrics lists them; split, it
        would only spread one list over several functions."""
        r = CollectorRegistry()
        sj = ["namespace", "scaledjob"]
        return cls(
            registry=r,
            messages_received=Counter(
                "jobrunner_messages_received",
                "Messages received from the source.",
                [*sj, "source"],
                registry=r,
            ),
            jobs_created=Counter("jobrunner_jobs_created", "Jobs created.", sj, registry=r),
            jobs_adopted=Counter(
                "jobrunner_jobs_adopted",
                "Jobs found existing for a redelivered message and adopted instead of created.",
                sj,
                registry=r,
            ),
            jobs_succeeded=Counter(
                "jobrunner_jobs_succeeded", "Jobs that reached Complete.", sj, registry=r
            ),
            jobs_failed=Counter(
                "jobrunner_jobs_failed",
                "Jobs that failed for good (Failed, or deleted).",
                [*sj, "reason"],
                registry=r,
            ),
            dead_lettered=Counter(
                "jobrunner_messages_dead_lettered",
                "Messages dead-lettered, by reason.",
                [*sj, "reason"],
                registry=r,
            ),
            jobs_active=Gauge(
                "jobrunner_jobs_active", "Jobs holding a maxReplicaCount slot.", sj, registry=r
            ),
            jobs_pending_admission=Gauge(
                "jobrunner_jobs_pending_admission",
                "Of the Jobs holding a slot, those Kueue has not admitted (suspended).",
                sj,
                registry=r,
            ),
            evictions=Counter(
                "jobrunner_job_evictions",
                "Evictions of queued Jobs by Kueue (preemption...); the Job is requeued.",
                sj,
                registry=r,
            ),
            admission_wait=Histogram(
                "jobrunner_admission_wait_seconds",
                "From a queued Job's creation (or eviction) to Kueue's admission of it.",
                sj,
                buckets=_ADMISSION_BUCKETS,
                registry=r,
            ),
            queue_depth=Gauge(
                "jobrunner_queue_depth_messages",
                "Messages ready in the source queue (not counting those in flight).",
                [*sj, "queue"],
                registry=r,
            ),
            consumer_lag=Gauge(
                "jobrunner_consumer_lag_messages",
                "Kafka: records after the committed offset, per partition.",
                [*sj, "topic", "partition"],
                registry=r,
            ),
            receive_to_create=Histogram(
                "jobrunner_receive_to_create_seconds",
                "From receiving a message to the API server's answer creating its Job.",
                sj,
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            publish_to_create=Histogram(
                "jobrunner_publish_to_create_seconds",
                "From the producer's timestamp (AMQP timestamp property, or header "
                "timestamp_in_ms) to the Job's creation; only for messages that carry one.",
                sj,
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            unforeseen_errors=Counter(
                "jobrunner_unforeseen_errors",
                "Errors nobody foresaw while processing a message (a bug, or a library that "
                "changed); the message is released, then dead-lettered InternalError after "
                "a few attempts.",
                [*sj, "error"],
                registry=r,
            ),
            job_duration=Histogram(
                "jobrunner_job_duration_seconds",
                "From a Job's creation to its Complete or Failed condition.",
                [*sj, "outcome"],
                buckets=_DURATION_BUCKETS,
                registry=r,
            ),
            bounded=_BoundedLabel(REASONS_PER_SCALEDJOB),
        )


@dataclass
class Telemetry:
    """What the dispatcher reports to; one per process, built by the runner."""

    tracer: trace.Tracer
    metrics: Metrics
    provider: TracerProvider | None = None

    @classmethod
    def create(cls, provider: TracerProvider | None = None) -> Telemetry:
        provider = provider or TracerProvider()
        return cls(
            tracer=provider.get_tracer("jobrunner"), metrics=Metrics.create(), provider=provider
        )
