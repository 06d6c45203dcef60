"""The coordinator's Prometheus metrics of platform state, read from the store at
scrape time: jobs, rounds and tasks by state, updates by status (accepted, late, ...),
task latency (delivered -> answered), devices and their sync lag, open incidents by
priority, monitoring windows received. Counts and durations only: no tenant data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from consortia.store.sqlstore import SqlStore

__all__ = ["StateCollector"]

TASK_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class StateCollector(Collector):
    def __init__(self, store: SqlStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        snap = self.store.metrics_snapshot()
        for name, doc, labels, key in (
            ("consortia_jobs", "Jobs by state", ["state"], "jobs"),
            ("consortia_rounds", "Rounds by kind and state", ["kind", "state"], "rounds"),
            (
                "consortia_tasks",
                "Site tasks by round kind and state (refused, failed, late included)",
                ["kind", "state"],
                "tasks",
            ),
            ("consortia_updates", "Model updates received, by status", ["status"], "updates"),
            ("consortia_devices", "Enrolled devices by status", ["status"], "devices"),
            ("consortia_incidents", "Incidents by state and priority", ["state", "priority"], "incidents"),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            for values, count in sorted(snap[key].items()):
                g.add_metric([str(v) for v in values], count)
            yield g
        yield GaugeMetricFamily(
            "consortia_monitoring_windows", "Monitoring windows received from serving agents", value=snap["windows"]
        )
        yield GaugeMetricFamily(
            "consortia_devices_out_of_sync",
            "Devices serving something other than the release they were told to run (sync lag)",
            value=snap["devices_out_of_sync"],
        )
        yield GaugeMetricFamily(
            "consortia_device_report_age_max_seconds",
            "Seconds since the stalest active device last reported",
            value=snap["device_report_age_max"],
        )
        h = HistogramMetricFamily(
            "consortia_task_duration_seconds",
            "Site task latency, delivered to answered (recent tasks)",
            labels=["kind"],
        )
        by_kind: dict[str, list[float]] = {}
        for kind, seconds in snap["task_seconds"]:
            by_kind.setdefault(kind, []).append(seconds)
        for kind, values in sorted(by_kind.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in TASK_BUCKETS] + [("+Inf", len(values))]
            h.add_metric([kind], buckets, sum(values))
        yield h
