"""Build output into the log: the agent against `docker run --log-driver none > file`.

Usage: .venv/bin/python bench/log_throughput.py [--sizes 100M,1G] [--rounds 2]

A build prints SIZE bytes of ~80-byte lines (`yes ... | head -c SIZE`); the agent's time is from
submit to `succeeded` with every line in the deployment log (max_log_bytes raised to hold it),
the baseline the same container with its output redirected to a file. Interleaved; the agent's
peak RSS is sampled meanwhile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import IMAGE, YES_COMMAND, Agent, median, report, rss_mib

SIZES = {"100M": 100 * 2**20, "1G": 2**30}


def bare(size: int, directory: Path) -> float:
    target = directory / "bare.log"
    began = time.monotonic()
    with open(target, "wb") as output:
        subprocess.run(
            ["docker", "run", "--rm", "--log-driver", "none", IMAGE, "sh", "-c", f"{YES_COMMAND} | head -c {size}"],
            stdout=output, check=True,
        )
    elapsed = time.monotonic() - began
    assert target.stat().st_size == size
    target.unlink()
    return elapsed


def through_agent(agent: Agent, size: int) -> tuple[float, float]:
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(agent.ps))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.monotonic()
    created = agent.submit({"application": "loud", "build": {"image": IMAGE, "command": f"{YES_COMMAND} | head -c {size}", "timeout_s": 3600}})
    final = agent.wait_final(created["id"])
    elapsed = time.monotonic() - began
    done.set()
    sampler.join()
    assert final["status"] == "succeeded", final
    log = Path(final["log_path"])
    assert log.stat().st_size > size, "the log lost output"
    log.unlink()
    return elapsed, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100M,1G")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    agent = Agent(max_log_bytes=4 * 2**30).start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-bare-log-") as directory:
            bare(2**20, Path(directory))  # warm-up
            print("build output into the log, agent vs `docker run --log-driver none > file`, interleaved")
            for name in args.sizes.split(","):
                size = SIZES[name]
                ours, theirs, peaks = [], [], []
                for _ in range(args.rounds):
                    elapsed, peak = through_agent(agent, size)
                    ours.append(elapsed)
                    peaks.append(peak)
                    theirs.append(bare(size, Path(directory)))
                mib_s = size / 2**20 / median(ours)
                report(
                    f"{name} of output: wall time ({mib_s:.0f} MiB/s)", f"{median(ours):.2f} s", f"{median(theirs):.2f} s",
                    median(ours) / median(theirs), "<= 1.0x (baseline/agent >= 1.0)",
                )
                report(f"{name} of output: agent peak RSS", f"{max(peaks):.0f} MiB", target="< 150 MiB")
    finally:
        agent.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
