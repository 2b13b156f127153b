"""Where the floor of "build output into the log" is: Docker's own ways to keep a container's output.

Usage: .venv/bin/python bench/log_drivers.py [--size-mib 100] [--rounds 3]

The same container prints SIZE bytes of ~80-byte lines; each way is timed from `docker run` to
the container's end, interleaved round by round, against the baseline of log_throughput.py,
`docker run --log-driver none > file` (the output through the engine's attach stream):

- `json-file`: what builds use, the file a restarted agent reads again (no agent involved here);
- `local`: Docker's protobuf log driver;
- a bind-mounted file the container's shell writes itself (no engine in the path at all).

No agent runs: the figures say how much of the agent's ratio is the engine's before the agent
reads a byte.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from common import IMAGE, YES_COMMAND, median, report


def timed(args: list[str], stdout: object = subprocess.DEVNULL) -> float:
    began = time.monotonic()
    subprocess.run(args, stdout=stdout, check=True)
    return time.monotonic() - began


def attached(command: str, directory: Path) -> float:
    with open(directory / "bare.out", "wb") as output:
        return timed(["docker", "run", "--rm", "--log-driver", "none", IMAGE, "sh", "-c", command], output)


def driver(name: str, command: str) -> float:
    began = time.monotonic()
    container = subprocess.run(["docker", "run", "-d", "--log-driver", name, IMAGE, "sh", "-c", command],
                               capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["docker", "wait", container], stdout=subprocess.DEVNULL, check=True)
    elapsed = time.monotonic() - began
    subprocess.run(["docker", "rm", container], stdout=subprocess.DEVNULL, check=True)
    return elapsed


def bind_file(command: str, directory: Path) -> float:
    return timed(["docker", "run", "--rm", "--log-driver", "none", "-v", f"{directory}:/out", IMAGE,
                  "sh", "-c", f"({command}) > /out/bind.out 2>&1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    command = f"{YES_COMMAND} | head -c {args.size_mib * 2**20}"
    ways = {"json-file log driver (what builds use)": lambda d: driver("json-file", command),
            "local log driver": lambda d: driver("local", command),
            "bind-mounted file written by the container": lambda d: bind_file(command, d)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    baseline: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-log-drivers-") as name:
        directory = Path(name)
        attached("true", directory)  # warm-up
        for _ in range(args.rounds):
            baseline.append(attached(command, directory))
            for way, run in ways.items():
                times[way].append(run(directory))
    print(f"{args.size_mib} MiB of container output, kept by the engine's ways, vs `docker run --log-driver none > file`")
    bare = median(baseline)
    for way, values in times.items():
        ours = median(values)
        report(way, f"{ours:.2f} s", f"{bare:.2f} s", ours / bare)


if __name__ == "__main__":
    main()
