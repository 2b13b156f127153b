"""What a control plane costs an agent: ETag polls, idle long polls, submits at 200/s, and idling.

Usage: .venv/bin/python bench/polling.py [--seconds 20]

- a control plane polling 100 agents once a second: what one of them sees is one
  `GET /v1/deployments` a second with a current `If-None-Match` (304), over one kept-alive
  connection; the agent's CPU over at least 30 s (a CPU tick is 10 ms);
- the same polls 100 times a second (`GET /v1/deployments/{id}`, all 304), the agent's CPU
  against a bare aiohttp handler's at that rate: the cost of one poll;
- 1,000 long polls (`?wait=60` with a current tag) held open: the agent's RSS and CPU while they wait;
- `POST /v1/deployments` at 200/s open loop (jobs with no build: each is written, queued, run
  and finished, with synchronous=FULL) against a bare aiohttp handler doing one durable
  SQLite insert per request at the same rate;
- an idle agent: RSS and CPU over the run; its RSS against the floor of its stack (a bare aiohttp
  process in the same venv that imports what the agent must: aiohttp, sqlite3, pydantic, the docker
  SDK, structlog, prometheus_client, psutil).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import aiohttp
import psutil
import requests

from common import (
    AUTH, IMAGE, STACK_IMPORTS, Agent, BareServer, cpu_percent_over, installed_python, ms, open_loop, percentile, report,
    rss_mib,
)


async def hold_long_polls(url: str, etag: str, count: int, ready: asyncio.Event, release: asyncio.Event) -> int:
    headers = {**AUTH, "If-None-Match": etag}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> int:
            async with session.get(url, params={"wait": "60"}) as response:
                await response.read()
                return response.status

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.sleep(3)  # every request has arrived and is waiting
        ready.set()
        await release.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return count


def long_poll_cost(agent: Agent, deployment_id: str, etag: str, count: int, seconds: float) -> tuple[float, float, float]:
    """(RSS before, RSS while holding `count` long polls, CPU % while they wait)."""
    before = rss_mib(agent.ps)
    loop = asyncio.new_event_loop()
    ready, release = asyncio.Event(), asyncio.Event()
    url = f"{agent.url}/v1/deployments/{deployment_id}"
    thread = threading.Thread(target=loop.run_until_complete, args=(hold_long_polls(url, etag, count, ready, release),))
    thread.start()
    while not ready.is_set():
        time.sleep(0.1)
    holding = rss_mib(agent.ps)
    cpu = cpu_percent_over(agent.ps, seconds)
    loop.call_soon_threadsafe(release.set)
    thread.join()
    loop.close()
    return before, holding, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    agent = Agent().start()
    try:
        time.sleep(2)
        idle_cpu = cpu_percent_over(agent.ps, args.seconds)
        idle_rss = rss_mib(agent.ps)
        floor = BareServer(b"{}", python=installed_python(), imports=STACK_IMPORTS)
        try:
            time.sleep(2)
            floor_rss = rss_mib(psutil.Process(floor.process.pid))
        finally:
            floor.stop()
        created = agent.submit({"application": "polled", "build": {"image": IMAGE, "command": "true"}})
        agent.wait_final(created["id"])
        list_url = f"{agent.url}/v1/deployments"
        list_etag = requests.get(list_url, headers=AUTH).headers["ETag"]
        per_agent_seconds = max(30.0, args.seconds)
        one_a_second: list[float] = []
        slow_poller = threading.Thread(
            target=lambda: one_a_second.extend(
                open_loop(list_url, 1, per_agent_seconds + 2, headers={**AUTH, "If-None-Match": list_etag})
            )
        )
        slow_poller.start()
        time.sleep(1)
        per_agent_cpu = cpu_percent_over(agent.ps, per_agent_seconds)
        slow_poller.join()

        url = f"{agent.url}/v1/deployments/{created['id']}"
        etag = requests.get(url, headers=AUTH).headers["ETag"]

        latencies: list[float] = []
        poller = threading.Thread(
            target=lambda: latencies.extend(open_loop(url, 100, args.seconds, headers={**AUTH, "If-None-Match": etag}))
        )
        poller.start()
        time.sleep(1)
        polling_cpu = cpu_percent_over(agent.ps, args.seconds - 2)
        poller.join()
        bare_poll = BareServer(b"")
        try:
            bare_thread = threading.Thread(target=lambda: open_loop(f"{bare_poll.url}/fixed", 100, args.seconds, headers={}))
            bare_thread.start()
            time.sleep(1)
            bare_cpu = cpu_percent_over(psutil.Process(bare_poll.process.pid), args.seconds - 2)
            bare_thread.join()
        finally:
            bare_poll.stop()
        print("a control plane's cost to one agent")
        report("idle agent: CPU", f"{idle_cpu:.2f} %", target="< 0.2 %")
        report("idle agent: RSS (baseline: its stack, imported and serving)", f"{idle_rss:.1f} MiB", f"{floor_rss:.1f} MiB",
               idle_rss / floor_rss, "< 50 MiB")
        report("1 ETag poll/s (100 agents polled once a second): CPU", f"{per_agent_cpu:.3f} %", target="< 1 % of a core")
        report(
            "100 ETag polls/s (304): agent CPU", f"{polling_cpu:.2f} %", f"{bare_cpu:.2f} %", polling_cpu / max(bare_cpu, 0.01),
        )
        report("CPU per 304 poll", f"{polling_cpu * 10_000 / 100:.0f} µs", f"{bare_cpu * 10_000 / 100:.0f} µs")
        report("100 ETag polls/s (304): p99", ms(percentile(latencies, 0.99)))

        before, holding, waiting_cpu = long_poll_cost(agent, created["id"], etag, 1000, 10)
        report("1,000 idle long polls: RSS growth", f"{holding - before:.1f} MiB", target="< 20 MiB")
        report("1,000 idle long polls: agent CPU while they wait", f"{waiting_cpu:.2f} %", target="no CPU")

        bare = BareServer(b"{}")
        try:
            body = {"application": "submitted", "metadata": {"n": 1}}
            ours = open_loop(f"{agent.url}/v1/deployments", 200, args.seconds / 2, method="POST",
                             body=lambda index: {"application": f"submitted{index % 20}", "metadata": {"n": index}})
            theirs = open_loop(f"{bare.url}/insert", 200, args.seconds / 2, method="POST", body=body, headers={})
        finally:
            bare.stop()
        report("POST at 200/s: p50", ms(percentile(ours, 0.5)), ms(percentile(theirs, 0.5)), percentile(ours, 0.5) / percentile(theirs, 0.5))
        report(
            "POST at 200/s: p99", ms(percentile(ours, 0.99)), ms(percentile(theirs, 0.99)),
            percentile(ours, 0.99) / percentile(theirs, 0.99), "< 20 ms",
        )
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
