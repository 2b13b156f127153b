"""A control plane's polling against a real agent: ETags, long polls woken by real status changes, metadata filters."""

from __future__ import annotations

import threading
import time

from tests.e2e.conftest import AgentProcess, build_request


def test_a_long_poll_follows_a_build_through_every_status(agent: AgentProcess) -> None:
    """A poller holding `wait` with its last ETag sees each status as it comes, each answer soon after the change."""
    created = agent.submit(build_request("polled", command="sleep 1; echo done"))
    seen = [created["status"]]
    tag = agent.request("GET", f"/v1/deployments/{created['id']}").headers["ETag"]
    deadline = time.monotonic() + 60
    with agent.session() as poller:
        while seen[-1] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            response = poller.get(
                f"{agent.url}/v1/deployments/{created['id']}?wait=20", headers={"If-None-Match": tag}, timeout=30
            )
            if response.status_code == 304:
                continue
            assert response.status_code == 200, response.text
            tag = response.headers["ETag"]
            status = response.json()["status"]
            if status != seen[-1]:
                seen.append(status)
    assert seen[0] == "queued" and seen[-1] == "succeeded"
    assert "building" in seen


def test_a_long_poll_on_an_empty_page_answers_when_a_deployment_arrives(agent: AgentProcess) -> None:
    """`updated_since` newer than everything plus `wait`: held, then answered with the new deployment."""
    first = agent.submit(build_request("early", command="true"))
    agent.wait_for(first["id"])
    since = agent.get(first["id"])["updated_at"]
    time.sleep(0.01)
    submitted: dict[str, float] = {}

    def submit_later() -> None:
        time.sleep(1.0)
        submitted["at"] = time.monotonic()
        submitted["id"] = agent.submit(build_request("late", command="true"))["id"]

    thread = threading.Thread(target=submit_later)
    thread.start()
    began = time.monotonic()
    response = agent.request("GET", f"/v1/deployments?application=late&updated_since={since}&wait=20")
    answered = time.monotonic()
    thread.join()
    assert response.status_code == 200
    assert [d["id"] for d in response.json()["data"]] == [submitted["id"]]
    assert answered - began >= 0.9
    assert answered - submitted["at"] < 0.5


def test_metadata_filters_all_have_to_match(agent: AgentProcess) -> None:
    """`metadata.KEY=VALUE`, repeatable, combines with the other filters; only string values match."""
    both = agent.submit({**build_request("meta", command="true"), "metadata": {"tenant": "acme", "commit": "abc"}})
    tenant_only = agent.submit({**build_request("meta", command="true"), "metadata": {"tenant": "acme", "n": 1}})
    agent.submit({**build_request("meta", command="true"), "metadata": {"tenant": "other"}})

    def ids(query: str) -> list[str]:
        response = agent.request("GET", f"/v1/deployments?{query}")
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()["data"]]

    assert ids("metadata.tenant=acme") == [tenant_only["id"], both["id"]]
    assert ids("metadata.tenant=acme&metadata.commit=abc") == [both["id"]]
    assert ids("metadata.tenant=acme&application=other") == []
    assert ids("metadata.n=1") == []  # a number is not the string "1"
    assert ids("metadata.missing=x") == []
    bad = agent.request("GET", "/v1/deployments?metadata.=x")
    assert bad.status_code == 400 and "metadata" in bad.json()["error"]["message"]
