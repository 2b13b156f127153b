"""Schemathesis against a live agent, from the agent's own /v1/openapi.json.

Every operation gets generated requests, valid and invalid, including chains that follow the
document's links (submit, then get / kill / rollback / patch / delete the new deployment). The
checks: no 5xx, every status code and header documented, every body matching its schema (errors
in the envelope). The agent runs with the default security settings, as a fuzzer deserves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import requests

from tests.e2e.conftest import ADMIN_TOKEN, AgentProcess

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    )
)


@pytest.mark.timeout(900)
def test_the_api_answers_generated_requests_as_its_document_says(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = agent_factory(security={})
    document = requests.get(f"{agent.url}/v1/openapi.json", timeout=10)
    assert document.status_code == 200 and document.json()["openapi"].startswith("3.1")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.fuzz.hooks", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{agent.url}/v1/openapi.json",
        "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        "--checks", CHECKS,
        "--max-examples", "25",
        "--request-timeout", "30",
        "--generation-database", "none",
        "--seed", os.environ.get("FUZZ_SEED", "20261203"),
        "--no-color",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    assert "generated" in report and " passed" in report, report
    # The agent is still well after it all.
    assert requests.get(f"{agent.url}/healthz", timeout=10).status_code == 200
