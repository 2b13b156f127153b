"""The contract's integration details on a real agent: PATCH of metadata, Idempotency-Key on rollback."""

from __future__ import annotations

import subprocess

from tests.e2e.conftest import READ_TOKEN, AgentProcess, build_request
from tests.e2e.test_releases import deploy, web_request


def test_patch_replaces_the_metadata_and_changes_the_tag(agent: AgentProcess) -> None:
    created = agent.submit({**build_request("patched", command="true"), "metadata": {"tenant": "acme", "old": "x"}})
    agent.wait_for(created["id"])
    before = agent.request("GET", f"/v1/deployments/{created['id']}")
    response = agent.request("PATCH", f"/v1/deployments/{created['id']}", json={"metadata": {"tenant": "acme", "commit": "abc"}})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"tenant": "acme", "commit": "abc"}
    assert response.json()["status"] == "succeeded"
    shown = agent.request("GET", f"/v1/deployments/{created['id']}", headers={"If-None-Match": before.headers["ETag"]})
    assert shown.status_code == 200 and shown.json()["metadata"] == {"tenant": "acme", "commit": "abc"}
    listed = agent.request("GET", "/v1/deployments?metadata.commit=abc").json()["data"]
    assert [d["id"] for d in listed] == [created["id"]]


def test_patch_refuses_anything_but_metadata(agent: AgentProcess) -> None:
    created = agent.submit(build_request("patched2", command="true"))
    path = f"/v1/deployments/{created['id']}"
    other = agent.request("PATCH", path, json={"metadata": {}, "status": "failed"})
    assert other.status_code == 422
    assert [p["field"] for p in other.json()["error"]["details"]] == ["status"]
    missing = agent.request("PATCH", path, json={})
    assert missing.status_code == 422 and missing.json()["error"]["details"][0]["field"] == "metadata"
    too_big = agent.request("PATCH", path, json={"metadata": {"x": "y" * 20000}})
    assert too_big.status_code == 422
    not_object = agent.request("PATCH", path, json=["metadata"])
    assert not_object.status_code == 422
    assert agent.request("PATCH", "/v1/deployments/dep_nope", json={"metadata": {}}).status_code == 404
    assert agent.request("PATCH", path, json={"metadata": {}}, token=READ_TOKEN).status_code == 403
    assert agent.get(created["id"])["metadata"] == {}


def test_rollback_with_an_idempotency_key_is_made_once(agent: AgentProcess) -> None:
    first = deploy(agent, web_request("v1", "idem"))
    deploy(agent, web_request("v2", "idem"))
    headers = {"Idempotency-Key": "rollback-idem-1"}
    created = agent.request("POST", f"/v1/deployments/{first['id']}/rollback", headers=headers)
    assert created.status_code == 201, created.text
    repeated = agent.request("POST", f"/v1/deployments/{first['id']}/rollback", headers=headers)
    assert repeated.status_code == 200 and repeated.json()["id"] == created.json()["id"]
    assert repeated.json()["rollback_of"] == first["id"]
    # The same key for another request: 409.
    reused = agent.request("POST", "/v1/deployments", json=build_request("idem2"), headers=headers)
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"
    rollbacks = [d for d in agent.request("GET", "/v1/deployments?application=idem").json()["data"] if d["rollback_of"]]
    assert len(rollbacks) == 1
    agent.wait_for(created.json()["id"])


def test_metrics_count_releases_and_health_checks_and_pass_promtool(agent: AgentProcess) -> None:
    """A promoted release and its passed health check are counted; the exposition passes `promtool check metrics`."""
    deploy(agent, web_request("v1", "counted"))
    text = agent.request("GET", "/metrics").text
    assert 'deploy_agent_releases_total{outcome="succeeded"} 1.0' in text
    assert 'deploy_agent_health_checks_total{result="passed"} 1.0' in text
    assert 'route="/v1/deployments",status="201"' in text
    assert "process_cpu_seconds_total" in text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked
