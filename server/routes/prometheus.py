"""``GET /metrics``: Prometheus text format, read from the store at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from avgctl.server.autopilot import Autopilot
from avgctl.server.commands import CommandService
from avgctl.server.deps import AutopilotDep, CommandsDep, StoreDep
from avgctl.server.store import Store

router = APIRouter(tags=["prometheus"])


class StoreCollector(Collector):
    """Per-job gauges built from the store on each scrape (no state to keep in sync)."""

    def __init__(self, store: Store, autopilot: Autopilot | None = None, commands: CommandService | None = None):
        self.store = store
        self.autopilot = autopilot
        self.commands = commands

    def collect(self) -> Iterator:
        step = GaugeMetricFamily("avgctl_job_step", "Latest step reported by any rank", labels=["job"])
        period = GaugeMetricFamily("avgctl_job_period", "Averaging period (whole group)", labels=["job"])
        mean = GaugeMetricFamily("avgctl_job_divergence_mean", "Mean divergence at the last round", labels=["job"])
        mx = GaugeMetricFamily("avgctl_job_divergence_max", "Max divergence at the last round", labels=["job"])
        ranks = GaugeMetricFamily("avgctl_job_connected_ranks", "Ranks connected now", labels=["job"])
        commands = GaugeMetricFamily("avgctl_job_commands", "Commands by status", labels=["job", "status"])
        dropped = CounterMetricFamily(
            "avgctl_job_dropped_records", "Metric records the workers' links dropped", labels=["job"]
        )
        for job in self.store.stats():
            jid = job["job_id"]
            step.add_metric([jid], job["step"])
            period.add_metric([jid], job["period"])
            if job["divergence_mean"] is not None:
                mean.add_metric([jid], job["divergence_mean"])
                mx.add_metric([jid], job["divergence_max"])
            ranks.add_metric([jid], job["connected_ranks"])
            for status in ("pending", "applied", "rejected"):
                commands.add_metric([jid, status], job["commands"].get(status, 0))
            dropped.add_metric([jid], job["dropped"])
        server_dropped = CounterMetricFamily(
            "avgctl_dropped_metric_batches",
            "Metric batches the server did not store (and did not confirm, so their links sent them"
            " again): its writer fell behind, or its writer process died; kept across restarts",
        )
        server_dropped.add_metric([], self.store.dropped_batches)
        errors = CounterMetricFamily(
            "avgctl_autopilot_errors",
            "Errors of the autopilot, each of which suspended it for the job, since the server started",
            labels=["job"],
        )
        for jid, count in sorted((self.autopilot.errors if self.autopilot is not None else {}).items()):
            errors.add_metric([jid], count)
        ignored = CounterMetricFamily(
            "avgctl_ignored_acks",
            "Acks for a command id not delivered to the connection that sent them (or no longer pending),"
            " ignored, since the server started",
        )
        ignored.add_metric([], self.commands.ignored_acks if self.commands is not None else 0)
        yield from (step, period, mean, mx, ranks, commands, dropped, server_dropped, errors, ignored)


def registry_for(
    store: Store, autopilot: Autopilot | None = None, commands: CommandService | None = None
) -> CollectorRegistry:
    """A registry per app (not the global one), so several apps can live in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, autopilot, commands))
    return registry


@router.get("/metrics", response_class=Response)
def prometheus(store: StoreDep, autopilot: AutopilotDep, commands: CommandsDep) -> Response:
    """All jobs' figures in Prometheus text format."""
    return Response(generate_latest(registry_for(store, autopilot, commands)), media_type=CONTENT_TYPE_LATEST)
