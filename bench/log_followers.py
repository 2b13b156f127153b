"""List latency of deploy-agent with many idle `logs?follow=true` streams open, against none.

Usage: .venv/bin/python bench/log_followers.py [--followers N] [--deployments K] [--requests M]
           [--source DIR] [--old-config]

Starts an agent, submits K deployments of one application (one builds `sleep 600`, the rest
wait in the queue: all stay non-final and their logs idle), measures the latency of
`GET /v1/deployments` (M requests, one at a time), opens N follow streams spread over the K
deployments, lets them settle, and measures again. Prints the medians, p95s, their ratio and
the agent's CPU use while the streams idle. `--source DIR` runs the agent from another
checkout (e.g. `git archive HEAD | tar -x -C DIR`) to compare; `--old-config` leaves out the
follower and connection caps that a checkout before them does not know.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import requests

TOKEN = "bench-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_agent(state: Path, followers: int, source: Path | None, old_config: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    limits = (
        ""
        if old_config
        else f"max_log_followers = {followers + 10}\nmax_log_followers_per_token = {followers + 10}\n"
        f"max_connections = {followers + 100}\n"
    )
    config = state.parent / "bench-agent.toml"
    config.write_text(
        f'[agent]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{state}"\nmax_concurrent = 1\nmax_queued = 1000\n'
        f"{limits}\n"
        f'[[auth.tokens]]\nname = "bench"\ntoken = "{TOKEN}"\nscopes = ["admin"]\n'
    )
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        cwd=source or Path.cwd(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", headers=HEADERS, timeout=1).ok:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the agent did not start")


async def list_latencies(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.get(f"{url}/v1/deployments", headers=HEADERS) as response:
            await response.read()
            assert response.status == 200, response.status
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def summary(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.95) - 1]


async def measure(url: str, agent_pid: int, followers: int, deployment_ids: list[str], requests_count: int) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await list_latencies(session, url, 10)  # warm up
        baseline = summary(await list_latencies(session, url, requests_count))
        streams = []
        for index in range(followers):
            deployment_id = deployment_ids[index % len(deployment_ids)]
            response = await session.get(
                f"{url}/v1/deployments/{deployment_id}/logs", params={"follow": "true"}, headers=HEADERS
            )
            if response.status != 200:
                raise SystemExit(f"follow stream {index} answered {response.status}: {await response.text()}")
            streams.append(response)
        await asyncio.sleep(3)  # every stream has read its log and sleeps
        agent = psutil.Process(agent_pid)
        agent.cpu_percent()
        await asyncio.sleep(5)
        idle_cpu = agent.cpu_percent()
        loaded = summary(await list_latencies(session, url, requests_count))
        for response in streams:
            response.close()
    print(f"followers: {followers} over {len(deployment_ids)} deployment(s)")
    print(f"list latency without followers: median {baseline[0]:.1f} ms, p95 {baseline[1]:.1f} ms")
    print(f"list latency with followers:    median {loaded[0]:.1f} ms, p95 {loaded[1]:.1f} ms")
    print(f"ratio (median): {loaded[0] / baseline[0]:.2f}; (p95): {loaded[1] / baseline[1]:.2f}")
    print(f"agent CPU while the streams idle: {idle_cpu:.1f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--deployments", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--source", type=Path, default=None, help="run the agent from this checkout")
    parser.add_argument("--old-config", action="store_true", help="no follower or connection caps in the config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-followers-") as tmp:
        state = Path(tmp) / "state"
        process, url = start_agent(state, args.followers, args.source, args.old_config)
        ids: list[str] = []
        try:
            for _ in range(args.deployments):
                body = {"application": "bench", "build": {"image": "local/busybox", "command": "echo start; sleep 600"}}
                response = requests.post(f"{url}/v1/deployments", json=body, headers=HEADERS, timeout=10)
                response.raise_for_status()
                ids.append(response.json()["id"])
            asyncio.run(measure(url, process.pid, args.followers, ids, args.requests))
        finally:
            for deployment_id in ids:
                requests.post(f"{url}/v1/deployments/{deployment_id}/kill", headers=HEADERS, timeout=30)
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
