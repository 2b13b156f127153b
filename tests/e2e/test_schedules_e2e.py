"""Schedules against the real agent and Docker: runs are real container jobs, triggered on time."""

from __future__ import annotations

import datetime as dt
import signal
import time
from typing import Any, Callable

import docker
import pytest

from tests.conftest import containers_of
from tests.e2e.conftest import FINAL, READ_TOKEN, WRITE_TOKEN, AgentProcess

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def job(command: str) -> dict[str, Any]:
    return {"build": {"image": "local/busybox", "command": command}}


def create(agent: AgentProcess, schedule: dict[str, Any], template: dict[str, Any], **config: Any) -> dict[str, Any]:
    body = {"name": "test", "application": "jobs", "schedule": schedule, "template": template, "config": config}
    response = agent.request("POST", "/v1/schedules", json=body)
    assert response.status_code == 201, response.text
    assert response.headers["Location"] == f"/v1/schedules/{response.json()['id']}"
    return response.json()


def get(agent: AgentProcess, schedule_id: str) -> dict[str, Any]:
    response = agent.request("GET", f"/v1/schedules/{schedule_id}")
    assert response.status_code == 200, response.text
    return response.json()


def runs(agent: AgentProcess, schedule_id: str) -> list[dict[str, Any]]:
    response = agent.request("GET", f"/v1/schedules/{schedule_id}/runs", params={"limit": 500})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def eventually(check: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {check}")
        time.sleep(interval)


def parse(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_an_interval_schedule_runs_real_container_jobs_on_time(agent_factory) -> None:
    agent = agent_factory("interval")
    schedule = create(agent, {"type": "interval", "every_s": 2}, job("echo scheduled run of $HOSTNAME; echo ok"))
    assert schedule["status"] == "active" and schedule["id"].startswith("sch_")
    upcoming = [parse(stamp) for stamp in schedule["upcoming_runs_at"]]
    assert len(upcoming) == 5 and all(b - a == dt.timedelta(seconds=2) for a, b in zip(upcoming, upcoming[1:]))
    assert schedule["stats"]["next_trigger_at"] == schedule["upcoming_runs_at"][0]

    finished = eventually(lambda: [r for r in runs(agent, schedule["id"]) if r["status"] in FINAL][-3:]
                          if sum(r["status"] in FINAL for r in runs(agent, schedule["id"])) >= 3 else None, timeout=40)
    for run in finished:
        assert run["status"] == "succeeded", run
        assert run["schedule_id"] == schedule["id"]
        assert "ok" in agent.log(run["id"])
        # Triggered within a second of its time (the run is created at the trigger).
        lateness = parse(run["created_at"]) - parse(run["schedule_run"]["scheduled_for"])
        assert dt.timedelta(0) <= lateness < dt.timedelta(seconds=1), run
    planned = sorted(parse(run["schedule_run"]["scheduled_for"]) for run in runs(agent, schedule["id"]))
    assert planned[0] == upcoming[0]
    assert all((b - a).total_seconds() % 2 == 0 for a, b in zip(planned, planned[1:]))  # on the grid, no drift

    # The same runs through the deployments list, and the stats agree with them.
    listed = agent.request("GET", "/v1/deployments", params={"schedule_id": schedule["id"], "limit": 500}).json()["data"]
    seen = get(agent, schedule["id"])
    assert {run["id"] for run in listed} >= {run["id"] for run in finished}
    assert seen["stats"]["total_runs"] >= 3 and seen["stats"]["total_failures"] == 0
    assert seen["stats"]["last_run_at"] is not None and seen["stats"]["last_status"] is not None


def test_pause_resume_trigger_and_archive(agent_factory) -> None:
    agent = agent_factory("controls")
    schedule = create(agent, {"type": "cron", "expression": "0 3 * * *", "timezone": "Europe/Paris"}, job("echo manual"))
    sid = schedule["id"]

    paused = agent.request("POST", f"/v1/schedules/{sid}/pause").json()
    assert paused["status"] == "paused" and paused["upcoming_runs_at"] == [] and paused["stats"]["next_trigger_at"] is None
    assert paused["paused_reason"]
    listed = agent.request("GET", "/v1/schedules", params={"status": "paused"}).json()
    assert [item["id"] for item in listed["data"]] == [sid] and listed["next_cursor"] is None

    triggered = agent.request("POST", f"/v1/schedules/{sid}/trigger", headers={"Idempotency-Key": "t-1"})
    assert triggered.status_code == 201, triggered.text
    run = triggered.json()
    assert run["schedule_id"] == sid and triggered.headers["Location"] == f"/v1/deployments/{run['id']}"
    repeated = agent.request("POST", f"/v1/schedules/{sid}/trigger", headers={"Idempotency-Key": "t-1"})
    assert repeated.status_code == 200 and repeated.json()["id"] == run["id"]
    assert agent.wait_for(run["id"])["status"] == "succeeded"
    assert "manual" in agent.log(run["id"])

    resumed = agent.request("POST", f"/v1/schedules/{sid}/resume").json()
    assert resumed["status"] == "active" and resumed["paused_reason"] is None
    first = parse(resumed["upcoming_runs_at"][0]).astimezone(dt.timezone(dt.timedelta(hours=0)))
    assert len(resumed["upcoming_runs_at"]) == 5 and first > dt.datetime.now(dt.timezone.utc)

    assert agent.request("DELETE", f"/v1/schedules/{sid}").status_code == 204
    archived = get(agent, sid)
    assert archived["archived_at"] is not None and archived["upcoming_runs_at"] == []
    assert sid not in [item["id"] for item in agent.request("GET", "/v1/schedules").json()["data"]]
    assert sid in [item["id"] for item in agent.request("GET", "/v1/schedules", params={"status": "archived"}).json()["data"]]
    refused = agent.request("POST", f"/v1/schedules/{sid}/trigger")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "archived"
    assert [item["id"] for item in runs(agent, sid)] == [run["id"]]  # its runs are kept


def test_a_failing_schedule_retries_then_pauses_itself(agent_factory) -> None:
    agent = agent_factory("failing")
    schedule = create(agent, {"type": "interval", "every_s": 1}, job("echo failing; exit 3"),
                      max_retries=1, retry_backoff_s=0.2, pause_after_failures=3)
    sid = schedule["id"]
    paused = eventually(lambda: (s := get(agent, sid))["status"] == "paused" and s, timeout=60)
    assert "3 consecutive failed runs" in paused["paused_reason"], paused
    assert paused["paused_at"] is not None and paused["upcoming_runs_at"] == []
    time.sleep(3)  # paused: nothing more starts
    found = runs(agent, sid)
    eventually(lambda: all(r["status"] in FINAL for r in runs(agent, sid)))
    assert len(runs(agent, sid)) == len(found)
    assert all(r["status"] == "failed" and r["error"]["type"] == "build_failed" and r["exit_code"] == 3 for r in found)
    retries = [r for r in found if r["retry_of"] is not None]
    assert retries, found
    by_id = {r["id"]: r for r in found}
    for retry in retries:
        assert retry["schedule_run"]["attempt"] == 2 and by_id[retry["retry_of"]]["schedule_run"]["attempt"] == 1
    stats = get(agent, sid)["stats"]
    assert stats["consecutive_failures"] == 3 and stats["total_failures"] == len(found) == stats["total_runs"]


def test_a_run_past_its_timeout_is_killed_and_fails(agent_factory, docker_client: docker.DockerClient) -> None:
    agent = agent_factory("timeout")
    schedule = create(agent, {"type": "interval", "every_s": 3600}, job("echo started; sleep 60"), timeout_s=2)
    run = agent.request("POST", f"/v1/schedules/{schedule['id']}/trigger").json()
    final = agent.wait_for(run["id"], timeout=30)
    assert final["status"] == "failed" and final["error"]["type"] == "timeout", final
    assert "timeout_s" in final["error"]["message"]
    ran = parse(final["finished_at"]) - parse(final["started_at"])
    assert dt.timedelta(seconds=2) <= ran < dt.timedelta(seconds=10), final
    # Listed sparse: a full list inspects each container afterwards, and one being removed is gone by then.
    label = {"label": f"deploy-agent.deployment={run['id']}"}
    assert docker_client.containers.list(all=True, sparse=True, filters=label) == []
    assert get(agent, schedule["id"])["stats"]["last_status"] == "failed"


def test_a_run_in_progress_is_readopted_after_a_restart(agent_factory, docker_client: docker.DockerClient) -> None:
    agent = agent_factory("restart")
    schedule = create(agent, {"type": "interval", "every_s": 3600}, job("echo before; sleep 4; echo after"))
    run = agent.request("POST", f"/v1/schedules/{schedule['id']}/trigger").json()
    agent.wait_for(run["id"], lambda d: d["status"] == "building" and d["container_id"])
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    agent.start()
    final = agent.wait_for(run["id"])
    assert final["status"] == "succeeded", final
    log = agent.log(run["id"])
    assert "before" in log and "after" in log
    seen = get(agent, schedule["id"])
    assert seen["status"] == "active" and seen["stats"]["last_status"] == "succeeded"
    assert seen["stats"]["total_runs"] == 1 and [r["id"] for r in runs(agent, schedule["id"])] == [run["id"]]
    assert containers_of(docker_client, run["id"]) == []


@pytest.mark.parametrize(("policy", "expected"), [("skip", 0), ("run_once", 1)])
def test_triggers_missed_while_the_agent_was_down_follow_missed(agent_factory, policy: str, expected: int) -> None:
    agent = agent_factory(f"missed-{policy}")
    # max_concurrent high enough that a run left in progress by the stop cannot skip the missed one.
    schedule = create(agent, {"type": "interval", "every_s": 2}, job("echo tick"), missed=policy, max_concurrent=10)
    sid = schedule["id"]
    eventually(lambda: len(runs(agent, sid)) >= 1, timeout=10)
    agent.stop(signal.SIGTERM)
    time.sleep(6)  # three triggers fall while it is down
    started = dt.datetime.now(dt.timezone.utc)
    agent.start()
    time.sleep(1.0)
    after_start = [r for r in runs(agent, sid) if parse(r["created_at"]) >= started]
    missed = [r for r in after_start if r["schedule_run"]["reason"] == "missed"]
    assert len(missed) == expected, after_start
    # Never a burst: besides the one missed run, only the triggers due since the start.
    assert len(after_start) <= expected + 1, after_start
    stats = get(agent, sid)["stats"]
    assert stats["missed_runs"] >= 2, stats


def test_schedules_are_validated_and_idempotent(agent_factory) -> None:
    agent = agent_factory("validation")
    bad = {"application": "jobs", "schedule": {"type": "cron", "expression": "61 * * *", "timezone": "Mars/Base"},
           "template": {"build": {"image": "local/busybox"}}, "config": {"missed": "always"}}
    response = agent.request("POST", "/v1/schedules", json=bad)
    assert response.status_code == 422, response.text
    fields = {problem["field"] for problem in response.json()["error"]["details"]}
    assert {"schedule.expression", "schedule.timezone", "config.missed", "template.build.command"} <= fields, fields
    interval = {"application": "jobs", "schedule": {"type": "interval", "every_s": 0}, "template": {}}
    assert agent.request("POST", "/v1/schedules", json=interval).status_code == 422
    good = {"application": "jobs", "schedule": {"type": "interval", "every_s": 600}, "template": job("echo hi")}
    first = agent.request("POST", "/v1/schedules", json=good, headers={"Idempotency-Key": "s-1"})
    second = agent.request("POST", "/v1/schedules", json=good, headers={"Idempotency-Key": "s-1"})
    other = agent.request("POST", "/v1/schedules", json={**good, "name": "other"}, headers={"Idempotency-Key": "s-1"})
    assert (first.status_code, second.status_code, other.status_code) == (201, 200, 409)
    assert first.json()["id"] == second.json()["id"]
    patched = agent.request("PATCH", f"/v1/schedules/{first.json()['id']}", json={"config": {"max_concurrent": 2},
                                                                               "name": "renamed"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["config"]["max_concurrent"] == 2 and patched.json()["name"] == "renamed"
    wrong = agent.request("PATCH", f"/v1/schedules/{first.json()['id']}", json={"application": "other"})
    assert wrong.status_code == 422
    secret = {**good, "template": {"build": {"image": "local/busybox", "command": "true", "env": {"TOKEN": "hunter2-secret"}}}}
    shown = agent.request("POST", "/v1/schedules", json=secret)
    assert shown.status_code == 201 and "hunter2-secret" not in shown.text
    assert shown.json()["template"]["build"]["env"] == {"TOKEN": "***"}
    assert agent.request("GET", "/v1/schedules/sch_unknown").status_code == 404
    # A template holds only what its creator could submit: a host process needs processes:write.
    process = {**good, "template": {"run": {"runtime": "process", "command": "sleep 60"}}}
    refused = agent.request("POST", "/v1/schedules", json=process, token=WRITE_TOKEN)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden", refused.text
    assert "template.run.runtime" in refused.text
    assert agent.request("POST", "/v1/schedules", json=good, token=READ_TOKEN).status_code == 403
