"""API latency while four builds print flat out: the agent against a bare aiohttp handler.

Usage: .venv/bin/python bench/api_under_load.py [--rate 1000] [--seconds 10] [--rounds 3]

Four builds run `yes` through the agent the whole time (the load is the same for both). Then,
interleaved round by round, the same open-loop generator sends `rate` requests/s to
`GET /v1/deployments/{id}`, to a 50-row `GET /v1/deployments`, and to a bare aiohttp handler
that answers the same bytes (one for the deployment, one for the page). Prints p50/p99 and
the agent/bare ratio of p99.
"""

from __future__ import annotations

import argparse
import time

import requests

from common import AUTH, IMAGE, YES_COMMAND, Agent, BareServer, ms, open_loop, percentile, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    agent = Agent().start()
    bare_one = bare_page = None
    try:
        for index in range(60):
            agent.submit({"application": f"history{index % 5}", "build": {"image": IMAGE, "command": "true"}})
        target = agent.submit({"application": "target", "build": {"image": IMAGE, "command": "true"}})
        agent.wait_final(target["id"])
        one = requests.get(f"{agent.url}/v1/deployments/{target['id']}", headers=AUTH).content
        page = requests.get(f"{agent.url}/v1/deployments?limit=50", headers=AUTH).content
        bare_one, bare_page = BareServer(one), BareServer(page)
        for index in range(4):
            agent.submit({"application": f"noisy{index}", "build": {"image": IMAGE, "command": YES_COMMAND, "timeout_s": 3600}})
        time.sleep(3)  # the builds are printing
        results: dict[str, list[float]] = {name: [] for name in ("agent one", "bare one", "agent list", "bare list")}
        for _ in range(args.rounds):
            urls = {
                "agent one": f"{agent.url}/v1/deployments/{target['id']}",
                "bare one": f"{bare_one.url}/fixed",
                "agent list": f"{agent.url}/v1/deployments?limit=50",
                "bare list": f"{bare_page.url}/fixed",
            }
            for name, url in urls.items():
                results[name] += open_loop(url, args.rate, args.seconds)
        print(f"API under four `yes` builds, {args.rate:g} requests/s open loop, {args.rounds} x {args.seconds:g} s each, interleaved")
        for kind in ("one", "list"):
            ours, bare = results[f"agent {kind}"], results[f"bare {kind}"]
            label = "GET /v1/deployments/{id}" if kind == "one" else "GET /v1/deployments?limit=50"
            report(f"{label} p50", ms(percentile(ours, 0.5)), ms(percentile(bare, 0.5)), percentile(ours, 0.5) / percentile(bare, 0.5))
            report(
                f"{label} p99", ms(percentile(ours, 0.99)), ms(percentile(bare, 0.99)),
                percentile(ours, 0.99) / percentile(bare, 0.99), "<= 2x",
            )
    finally:
        agent.stop()
        for server in (bare_one, bare_page):
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
