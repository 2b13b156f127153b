"""The pure parts of copying a swarm service's task output: Docker's log lines and where a re-adopted rollout resumes."""

from __future__ import annotations

from pathlib import Path

from agent.logs import DeploymentLog, parse_log_line
from agent.runtimes.swarm_logs import RESUME_OVERLAP_S, parse_line, parse_nanoseconds, resume_point

DETAILS = "com.docker.swarm.node.id=n1,com.docker.swarm.service.id=s1,com.docker.swarm.task.id=t1"


def test_docker_stamps_keep_every_nanosecond() -> None:
    """Go trims trailing zeros of RFC3339Nano: the digits count from the left."""
    assert parse_nanoseconds("1970-01-01T00:00:01.5Z") == 1_500_000_000
    assert parse_nanoseconds("1970-01-01T00:00:01.000000007Z") == 1_000_000_007
    assert parse_nanoseconds("1970-01-01T00:00:02Z") == 2_000_000_000
    for bad in ("", "yesterday", "1970-01-01T00:00:01.5", "1970-01-01T00:00:01.x5Z"):
        assert parse_nanoseconds(bad) is None


def test_a_service_log_line_gives_its_task_and_text() -> None:
    line = parse_line(f"1970-01-01T00:00:01.25Z {DETAILS} hello world ", "stderr")
    assert line is not None
    assert (line.nanoseconds, line.stream, line.task_id, line.text) == (1_250_000_000, "stderr", "t1", "hello world ")
    plain = parse_line("1970-01-01T00:00:01Z just text", "stdout")
    assert plain is not None and (plain.task_id, plain.text) == ("", "just text")
    assert parse_line("not a stamp at all", "stdout") is None


def test_a_rollout_with_no_task_line_yet_resumes_from_its_start(tmp_path: Path) -> None:
    with DeploymentLog(tmp_path / "d.log") as log:
        log.agent("release", "service deploy-agent-x updated")
    point = resume_point(tmp_path / "d.log", 1234.5)
    assert point.since_s == 1234.5 and point.copied == ()


def test_a_rollout_resumes_shortly_before_the_last_task_line_knowing_what_it_copied(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    with DeploymentLog(path) as log:
        log.write_lines("release", "stdout", ["task 1: one", "task 2: two"])
        log.write_lines("release", "stderr", ["task 1: oops"])
        log.agent("recovery", "the agent restarted")
    lines = [parse_log_line(raw) for raw in path.read_text().splitlines()]
    assert all(line is not None for line in lines)
    last = lines[2][0]
    point = resume_point(path, 0.0)
    assert point.copied_until_s == last
    assert point.since_s == last - RESUME_OVERLAP_S
    assert point.copied == (("stdout", "task 1: one"), ("stdout", "task 2: two"), ("stderr", "task 1: oops"))
