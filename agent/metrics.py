"""Prometheus metrics: builds, deployments, releases, health checks and HTTP requests, plus gauges
filled at scrape time (store counts, the callback outbox, SSH connections) and the process's own."""

from __future__ import annotations

import platform
from typing import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from agent import __version__
from agent.models import FINAL_STATUSES, STATUSES

# A `_created` series per counter doubles what a scraper stores for a timestamp nobody graphs.
disable_created_metrics()

__all__ = ["CONTENT_TYPE_LATEST", "BUILD_OUTCOMES", "Metrics"]

BUILD_OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
# Builds take seconds to an hour (the default timeout is 600 s).
_BUILD_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
# API answers take a millisecond; a long poll or a followed log holds for up to a minute or more.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30, 60, float("inf"))
RELEASE_OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "cancelled")
HEALTH_RESULTS: tuple[str, ...] = ("passed", "failed")


class Metrics:
    """The agent's metrics in a registry of their own, so that several agents can share a process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        build_info = Gauge(
            "deploy_agent_build_info", "The agent's version and Python; always 1.", ["version", "python"],
            registry=self.registry,
        )
        build_info.labels(version=__version__, python=platform.python_version()).set(1)
        self._requests = Histogram(
            "deploy_agent_http_request_duration_seconds",
            "Time to answer API requests, by route (its path template), method and status.",
            ["route", "method", "status"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, int], Histogram] = {}
        self._releases = Counter(
            "deploy_agent_releases",
            "Releases that were started and ended, by outcome (succeeded: promoted into service).",
            ["outcome"],
            registry=self.registry,
        )
        self._health_checks = Counter(
            "deploy_agent_health_checks",
            "Health checks of new releases that ended, by result.",
            ["result"],
            registry=self.registry,
        )
        self._callback_depth = Gauge(
            "deploy_agent_callback_outbox_depth", "Status callbacks waiting to be delivered.", registry=self.registry
        )
        self._server_connected = Gauge(
            "deploy_agent_server_connected",
            "1 while the agent holds an open SSH connection to the server, else 0.",
            ["server"],
            registry=self.registry,
        )
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
        for outcome in RELEASE_OUTCOMES:
            self._releases.labels(outcome=outcome)
        for result in HEALTH_RESULTS:
            self._health_checks.labels(result=result)

    def observe_build(self, seconds: float, outcome: str) -> None:
        """Records one build's wall time; `outcome` is succeeded, failed or cancelled."""
        self._build_duration.labels(outcome=outcome).observe(max(0.0, seconds))

    def count_finished(self, status: str) -> None:
        """Counts a deployment that reached the final `status`."""
        self._finished.labels(status=status).inc()

    def count_release(self, outcome: str) -> None:
        """Counts a release that ended: succeeded (promoted), failed or cancelled."""
        self._releases.labels(outcome=outcome).inc()

    def count_health_check(self, passed: bool) -> None:
        self._health_checks.labels(result="passed" if passed else "failed").inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # labels() validates and locks on every call; the (route, method, status) set is small and fixed.
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(route=route, method=method, status=str(status))
        child.observe(max(0.0, seconds))

    def render(
        self,
        status_counts: Mapping[str, int],
        queue_depth: int,
        running: int,
        callback_depth: int = 0,
        servers_connected: Mapping[str, bool] | None = None,
    ) -> bytes:
        """The Prometheus text exposition of every metric, with the gauges set from the arguments."""
        for status in STATUSES:
            self._deployments.labels(status=status).set(status_counts.get(status, 0))
        self._queue_depth.set(queue_depth)
        self._running.set(running)
        self._callback_depth.set(callback_depth)
        self._server_connected.clear()  # a server removed by a reload leaves the series
        for name, connected in (servers_connected or {}).items():
            self._server_connected.labels(server=name).set(1 if connected else 0)
        return generate_latest(self.registry)
