"""Prometheus metrics: the registry of one agent and its text exposition."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import CONTENT_TYPE_LATEST, Metrics
from agent.models import STATUSES


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (name, sorted labels); parsing it also proves the format."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode("utf-8"))
        for sample in family.samples
    }


def test_render_has_a_gauge_for_every_status_including_zeros() -> None:
    """deploy_agent_deployments has one series per status, 0 for statuses with no deployments."""
    values = samples(Metrics().render({"queued": 3, "failed": 1}, queue_depth=3, running=2))
    for status in STATUSES:
        expected = {"queued": 3.0, "failed": 1.0}.get(status, 0.0)
        assert values[("deploy_agent_deployments", (("status", status),))] == expected, status
    assert values[("deploy_agent_queue_depth", ())] == 3.0
    assert values[("deploy_agent_running_deployments", ())] == 2.0


def test_gauges_follow_the_latest_render() -> None:
    """Each render sets the gauges afresh; a status that emptied drops back to 0."""
    metrics = Metrics()
    metrics.render({"building": 2}, queue_depth=0, running=2)
    values = samples(metrics.render({}, queue_depth=0, running=0))
    assert values[("deploy_agent_deployments", (("status", "building"),))] == 0.0
    assert values[("deploy_agent_running_deployments", ())] == 0.0


def test_build_durations_are_a_histogram_by_outcome() -> None:
    """observe_build feeds deploy_agent_build_duration_seconds, labelled by outcome."""
    metrics = Metrics()
    metrics.observe_build(4.0, "succeeded")
    metrics.observe_build(700.0, "failed")
    values = samples(metrics.render({}, queue_depth=0, running=0))
    assert values[("deploy_agent_build_duration_seconds_count", (("outcome", "succeeded"),))] == 1.0
    assert values[("deploy_agent_build_duration_seconds_sum", (("outcome", "succeeded"),))] == 4.0
    assert values[("deploy_agent_build_duration_seconds_bucket", (("le", "5.0"), ("outcome", "succeeded")))] == 1.0
    assert values[("deploy_agent_build_duration_seconds_bucket", (("le", "600.0"), ("outcome", "failed")))] == 0.0
    assert values[("deploy_agent_build_duration_seconds_count", (("outcome", "cancelled"),))] == 0.0


def test_finished_deployments_are_counted_by_status() -> None:
    """count_finished increments deploy_agent_deployments_finished_total; unseen statuses read 0."""
    metrics = Metrics()
    metrics.count_finished("succeeded")
    metrics.count_finished("succeeded")
    metrics.count_finished("cancelled")
    text = metrics.render({}, queue_depth=0, running=0).decode()
    assert 'deploy_agent_deployments_finished_total{status="succeeded"} 2.0' in text
    assert 'deploy_agent_deployments_finished_total{status="cancelled"} 1.0' in text
    assert 'deploy_agent_deployments_finished_total{status="failed"} 0.0' in text


def test_each_metrics_object_has_its_own_registry() -> None:
    """Two agents in one process (tests) do not collide, and nothing lands in the global registry."""
    first, second = Metrics(), Metrics()
    first.count_finished("failed")
    assert 'deploy_agent_deployments_finished_total{status="failed"} 0.0' in second.render({}, 0, 0).decode()
    assert REGISTRY.get_sample_value("deploy_agent_queue_depth") is None
    assert CONTENT_TYPE_LATEST.startswith("text/plain")
