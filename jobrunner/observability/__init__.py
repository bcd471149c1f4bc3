"""Seeing the dispatcher from outside: traces, metrics and logs (``telemetry``) and the
HTTP endpoints ``/metrics``, ``/healthz`` and ``/readyz`` (``httpserver``).

Must not import: dispatch, the adapters, the operator, the command line; nothing a
server answers or a credential reaches an exported name or label (``core.redaction``).
"""
