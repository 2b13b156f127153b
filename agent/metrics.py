"""Prometheus metrics: build durations and finished deployments, plus gauges filled at scrape time."""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.models import FINAL_STATUSES, STATUSES

__all__ = ["CONTENT_TYPE_LATEST", "BUILD_OUTCOMES", "Metrics"]

BUILD_OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
# Builds take seconds to an hour (the default timeout is 600 s).
_BUILD_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


class Metrics:
    """The agent's metrics in a registry of their own, so that several agents can share a process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._build_duration = Histogram(
            "deploy_agent_build_duration_seconds",
            "Wall time of deployment builds, by outcome.",
            ["outcome"],
            buckets=_BUILD_BUCKETS,
            registry=self.registry,
        )
        self._finished = Counter(
            "deploy_agent_deployments_finished",
            "Deployments that reached a final status since the agent started, by status.",
            ["status"],
            registry=self.registry,
        )
        self._deployments = Gauge(
            "deploy_agent_deployments", "Deployments in the store, by status.", ["status"], registry=self.registry
        )
        self._queue_depth = Gauge(
            "deploy_agent_queue_depth", "Deployments waiting to start.", registry=self.registry
        )
        self._running = Gauge(
            "deploy_agent_running_deployments", "Deployments being carried out right now.", registry=self.registry
        )
        # Every series exists from the start, so a rate() over a fresh agent is 0 rather than absent.
        for outcome in BUILD_OUTCOMES:
            self._build_duration.labels(outcome=outcome)
        for status in sorted(FINAL_STATUSES):
            self._finished.labels(status=status)

    def observe_build(self, seconds: float, outcome: str) -> None:
        """Records one build's wall time; `outcome` is succeeded, failed or cancelled."""
        self._build_duration.labels(outcome=outcome).observe(max(0.0, seconds))

    def count_finished(self, status: str) -> None:
        """Counts a deployment that reached the final `status`."""
        self._finished.labels(status=status).inc()

    def render(self, status_counts: Mapping[str, int], queue_depth: int, running: int) -> bytes:
        """The Prometheus text exposition of every metric, with the gauges set from the arguments."""
        for status in STATUSES:
            self._deployments.labels(status=status).set(status_counts.get(status, 0))
        self._queue_depth.set(queue_depth)
        self._running.set(running)
        return generate_latest(self.registry)
