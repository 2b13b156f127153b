"""Cost that could grow with history or queue: 100,000 deployments in the store, 1,000 queued.

Usage: .venv/bin/python bench/history.py [--rows 100000] [--queued 1000]

Fills a store with ROWS finished deployments (copies of a real one, 50 applications, one in ten
failed), then measures the agent's startup, every list query (p50 of 50 each), /metrics and RSS,
against the same agent with an empty store. Then POST latency from an empty queue to QUEUED
waiting deployments (all of one application, behind a running build), against a bare aiohttp
handler that does one durable SQLite insert per request.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

import requests

from common import AUTH, IMAGE, ROOT, Agent, BareServer, median, ms, percentile, report, rss_mib

sys.path.insert(0, str(ROOT))  # the agent's own cursor encoding, to ask for a deep page
from agent.api.cursor import encode_cursor  # noqa: E402

OLD = "2020-01-01T00:00:00.000Z"
FUTURE = "2099-01-01T00:00:00.000Z"


def fill(database: Path, rows: int) -> int:
    """Copies the one deployment in the store `rows` times; returns the largest seq."""
    with sqlite3.connect(database) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(deployments)") if row[1] not in ("seq", "idempotency_key")]
        values = {name: name for name in columns}
        values.update(
            id="printf('dep_%026d', n.i)",
            application="'app' || (n.i % 50)",
            status="CASE WHEN n.i % 10 = 0 THEN 'failed' ELSE 'succeeded' END",
            updated_at=f"'{OLD}'",
            created_at=f"'{OLD}'",
            # metadata lives in the spec: one tenant in a hundred per value
            spec="json_set(spec, '$.metadata.tenant', 't' || (n.i % 100))",
        )
        select = ", ".join(values[name] for name in columns)
        db.execute(
            f"""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
                INSERT INTO deployments ({", ".join(columns)})
                SELECT {select} FROM n, (SELECT * FROM deployments LIMIT 1)"""
        )
        return db.execute("SELECT MAX(seq) FROM deployments").fetchone()[0]


def timed(method: str, url: str, count: int, expected: int, headers: dict[str, str], **options: object) -> list[float]:
    """Latencies of `count` requests one after another on one keep-alive session."""
    session = requests.Session()
    session.headers.update(headers)
    times = []
    for _ in range(count):
        began = time.perf_counter()
        response = session.request(method, url, **options)  # type: ignore[arg-type]
        times.append(time.perf_counter() - began)
        assert response.status_code == expected, response.text
    return times


def query_p50(url: str, params: dict[str, str], count: int = 50) -> float:
    return median(timed("GET", url, count, 200, AUTH, params=params))


def lists(agent: Agent, max_seq: int) -> dict[str, float]:
    url = f"{agent.url}/v1/deployments"
    queries = {
        "newest 50": {},
        "application=app7": {"application": "app7"},
        "status=failed": {"status": "failed"},
        "server=local": {"server": "local"},
        "updated_since newer than all": {"updated_since": FUTURE},
        "deep cursor (row 90%)": {"cursor": encode_cursor(max(1, max_seq // 10)) or ""},
        "metadata.tenant=t7 (1 row in 100)": {"metadata.tenant": "t7"},
        "metadata.tenant=none (no row matches)": {"metadata.tenant": "none"},
    }
    return {name: query_p50(url, params) for name, params in queries.items()}


def post_latency(url: str, count: int, body: dict, headers: dict[str, str]) -> list[float]:
    return timed("POST", url, count, 201, headers, json=body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=1000)
    args = parser.parse_args()

    empty = Agent().start()
    try:
        empty_lists = lists(empty, 1)
        empty_metrics = query_p50(f"{empty.url}/metrics", {})
        empty_rss = rss_mib(empty.ps)
        empty_startup = empty.startup_s
    finally:
        empty.stop()

    agent = Agent().start()
    first = agent.submit({"application": "seed", "build": {"image": IMAGE, "command": "true"}, "metadata": {"tenant": "t0"}})
    agent.wait_final(first["id"])
    agent.process.terminate()  # type: ignore[union-attr]
    agent.process.wait()  # type: ignore[union-attr]
    began = time.monotonic()
    max_seq = fill(agent.state / "agent.db", args.rows)
    print(f"history: {args.rows} deployments written in {time.monotonic() - began:.1f} s; agent with them vs with an empty store")
    try:
        agent.start()
        report("startup (to /healthz 200)", f"{agent.startup_s:.2f} s", f"{empty_startup:.2f} s", agent.startup_s / empty_startup, "< 1 s")
        for name, seconds in lists(agent, max_seq).items():
            report(f"list p50: {name}", ms(seconds), ms(empty_lists[name]), seconds / empty_lists[name], "< 5 ms")
        metrics = query_p50(f"{agent.url}/metrics", {})
        report("/metrics p50", ms(metrics), ms(empty_metrics), metrics / empty_metrics, "< 5 ms")
        rss = rss_mib(agent.ps)
        report("RSS after the queries", f"{rss:.0f} MiB", f"{empty_rss:.0f} MiB", rss / empty_rss, "flat")

        blocker = agent.submit({"application": "queue", "build": {"image": IMAGE, "command": "sleep 3600", "timeout_s": 7200}})
        body = {"application": "queue", "build": {"image": IMAGE, "command": "true"}}
        times = post_latency(f"{agent.url}/v1/deployments", args.queued, body, AUTH)
        first_p50, last_p50 = median(times[:100]), median(times[-100:])
        bare = BareServer(b"{}")
        try:
            bare_times = post_latency(f"{bare.url}/insert", 200, body, {})
        finally:
            bare.stop()
        report("POST p50, first 100 (queue empty)", ms(first_p50), ms(median(bare_times)), first_p50 / median(bare_times))
        report(
            f"POST p50, last 100 (queue at {args.queued})", ms(last_p50), ms(median(bare_times)),
            last_p50 / median(bare_times), "flat",
        )
        report("POST p50 growth, last 100 / first 100", f"{last_p50 / first_p50:.2f}x", target="~1.0x")
        requests.post(f"{agent.url}/v1/deployments/{blocker['id']}/kill", headers=AUTH)
        print(f"  (p99 of all {args.queued} POSTs: {ms(percentile(times, 0.99))})")
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
