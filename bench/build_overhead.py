"""Build overhead of deploy-agent against bare `docker run --rm`, interleaved in one run.

Usage: .venv/bin/python bench/build_overhead.py [--runs 10] [--parallel 40]

Sequential: a one-off build (`true`) from POST to `succeeded` (workspace, container, start,
log, wait, remove, status writes with fsync), against `docker run --rm --init local/busybox
sh -c true`, alternating. Parallel: PARALLEL builds with max_concurrent 4, against the same
number of bare runs four at a time.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from common import IMAGE, Agent, median, report

BARE = ["docker", "run", "--rm", "--init", IMAGE, "sh", "-c", "true"]


def bare() -> float:
    began = time.monotonic()
    subprocess.run(BARE, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - began


def through_agent(agent: Agent) -> float:
    began = time.monotonic()
    created = agent.submit({"application": "bench", "build": {"image": IMAGE, "command": "true"}})
    final = agent.wait_final(created["id"])
    assert final["status"] == "succeeded", final
    return time.monotonic() - began


def parallel_agent(agent: Agent, count: int) -> float:
    began = time.monotonic()
    ids = [agent.submit({"application": f"par{i}", "build": {"image": IMAGE, "command": "true"}})["id"] for i in range(count)]
    for deployment_id in ids:
        assert agent.wait_final(deployment_id)["status"] == "succeeded"
    return time.monotonic() - began


def parallel_bare(count: int) -> float:
    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: bare(), range(count)))
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=40)
    args = parser.parse_args()
    agent = Agent(max_concurrent=4).start()
    try:
        through_agent(agent)
        bare()  # warm-up
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(through_agent(agent))
            theirs.append(bare())
        print("one-off build overhead, agent vs bare `docker run --rm`, interleaved")
        report("sequential build, submit to succeeded (median)", f"{median(ours):.3f} s", f"{median(theirs):.3f} s",
               median(ours) / median(theirs), "<= 1.10x")
        par_ours, par_theirs = [], []
        for _ in range(2):
            par_ours.append(parallel_agent(agent, args.parallel))
            par_theirs.append(parallel_bare(args.parallel))
        report(f"{args.parallel} builds, max_concurrent 4 vs 4 bare at a time", f"{median(par_ours):.2f} s",
               f"{median(par_theirs):.2f} s", median(par_ours) / median(par_theirs), "<= 1.10x")
    finally:
        agent.stop()


if __name__ == "__main__":
    main()
