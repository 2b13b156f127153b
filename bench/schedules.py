"""What a thousand schedules cost, and how close to their time they trigger.

Usage: .venv/bin/python bench/schedules.py [--schedules 1000] [--seconds 20]

- idle: the agent's CPU over `--seconds` with no schedule, then with `--schedules` active ones
  whose next trigger is hours away (cron in several time zones and long intervals), against
  a bare Python process sleeping in asyncio over the same time;
- on time: `--schedules` schedules on `* * * * *` all fall due at the same minute; each run's
  lateness is its `created_at` (written in the trigger's transaction) less its `scheduled_for`;
  the baseline is the lateness of as many `loop.call_at` timers set for one instant in a bare
  asyncio loop, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import subprocess
import sys
import time

import psutil

from common import Agent, cpu_percent_over, ms, percentile, report, rss_mib

ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Shanghai", "Australia/Sydney")
BARE_SLEEPER = "import asyncio; asyncio.run(asyncio.sleep(3600))"


def parse(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def create(agent: Agent, count: int, schedule_of) -> list[str]:
    session = agent.session()
    ids = []
    for index in range(count):
        body = {"application": f"sched{index % 50}", "schedule": schedule_of(index), "template": {}}
        response = session.post(f"{agent.url}/v1/schedules", json=body, timeout=30)
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


def far_away(index: int) -> dict:
    hour = (dt.datetime.now(dt.timezone.utc).hour + 6 + index % 12) % 24
    if index % 2:
        return {"type": "interval", "every_s": 86_400 + index}
    return {"type": "cron", "expression": f"{index % 60} {hour} * * *", "timezone": ZONES[index % len(ZONES)]}


def bare_timer_lateness(count: int) -> list[float]:
    """Lateness of `count` call_at timers set for one instant in a bare loop (the floor of "on time")."""
    async def measure() -> list[float]:
        loop = asyncio.get_running_loop()
        due_wall = time.time() + 1.0
        due_loop = loop.time() + 1.0
        late: list[float] = []
        done = asyncio.Event()

        def fire() -> None:
            late.append(time.time() - due_wall)
            if len(late) == count:
                done.set()

        for _ in range(count):
            loop.call_at(due_loop, fire)
        await done.wait()
        return late

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()

    bare = subprocess.Popen([sys.executable, "-c", BARE_SLEEPER])
    agent = Agent().start()
    try:
        time.sleep(2)
        idle_bare = cpu_percent_over(psutil.Process(bare.pid), args.seconds)
        idle_empty = cpu_percent_over(agent.ps, args.seconds)
        began = time.monotonic()
        create(agent, args.schedules, far_away)
        created_s = time.monotonic() - began
        time.sleep(2)
        rss = rss_mib(agent.ps)
        idle_full = cpu_percent_over(agent.ps, args.seconds)
        report("create a schedule (POST /v1/schedules, sequential)", ms(created_s / args.schedules))
        report("agent CPU idle, no schedules", f"{idle_empty:.2f} %", f"{idle_bare:.2f} %")
        report(f"agent CPU idle, {args.schedules} schedules between triggers", f"{idle_full:.2f} %",
               f"{idle_empty:.2f} %", target="no more than with none")
        report(f"agent RSS with {args.schedules} schedules", f"{rss:.1f} MiB")

        # All due at the next minute.
        ids = create(agent, args.schedules, lambda index: {"type": "cron", "expression": "* * * * *"})
        session = agent.session()
        first = session.get(f"{agent.url}/v1/schedules/{ids[0]}", timeout=30).json()["upcoming_runs_at"][0]
        wait_s = (parse(first) - dt.datetime.now(dt.timezone.utc)).total_seconds()
        time.sleep(max(0.0, wait_s) + 5)
        late = []
        for schedule_id in ids:
            runs = session.get(f"{agent.url}/v1/schedules/{schedule_id}/runs", timeout=30).json()["data"]
            for run in runs:
                if run["schedule_run"]["scheduled_for"] == first:
                    late.append((parse(run["created_at"]) - parse(first)).total_seconds())
        missing = len(ids) - len(late)
        floor = bare_timer_lateness(args.schedules)
        report(f"{args.schedules} schedules due at one instant: triggered", f"{len(late)}/{len(ids)}",
               target="all, each once")
        if late:
            for name, fraction in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
                ours, base = percentile(late, fraction), percentile(floor, fraction)
                report(f"  lateness {name} (created_at - scheduled_for)", ms(ours), ms(base),
                       ours / base if base > 0 else None, target="< 1 s" if name == "max" else "")
        if missing:
            print(f"  {missing} schedules had no run for {first}", flush=True)
    finally:
        bare.kill()
        agent.stop()


if __name__ == "__main__":
    main()
