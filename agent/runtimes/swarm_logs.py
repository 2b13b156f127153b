"""The output of a swarm service's tasks, copied into the deployment log while its rollout is watched.

Swarm keeps each task's output (the engine's log driver); `GET /services/{id}/logs` reads it
from every node. Each poll asks for what came since the newest line already copied (Docker's
`since` includes that instant, so the lines of that very nanosecond are remembered and
skipped), and writes each line as `task <slot>: <text>` under the release stage.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import docker

from agent.logs import DeploymentLog, parse_log_line, read_tail
from agent.runtimes.base import RELEASE_STAGE

TASK_ID_ATTRIBUTE = "com.docker.swarm.task.id"


@dataclass(frozen=True)
class TaskLine:
    nanoseconds: int  # since the epoch, as Docker stamped it
    stream: str
    task_id: str
    text: str


def parse_line(raw: str, stream: str) -> TaskLine | None:
    """One line of a service log read with `timestamps` and `details`: `TIME k=v,k=v TEXT`."""
    stamp, _, rest = raw.partition(" ")
    nanoseconds = parse_nanoseconds(stamp)
    if nanoseconds is None:
        return None
    task_id = ""
    details, _, text = rest.partition(" ")
    if "=" in details and "com.docker.swarm." in details:
        for pair in details.split(","):
            key, _, value = pair.partition("=")
            if key == TASK_ID_ATTRIBUTE:
                task_id = value
    else:
        text = rest
    return TaskLine(nanoseconds, stream, task_id, text)


def parse_nanoseconds(stamp: str) -> int | None:
    """RFC 3339 with up to nine fractional digits (Go's RFC3339Nano, trailing zeros trimmed) in ns."""
    if not stamp.endswith("Z") or len(stamp) < 20:
        return None
    whole, _, fraction = stamp[:-1].partition(".")
    try:
        seconds = dt.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None
    if fraction and not fraction.isdigit():
        return None
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


@dataclass(frozen=True)
class ResumePoint:
    """Where copying starts: a fresh rollout from its start, a re-adopted one where the log stopped."""

    since_s: float
    copied: tuple[tuple[str, str], ...] = ()  # (stream, text) of task lines near the end of the log
    copied_until_s: float = 0.0


# How far before the last copied line a re-adopted rollout reads again: a line Docker stamped
# before that write but after the read that preceded it was not copied yet.
RESUME_OVERLAP_S = 2.0
RESUME_TAIL_LINES = 2_000


def resume_point(log_path: Path, fallback_s: float) -> ResumePoint:
    """After a restart: from shortly before the last task line in the log, with the lines that would repeat.

    `fallback_s` (the rollout's start) when the log holds no task line yet. Blocking file I/O.
    """
    data, _ = read_tail(log_path, RESUME_TAIL_LINES)
    lines = [parse_log_line(raw) for raw in data.decode("utf-8", "replace").splitlines()]
    task_lines = [line for line in lines if line is not None and line[1] == RELEASE_STAGE and line[3].startswith("task ")]
    if not task_lines:
        return ResumePoint(fallback_s)
    last_s = task_lines[-1][0]
    since_s = last_s - RESUME_OVERLAP_S
    copied = tuple((stream, text) for stamp_s, _, stream, text in task_lines if stamp_s >= since_s - 1.0)
    return ResumePoint(since_s, copied, last_s)


class TaskLogCopier:
    """Copies new task output of one service into one deployment log, on each `copy_new`."""

    def __init__(self, service: str, log: DeploymentLog, point: ResumePoint) -> None:
        self.service = service
        self.log = log
        self._since_ns = int(point.since_s * 1_000_000_000)
        self._seen_at_since: set[tuple[str, str, str]] = set()
        # Lines the log holds already (copied before an agent restart), skipped once each.
        self._copied = Counter(point.copied)
        self._copied_until_ns = int(point.copied_until_s * 1_000_000_000)

    def read(self, client: docker.DockerClient) -> list[TaskLine]:
        """New lines, oldest first (runs on the engine's pool: the docker SDK blocks)."""
        since = f"{self._since_ns // 1_000_000_000}.{self._since_ns % 1_000_000_000:09d}"
        try:
            slots = {task["ID"]: task.get("Slot") for task in client.api.tasks(filters={"service": self.service})}
            lines: list[TaskLine] = []
            for stream in ("stdout", "stderr"):
                lines += _read_stream(client, self.service, stream, since)
        except docker.errors.APIError:
            return []  # the service gone, or its logs unreadable: the rollout's verdict says why
        fresh = []
        for line in sorted(lines, key=lambda line: line.nanoseconds):
            key = (line.stream, line.task_id, line.text)
            if line.nanoseconds < self._since_ns or (line.nanoseconds == self._since_ns and key in self._seen_at_since):
                continue
            if line.nanoseconds > self._since_ns:
                self._since_ns = line.nanoseconds
                self._seen_at_since = set()
            self._seen_at_since.add(key)
            slot = slots.get(line.task_id)
            text = f"task {slot if slot is not None else line.task_id[:12]}: {line.text}"
            if line.nanoseconds <= self._copied_until_ns and self._copied[(line.stream, text)] > 0:
                self._copied[(line.stream, text)] -= 1
                continue
            fresh.append(TaskLine(line.nanoseconds, line.stream, line.task_id, text))
        return fresh

    def write(self, lines: list[TaskLine]) -> None:
        """Writes lines in order, a run of one stream at a time."""
        run: list[str] = []
        stream = ""
        for line in lines:
            if line.stream != stream and run:
                self.log.write_lines(RELEASE_STAGE, stream, run)
                run = []
            stream = line.stream
            run.append(line.text)
        if run:
            self.log.write_lines(RELEASE_STAGE, stream, run)

    async def copy_new(self, engine_call: Callable[[str, Callable[[Any], list[TaskLine]]], Any]) -> None:
        self.write(await engine_call(f"reading the logs of service {self.service}", self.read))


def _read_stream(client: docker.DockerClient, service: str, stream: str, since: str) -> list[TaskLine]:
    chunks = client.api.service_logs(
        service, details=True, follow=False, stdout=stream == "stdout", stderr=stream == "stderr",
        since=since, timestamps=True, tail="all", is_tty=False,
    )
    raw = b"".join(chunks).decode("utf-8", "replace")
    parsed = (parse_line(line, stream) for line in raw.splitlines())
    return [line for line in parsed if line is not None]
