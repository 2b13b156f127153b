"""The copy of a build's json-file log into its deployment log, against a bare copy of the same file.

Usage: .venv/bin/python bench/build_log_copy.py [--lines N]
Writes a json-file log as Docker does (one entry per line), then times, interleaved and
repeated, (a) a bare baseline: reading the file in the copier's chunk size and writing
the bytes to another file, and (b) the agent's copier (agent.runtimes.docker.build_output)
turning it into the deployment log's lines. Prints both medians, µs per line and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from agent.logs import DeploymentLog, LogPolicy
from agent.runtimes.docker.build_output import BuildOutputCopier
from agent.runtimes.docker.json_log import JsonLogReader

CHUNK = 1024 * 1024


def write_json_log(path: Path, lines: int) -> None:
    with open(path, "wb") as handle:
        for number in range(lines):
            stream = "stderr" if number % 50 == 0 else "stdout"
            entry = {"log": f"line {number} of noisy output\n", "stream": stream, "time": "2026-12-02T18:49:39.333123456Z"}
            handle.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")


def bare_copy(source: Path, target: Path) -> float:
    began = time.perf_counter()
    with open(source, "rb") as reading, open(target, "wb", buffering=0) as writing:
        while chunk := reading.read(CHUNK):
            writing.write(chunk)
    return time.perf_counter() - began


def agent_copy(source: Path, target: Path) -> float:
    target.unlink(missing_ok=True)
    log = DeploymentLog(target, LogPolicy(max_bytes=1 << 40))
    copier = BuildOutputCopier(log, "build", target.with_suffix(".build-cursor"))
    ended = threading.Event()
    ended.set()
    began = time.perf_counter()
    copier.copy_file(JsonLogReader(source), ended, threading.Event())
    elapsed = time.perf_counter() - began
    log.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=400_000)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "c-json.log"
        write_json_log(source, options.lines)
        bare: list[float] = []
        ours: list[float] = []
        for _ in range(options.runs):
            bare.append(bare_copy(source, Path(directory) / "bare.out"))
            ours.append(agent_copy(source, Path(directory) / "dep.log"))
        bare_s, ours_s = statistics.median(bare), statistics.median(ours)
        per_line = ours_s / options.lines * 1e6
        print(f"lines: {options.lines}  json log: {source.stat().st_size / 2**20:.1f} MiB")
        print(f"bare file copy:  {bare_s * 1000:8.1f} ms")
        print(f"agent copier:    {ours_s * 1000:8.1f} ms  ({per_line:.2f} µs per line)")
        print(f"ratio agent/bare: {ours_s / bare_s:.2f}x")


if __name__ == "__main__":
    main()
