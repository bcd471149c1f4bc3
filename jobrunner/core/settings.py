"""jobrunner's own settings: ``JOBRUNNER_*`` environment variables (pydantic-settings),
per part (Kubernetes client, dispatcher, sources, local executor, telemetry, operator).
"""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobrunner.core import limits


class KubeSettings(BaseModel):
    kubeconfig: str | None = None
    """Path to a kubeconfig; unset: in-cluster config, else ~/.kube/config."""
    context: str | None = None
    api_retry_max_seconds: float = Field(default=30.0, gt=0)
    """Ceiling of the exponential backoff between retries of a failing API call."""


class DispatcherSettings(BaseModel):
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    """How long SIGTERM waits for in-flight settlements before cancelling them."""
    handover_margin_seconds: float = Field(default=60.0, ge=0)
    """How long before the broker's consumer timeout a held message is handed over."""
    unclaimed_deletion_grace_seconds: float = Field(default=600.0, ge=0)
    """A finished Job being deleted whose message no delivery claims (it was settled just
    before a crash, before the Job was released) is let go this long after it finished;
    a delivery that does come meanwhile settles it and releases it at once."""
    max_unforeseen_errors: int = Field(default=3, ge=1)
    """Tries a message gets when processing it fails in a way nobody foresaw (a bug, a
    library that changed): it is released to the source that many times, then
    dead-lettered ``InternalError`` with the exception, so none stays in hand or loops
    forever."""
    progress_log_seconds: float = Field(default=30.0, gt=0)
    """While Jobs run, how often a line says how many, the longest running and what
    waits: long work shows progress in the log, not only on /metrics."""
    read_message_secrets: bool = True
    """False when this dispatcher may not ``get`` its own message Secrets (the chart's
    ``permissions.operator.restrict.secret``: RBAC can name Secrets, and per-Job names
    cannot be known in advance). Every Job then keeps its message's copy in its own
    annotations, where a Job that owns its message is dead-lettered from, and a message
    whose copy does not fit there (over 96 KiB) is dead-lettered ``MessageTooLarge`` on
    arrival instead of making a Job whose failure could not be dead-lettered."""
    render_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    """Wall time one message's Job may take to render (every templated string of it). A
    template ordinarily renders in well under a millisecond; past this the render is
    stopped (its worker killed if need be) and the message dead-lettered
    ``TemplateError`` saying so. At most 60 s: a render holds one of the process's
    render workers for that long."""
    render_output_bytes: int = Field(default=1024 * 1024, ge=4096, le=limits.OBJECT_MAX)
    """Characters the templates of one Job may output in all, counted while they stream;
    past it: ``TemplateError``. At most 1.5 MiB: no Job larger than that can be stored
    (etcd's request limit, see ``limits.OBJECT_MAX``)."""
    render_memory_bytes: int = Field(default=96 * 1024 * 1024, ge=64 * 1024 * 1024)
    """Address space of each render worker (``RLIMIT_AS``), Python itself included (about
    25 MiB); a render that needs more is a ``TemplateError``. Keep
    ``render_workers`` x this, plus the dispatcher's own memory, within the pod's memory
    limit (the chart's default, 512 MiB, holds 3 x 96 MiB and the operator's ~125 MiB)."""
    render_workers: int = Field(default=3, ge=1, le=64)
    """Render worker processes, shared by every ScaledJob of the process; started on
    first use."""
    render_workers_per_namespace: int = Field(default=2, ge=1)
    """The most workers the ScaledJobs of one namespace hold at once (in operator mode a
    namespace is a tenant), so that a tenant whose renders run to the time limit, with
    however many ScaledJobs, leaves the other namespaces workers to render with; a
    ScaledJob holds one at most. Below ``render_workers`` for that to hold; 2 of 3 by
    default, so that one hostile ScaledJob does not hold up the others of its own
    namespace either."""
    render_cooldown_max_seconds: float = Field(default=60.0, ge=0, le=3600)
    """A ScaledJob whose render passed its time or memory limit waits before its next
    render asks for a worker: the time limit, doubled for each such render in a row, up
    to this; a render that succeeds ends the wait. So a hostile template holds a worker
    a small share of the time, and other tenants' renders rarely wait for one."""
    failpoints: list[str] = Field(default_factory=list)
    """Testing only: crash points to arm (see jobrunner.core.failpoints)."""

    @model_validator(mode="after")
    def _share_fits(self) -> DispatcherSettings:
        if self.render_workers_per_namespace > self.render_workers:
            raise ValueError(
                f"render_workers_per_namespace ({self.render_workers_per_namespace}) is over "
                f"render_workers ({self.render_workers}); a namespace cannot hold more "
                "workers than there are"
            )
        return self


class KafkaSettings(BaseModel):
    max_poll_interval_ms: int = Field(default=300_000, gt=0)
    """The consumer's ``max.poll.interval.ms``. The dispatcher keeps polling while it
    pauses partitions for backpressure, so Jobs of any length stay below it."""
    session_timeout_ms: int = Field(default=10_000, gt=0)
    heartbeat_interval_ms: int = Field(default=3_000, gt=0)


class AzureQueueSettings(BaseModel):
    visibility_timeout_seconds: float = Field(default=600.0, ge=2, le=7 * 24 * 3600)
    """How long a received message stays invisible; renewed at half this interval for
    as long as its Job runs, so a message is never handed out twice while its Job lives.
    10 minutes is the Functions queue listener's fixed lease (QueueListener.cs). After a
    dispatcher dies, its messages come back once this much time has passed."""
    max_poll_interval_seconds: float = Field(default=5.0, gt=0)
    """Longest pause between two receives of an empty queue (the pause starts at 0.1 s
    and doubles while the queue stays empty; the Functions host's maxPollingInterval,
    1 min by default, plays the same part)."""


class Executor(enum.StrEnum):
    KUBERNETES = "kubernetes"
    LOCAL = "local"
    """Jobs run as processes on this machine (see jobrunner.local): no cluster needed."""


class LocalSettings(BaseModel):
    state_dir: Path = Path(".jobrunner")
    """Where the local executor keeps its Jobs (and their logs) and where a ``sqlite``
    trigger's queue file lives unless its ``path`` is absolute."""
    retry_seconds: float = Field(default=1.0, ge=0)
    """Pause before a failed local Job's first retry, doubled for each further one (a
    cluster waits 10 s; a developer waiting on a laptop should not)."""
    poll_interval_seconds: float = Field(default=0.1, gt=0)
    """How often the local executor looks for Jobs whose status changed."""


class TelemetrySettings(BaseModel):
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """Port for /metrics, /healthz and /readyz; unset: no HTTP server (the image sets 8080)."""
    http_host: str = "127.0.0.1"
    """Address to bind; the image sets 0.0.0.0 so the kubelet's probes reach it."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); unset: spans are
    not exported (the CLI also honours OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)."""
    queue_depth_interval_seconds: float = Field(default=10.0, gt=0)
    """How often the queue depth gauge is refreshed."""


class HttpSettings(BaseModel):
    listen_address: str = "0.0.0.0:8081"
    """Where HTTP triggers are served in a cluster (and, for every tenant's ScaledJob,
    by the operator: the chart's ``httpTrigger.port`` Service port points here),
    ``host:port``. 8081, not 8080: the image serves ``/metrics`` and the probes on 8080
    (``JOBRUNNER_TELEMETRY__HTTP_PORT``), and two servers cannot bind one port."""
    local_listen_address: str = "127.0.0.1:8080"
    """Where HTTP triggers are served with ``--local`` (this machine only)."""


class OperatorSettings(BaseModel):
    """``jobrunner operator``: ScaledJobs from the cluster (see jobrunner.operator)."""

    watch_namespaces: str = ""
    """Comma-separated namespaces whose ScaledJobs to serve; empty: all namespaces (a
    cluster-wide watch, which needs a ClusterRoleBinding)."""
    label_selector: str = ""
    """Serve only ScaledJobs with these labels (a Kubernetes label selector)."""
    lease_namespace: str = ""
    """Where the replicas' Leases live; empty: the pod's own namespace (from its service
    account), else ``default``."""
    lease_group: str = Field(default="jobrunner", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Prefix of the Lease names and value of their ``jobrunner.dev/lease-group`` label:
    replicas with the same group share the ScaledJobs (one Helm release, one group)."""
    identity: str = ""
    """This replica's name in the group; empty: ``$POD_NAME`` (else the host name) and a
    random suffix, so a restarted container is never taken for its predecessor."""
    buckets: int = Field(default=16, ge=1, le=1024)
    """ScaledJobs hash into this many buckets, one Lease each; a replica holds at most
    ceil(buckets / live replicas). More buckets than replicas spreads work evenly; every
    replica must use the same number."""
    lease_duration_seconds: float = Field(default=15.0, gt=0)
    """A replica whose member Lease has not changed for this long (as another replica
    sees it) is gone: its buckets are taken over. The takeover time after a crash."""
    renew_seconds: float = Field(default=3.0, gt=0)
    """How often a replica renews its member Lease: one write per replica per period,
    the steady API cost of high availability."""
    renew_deadline_seconds: float = Field(default=10.0, gt=0)
    """A replica that could not renew for this long stops every dispatcher it runs (it
    must: the others will take its buckets at ``lease_duration_seconds``)."""
    keda_takeover: bool = False
    """Also serve keda.sh ScaledJobs annotated ``jobrunner.dev/takeover: "true"`` (and
    paused for KEDA with ``autoscaling.keda.sh/paused: "true"``): migrate one ScaledJob
    at a time."""
    status_interval_seconds: float = Field(default=10.0, gt=0)
    """At most one status write per ScaledJob per this many seconds for the counters
    (``activeJobs``, ``lastMessageTime``); a condition that changes is written at once."""
    secret_refresh_seconds: float = Field(default=30.0, gt=0, le=3600)
    """How often the Secrets a consuming dispatcher was built from (those its
    TriggerAuthentications name) are read again; a change rebuilds the dispatcher with
    the new value. A dispatcher that cannot connect re-reads them every
    ``min(5, this)`` seconds. Polled by name (``get``): the operator has no right to
    list or watch Secrets (jobrunner.operator.secrets)."""
    tenant_env_allow_list: str = ""
    """Comma-separated names of the operator's own environment variables that ScaledJobs
    may read (KEDA's ``*FromEnv`` keys, TriggerAuthentication ``env``); empty, the
    default: none, and a ScaledJob naming any variable is ``InvalidSpec``. The
    operator's environment is the chart owner's (broker credentials, cloud keys), not
    the tenants': a listed variable can be read by every ScaledJob author and sent to
    any host they name, so list only values every tenant may have."""
    allow_operator_identity: bool = False
    """Let an SQS trigger without keys use the operator's own AWS identity (its IRSA or
    instance role) when it asks for it (KEDA's ``identityOwner: operator``). Off by
    default: that identity reaches every queue the operator's role reaches, for every
    tenant. Azure queues never use an ambient identity, so this changes nothing there."""

    def namespaces(self) -> list[str]:
        return [n.strip() for n in self.watch_namespaces.split(",") if n.strip()]

    def tenant_env_names(self) -> list[str]:
        """``tenant_env_allow_list`` as names."""
        return [n.strip() for n in self.tenant_env_allow_list.split(",") if n.strip()]

    @field_validator("tenant_env_allow_list")
    @classmethod
    def _env_names(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        # A POSIX-style name: ASCII letters, digits and _, not starting with a digit.
        bad = [n for n in names if not (n.isascii() and n.isidentifier())]
        if bad:
            raise ValueError(
                "comma-separated names of environment variables (letters, digits and _, "
                f"not starting with a digit); not names: {', '.join(map(repr, bad))}"
            )
        return value


class Settings(BaseSettings):
    """Process settings; only the CLI reads the environment (``JOBRUNNER_*``)."""

    model_config = SettingsConfigDict(env_prefix="JOBRUNNER_", env_nested_delimiter="__")
    kube: KubeSettings = Field(default_factory=KubeSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    azure_queue: AzureQueueSettings = Field(default_factory=AzureQueueSettings)
    executor: Executor = Executor.KUBERNETES
    """Explicit, never guessed: a dispatcher that cannot reach its cluster must fail,
    not quietly run Jobs inside its own pod."""
    local: LocalSettings = Field(default_factory=LocalSettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    otel_traces_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "JOBRUNNER_OTEL_TRACES_ENDPOINT"
        ),
    )
    """OpenTelemetry's standard variable, honoured when telemetry.otlp_endpoint is unset."""
    log_level: str = "INFO"
    log_json: bool = False
