"""The build output pump: Docker's multiplexed stream into log lines, and the pump process on a real engine."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import docker
import psutil
import pytest

from agent.errors import RuntimeFailure
from agent.logs import MAX_LINE_BYTES, DeploymentLog, LogPolicy
from agent.runtimes.docker import build_pumps
from agent.runtimes.docker.build_pump import IDLE_CHECK_S, PUMP_NICENESS, FrameCopier
from tests.conftest import BASE_IMAGE, log_entries


@pytest.fixture
def starter() -> Iterator[build_pumps.PumpStarter]:
    starter = build_pumps.PumpStarter()
    yield starter
    starter.close()


def wait_until_ended(process: build_pumps.PumpProcess, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while process.running():
        assert time.monotonic() < deadline, "the pump did not end"
        time.sleep(0.02)


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def copied(tmp_path: Path, *chunks: bytes, secrets: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    path = tmp_path / "dep.log"
    with DeploymentLog(path, LogPolicy(secrets=secrets)) as log:
        copier = FrameCopier(log, "build")
        for chunk in chunks:
            copier.feed(chunk)
        copier.finish()
    return [(stream, text) for _, stream, text in log_entries(path)]


def test_streams_keep_their_order_and_lines_join_across_frames(tmp_path: Path) -> None:
    stream = frame(1, b"one\ntw") + frame(2, b"err 1\n") + frame(1, b"o\nthree\n") + frame(2, b"err 2\nno newline")
    # Cut anywhere, even inside a frame header, the same lines come out.
    for cut in (1, 5, 9, 20, len(stream) - 3):
        assert copied(tmp_path / str(cut), stream[:cut], stream[cut:]) == [
            ("stdout", "one"), ("stderr", "err 1"), ("stdout", "two"), ("stdout", "three"),
            ("stderr", "err 2"), ("stderr", "no newline"),
        ]


def test_long_lines_are_cut_alike_however_the_chunks_fall(tmp_path: Path) -> None:
    line = b"x" * (MAX_LINE_BYTES * 2 + 10)
    whole = copied(tmp_path / "whole", frame(1, line + b"\nafter\n"))
    pieces = copied(tmp_path / "pieces", *(frame(1, line[i : i + 7000]) for i in range(0, len(line), 7000)), frame(1, b"\nafter\n"))
    assert whole == pieces
    assert [len(text) for _, text in whole] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 10, 5]


def test_carriage_returns_bad_utf8_and_secrets_are_handled_line_by_line(tmp_path: Path) -> None:
    lines = copied(tmp_path, frame(1, b"dos line\r\nbad \xff byte\ntoken=hunter2-secret\n"), secrets=("hunter2-secret",))
    assert lines == [("stdout", "dos line"), ("stdout", "bad \ufffd byte"), ("stdout", "token=***")]


@pytest.mark.docker
def test_the_pump_copies_a_containers_output_and_says_when_it_cannot_attach(
    tmp_path: Path, docker_client: docker.DockerClient, starter: build_pumps.PumpStarter
) -> None:
    container = docker_client.api.create_container(
        # Docker copies stdout and stderr on their own: their order holds across a pause, as with docker run.
        BASE_IMAGE, ["sh", "-c", "echo out 1; sleep 0.1; echo err 1 >&2; sleep 0.1; echo out 2"],
        host_config=docker_client.api.create_host_config(log_config={"Type": "none"}),
    )
    log = DeploymentLog(tmp_path / "dep.log")
    try:
        process = build_pumps.hand_job(starter.fork(), build_pumps.DEFAULT_SOCKET, container["Id"], log, "build")
        assert build_pumps.find(log.path) is not None  # recorded before the container starts
        docker_client.api.start(container["Id"])
        assert docker_client.api.wait(container["Id"])["StatusCode"] == 0
        wait_until_ended(process)
    finally:
        docker_client.api.remove_container(container["Id"], force=True)
    log.close()
    assert [(stream, text) for _, stream, text in log_entries(log.path)] == [
        ("stdout", "out 1"), ("stderr", "err 1"), ("stdout", "out 2"),
    ]

    with pytest.raises(RuntimeFailure, match="No such container"):
        build_pumps.hand_job(starter.fork(), build_pumps.DEFAULT_SOCKET, "0" * 64, DeploymentLog(tmp_path / "x.log"), "build")


def test_unix_socket_of() -> None:
    assert build_pumps.unix_socket_of(None) == "/var/run/docker.sock"
    assert build_pumps.unix_socket_of("unix:///run/private.sock") == "/run/private.sock"
    assert build_pumps.unix_socket_of("tcp://10.0.0.1:2375") is None


def test_a_pump_given_no_job_exits_and_the_starter_comes_back_after_a_kill(starter: build_pumps.PumpStarter) -> None:
    pipes = starter.fork()
    pipes.close()
    wait_until_ended(build_pumps.PumpProcess(pipes.pid, pipes.started))
    assert starter._process is not None
    starter._process.kill()
    starter._process.wait()
    again = starter.fork()  # a new starter, transparently
    assert again.pid != pipes.pid
    again.close()
    wait_until_ended(build_pumps.PumpProcess(again.pid, again.started))


def test_a_pump_runs_niced_below_the_agent(starter: build_pumps.PumpStarter) -> None:
    pipes = starter.fork()
    try:
        expected = min(os.nice(0) + PUMP_NICENESS, 19)
        pump = psutil.Process(pipes.pid)
        deadline = time.monotonic() + 5
        while pump.nice() != expected:  # the starter names the pid as soon as it forked
            assert time.monotonic() < deadline, f"the pump runs at niceness {pump.nice()}, not {expected}"
            time.sleep(0.01)
    finally:
        pipes.close()
    wait_until_ended(build_pumps.PumpProcess(pipes.pid, pipes.started))


@pytest.mark.docker
def test_a_pump_whose_container_is_removed_before_it_started_ends(
    tmp_path: Path, docker_client: docker.DockerClient, starter: build_pumps.PumpStarter
) -> None:
    """Docker never ends the attach stream of a container removed unstarted (an agent killed between create and start)."""
    container = docker_client.api.create_container(
        BASE_IMAGE, ["true"], host_config=docker_client.api.create_host_config(log_config={"Type": "none"}),
    )
    log = DeploymentLog(tmp_path / "dep.log")
    process = build_pumps.hand_job(starter.fork(), build_pumps.DEFAULT_SOCKET, container["Id"], log, "build")
    docker_client.api.remove_container(container["Id"], force=True)
    wait_until_ended(process, IDLE_CHECK_S + 10)
