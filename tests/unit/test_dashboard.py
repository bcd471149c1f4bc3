"""The Grafana dashboard only queries metrics the dispatcher exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from jobrunner.observability.telemetry import Telemetry

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/jobrunner-dashboard.json"


def test_every_dashboard_query_names_an_exported_metric() -> None:
    metrics = Telemetry.create().metrics
    metrics.jobs_created.labels("ns", "sj").inc()  # children make the families appear
    exported = {
        line.split()[2]
        for line in generate_latest(metrics.registry).decode().splitlines()
        if line.startswith("# TYPE")
    }
    names = set()
    for family in exported:
        names.update(
            {family, f"{family}_total", f"{family}_bucket", f"{family}_count", f"{family}_sum"}
        )
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert queries
    for query in queries:
        for used in re.findall(r"\b(jobrunner_[a-z_]+)", query):
            assert used in names, f"{used} is not exported"


def test_every_dashboard_series_keeps_the_namespace_beside_the_scaledjob() -> None:
    """Same-named ScaledJobs of two namespaces are two series: a query that groups or
    filters by ``scaledjob`` alone would add them up."""
    metrics = Telemetry.create().metrics
    exported_labels = {
        label for metric in vars(metrics).values() for label in getattr(metric, "_labelnames", ())
    }
    assert {"namespace", "scaledjob"} <= exported_labels
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "namespace" in variables
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            query = target["expr"]
            for grouping in re.findall(r"by \(([^)]*)\)", query):
                labels = {g.strip() for g in grouping.split(",")}
                assert labels <= exported_labels | {"le"}, query
                if "scaledjob" in labels:
                    assert "namespace" in labels, query
            if 'scaledjob=~"$scaledjob"' in query:
                assert 'namespace=~"$namespace"' in query, query
