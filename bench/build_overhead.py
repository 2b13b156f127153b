"""Build overhead of deploy-agent against bare `docker run`, measured in the same run.

Usage: .venv/bin/python bench/build_overhead.py [--runs N]
Prints the median wall time of a trivial build (`true`) submitted through the
agent (submit → succeeded) and of `docker run --rm --init local/busybox true`,
and their ratio. Also the API's latency percentiles while four builds stream.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

TOKEN = "bench-token-0123456789abcdef"
IMAGE = "local/busybox"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_agent(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = state / "config.toml"
    config.write_text(
        f'[agent]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{state}"\nmax_concurrent = 4\n\n'
        f'[[auth.tokens]]\nname = "bench"\ntoken = "{TOKEN}"\nscopes = ["admin"]\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("agent did not start")


def through_agent(session: requests.Session, url: str, command: str) -> float:
    began = time.monotonic()
    body = {"application": "bench", "build": {"image": IMAGE, "command": command}}
    deployment = session.post(f"{url}/v1/deployments", json=body).json()
    while True:
        state = session.get(f"{url}/v1/deployments/{deployment['id']}").json()
        if state["status"] in {"succeeded", "failed", "cancelled"}:
            assert state["status"] == "succeeded", state
            return time.monotonic() - began
        time.sleep(0.01)


def bare_docker(command: str) -> float:
    began = time.monotonic()
    subprocess.run(["docker", "run", "--rm", "--init", IMAGE, "sh", "-c", command], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - began


def api_latency_under_load(session: requests.Session, url: str) -> list[float]:
    noisy = "i=0; while [ $i -lt 300000 ]; do echo line $i; i=$((i+1)); done"
    ids = [
        session.post(f"{url}/v1/deployments", json={"application": f"noisy{i}", "build": {"image": IMAGE, "command": noisy}}).json()["id"]
        for i in range(4)
    ]
    time.sleep(1)
    latencies = []
    for _ in range(200):
        began = time.monotonic()
        session.get(f"{url}/v1/deployments", params={"limit": 10})
        latencies.append(time.monotonic() - began)
    for deployment_id in ids:
        session.post(f"{url}/v1/deployments/{deployment_id}/kill")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_agent(Path(directory))
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        try:
            through_agent(session, url, "true")  # warm-up
            bare_docker("true")
            agent_times = [through_agent(session, url, "true") for _ in range(args.runs)]
            bare_times = [bare_docker("true") for _ in range(args.runs)]
            latencies = sorted(api_latency_under_load(session, url))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    agent_median = statistics.median(agent_times)
    bare_median = statistics.median(bare_times)
    result = {
        "runs": args.runs,
        "agent_build_median_s": round(agent_median, 3),
        "bare_docker_run_median_s": round(bare_median, 3),
        "ratio_agent_over_bare": round(agent_median / bare_median, 2),
        "api_latency_p50_ms_under_4_streaming_builds": round(latencies[len(latencies) // 2] * 1000, 1),
        "api_latency_p99_ms_under_4_streaming_builds": round(latencies[len(latencies) * 99 // 100] * 1000, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
