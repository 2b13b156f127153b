"""Deployment log writers: secrets masked in every line, the size cap and its dropped-bytes line, a full disk."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from pathlib import Path
from typing import Iterator

import pytest
from structlog.testing import capture_logs

from agent.logs import (
    DEFAULT_MAX_LOG_BYTES,
    MASK,
    DeploymentLog,
    LogPolicy,
    Masker,
    dropped_note_pending,
    maskable,
    watch_growth,
)
from agent.models import BuildSpec, DeploymentSpec, RunSpec
from tests.tmpfs import fill, mounted_tmpfs

SECRET = "s3cr3t-password-value"
DROPPED = re.compile(
    r"^\S+Z (\S+) agent \| (\d+) bytes of output dropped: the log reached agent\.max_log_bytes \((\d+) bytes\)$"
)


LINE = re.compile(r"^\S+Z \S+ (stdout|stderr|agent) \| .*$")


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def texts_of(path: Path) -> list[str]:
    """The text after `stamp stage stream | ` of every line."""
    return [line.partition(" | ")[2] for line in lines_of(path)]


# --- masking ------------------------------------------------------------------------------------


def test_secrets_are_masked_in_stdout_stderr_and_agent_lines(tmp_path: Path) -> None:
    """Each value of 8 characters or more becomes *** wherever it appears, in every stream."""
    path = tmp_path / "dep.log"
    with DeploymentLog(path, LogPolicy(secrets=maskable([SECRET, "tiny"]))) as log:
        log.write_lines("build", "stdout", [f"password={SECRET}", f"{SECRET}{SECRET} twice"])
        log.write_lines("build", "stderr", [f"error: bad {SECRET}!"])
        log.agent("release", f"running: app --password {SECRET}")
        log.write("build", "stdout", "tiny values stay: tiny")
    text = path.read_text(encoding="utf-8")
    assert SECRET not in text
    assert texts_of(path) == [
        "password=***",
        "*** twice",
        "error: bad ***!",
        "running: app --password ***",
        "tiny values stay: tiny",
    ]


def test_a_secret_containing_another_is_masked_whole() -> None:
    """The longer secret wins where both match; overlapping secrets leave no fragment behind."""
    mask = Masker(["abcdefgh", "xxabcdefghxx", "efghijkl"])
    assert mask("1 xxabcdefghxx 2") == "1 *** 2"
    assert mask("abcdefghijkl") == MASK  # overlapping: one mask, no 'ijkl' left over
    assert mask("abcdefgh-abcdefgh") == "***-***"
    assert mask("nothing to hide") == "nothing to hide"


def test_only_values_of_eight_characters_or_more_are_masked() -> None:
    """Short values are left alone; a multi-line value is masked line by line."""
    assert maskable(["1234567", "12345678", "first-line-value\r\nsecond-line-value\nshort"]) == (
        "second-line-value",
        "first-line-value",
        "12345678",
    )


def test_policy_for_spec_masks_build_and_run_env_values() -> None:
    """A deployment's policy holds the long values of build.env and run.env, and its repr shows none."""
    spec = DeploymentSpec(
        application="web",
        build=BuildSpec(image="img", command="true", env={"TOKEN": SECRET, "DEBUG": "1"}),
        run=RunSpec(command="serve", env={"DB_PASSWORD": "another-long-one"}),
    )
    policy = LogPolicy.for_spec(spec, 1234)
    assert policy.max_bytes == 1234
    assert set(policy.secrets) == {SECRET, "another-long-one"}
    assert SECRET not in repr(policy)
    assert LogPolicy.for_spec(DeploymentSpec(application="web"), DEFAULT_MAX_LOG_BYTES).secrets == ()


# --- the cap --------------------------------------------------------------------------------------


def test_output_beyond_the_cap_is_counted_and_noted_once(tmp_path: Path) -> None:
    """5 MiB under a 1 MiB cap: the log holds a prefix of the output, at most 1 MiB, plus one line."""
    cap = 1024 * 1024
    path = tmp_path / "dep.log"
    line = "y" * 99
    written = 0
    with DeploymentLog(path, LogPolicy(max_bytes=cap)) as log:
        for _ in range(5 * 1024 * 1024 // 100 // 64):
            log.write_lines("build", "stdout", [line] * 64)
            written += 64
        log.agent("done", "deployment succeeded")  # agent lines are dropped too
        assert log.full
    lines = lines_of(path)
    note = DROPPED.match(lines[-1])
    assert note is not None, lines[-1]
    assert note.group(1) == "done" and int(note.group(3)) == cap
    body = path.read_bytes()[: -len(lines[-1]) - 1]
    assert len(body) <= cap
    assert all(text == line for text in texts_of(path)[:-1])  # a prefix: nothing skipped in between
    kept = len(lines) - 1
    line_bytes = len(lines[0]) + 1
    agent_line = len(f"{lines[0].split(' ')[0]} done agent | deployment succeeded\n")
    assert int(note.group(2)) == (written - kept) * line_bytes + agent_line
    assert sum(DROPPED.match(entry) is not None for entry in lines) == 1


def test_a_log_under_the_cap_gets_no_note(tmp_path: Path) -> None:
    """Nothing dropped, nothing noted."""
    path = tmp_path / "dep.log"
    with DeploymentLog(path, LogPolicy(max_bytes=10_000)) as log:
        log.write("build", "stdout", "hello")
        assert not log.full
    assert texts_of(path) == ["hello"]


def test_the_cap_counts_what_other_writers_appended(tmp_path: Path) -> None:
    """Writers of one file share the cap: it is decided on the file's real size."""
    path = tmp_path / "dep.log"
    path.write_bytes(b"x" * 900 + b"\n")  # e.g. a release supervisor in another process
    policy = LogPolicy(max_bytes=1000)
    with DeploymentLog(path, policy) as first, DeploymentLog(path, policy) as second:
        first.write("build", "stdout", "a" * 40)  # fits: ~80 bytes with its stamp
        second.write("release", "stdout", "b" * 40)  # would pass 1000
        first.write("build", "stdout", "c")  # the file is too full now for this writer too
        assert first.full and second.full
    lines = lines_of(path)
    assert len(path.read_bytes()) - sum(len(line) + 1 for line in lines if DROPPED.match(line)) <= 1000
    assert [DROPPED.match(line).group(1) for line in lines if DROPPED.match(line)] == ["release", "build"]


def test_concurrent_writers_stay_under_the_cap(tmp_path: Path) -> None:
    """Threads writing through one writer never take the file past the cap."""
    path = tmp_path / "dep.log"
    cap = 64 * 1024
    with DeploymentLog(path, LogPolicy(max_bytes=cap)) as log:
        threads = [
            threading.Thread(target=lambda n=n: [log.write("build", "stdout", f"{n}" * 50) for _ in range(500)])
            for n in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    lines = lines_of(path)
    assert DROPPED.match(lines[-1])
    assert len(path.read_bytes()) - len(lines[-1]) - 1 <= cap


def test_count_dropped_adds_unread_bytes_of_a_full_log(tmp_path: Path) -> None:
    """A follower that skips reading what a full log would drop still counts it."""
    path = tmp_path / "dep.log"
    with DeploymentLog(path, LogPolicy(max_bytes=10)) as log:
        log.write("release", "stdout", "too long for ten bytes")
        first = log.dropped_bytes
        log.count_dropped("release", 1000)
        assert log.dropped_bytes == first + 1000
    match = DROPPED.match(lines_of(path)[-1])
    assert match is not None and int(match.group(2)) == first + 1000


# --- the file and its watchers ----------------------------------------------------------------------


def test_log_file_is_private_and_close_is_idempotent(tmp_path: Path) -> None:
    """The log is created 0600 whatever the umask; a second close changes nothing."""
    path = tmp_path / "dep.log"
    log = DeploymentLog(path)
    log.write("build", "stdout", "x")
    log.close()
    log.close()
    log.write("build", "stdout", "after close")  # ignored, as before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert texts_of(path) == ["x"]


def test_watchers_hear_of_writes_and_of_a_pending_note(tmp_path: Path) -> None:
    """watch_growth runs after each write and at close; a writer that dropped output says so until it closes."""
    path = tmp_path / "dep.log"
    calls: list[int] = []
    stop = watch_growth(path, lambda: calls.append(path.stat().st_size))
    try:
        log = DeploymentLog(path, LogPolicy(max_bytes=100))
        log.write("build", "stdout", "short")
        assert len(calls) == 1 and calls[0] > 0
        assert not dropped_note_pending(path)
        log.write("build", "stdout", "x" * 200)
        assert dropped_note_pending(path)
        assert len(calls) == 1  # nothing was written: nobody is woken
        log.close()
        assert not dropped_note_pending(path)
        assert len(calls) == 2 and calls[1] > calls[0]
    finally:
        stop()
    with DeploymentLog(path) as log:
        log.write("build", "stdout", "unwatched")
    assert len(calls) == 2


@pytest.mark.parametrize("value", ["a" * 8, "with spaces and $ymbols (.*)", "ünïcødé-välüe"])
def test_mask_handles_regex_characters_and_unicode(tmp_path: Path, value: str) -> None:
    """Secrets are matched literally, whatever characters they hold."""
    path = tmp_path / "dep.log"
    with DeploymentLog(path, LogPolicy(secrets=maskable([value]))) as log:
        log.write("build", "stdout", f"<{value}>")
    assert texts_of(path) == ["<***>"]


# --- a full disk -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs, unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "disk") as directory:
        yield directory


def test_a_full_disk_never_raises_and_is_reported_once(small_disk: Path) -> None:
    """ENOSPC: the writer keeps going, counts what it lost, warns once, and says so when there is room again."""
    path = small_disk / "dep.log"
    filler = small_disk / "filler"
    with capture_logs() as events, DeploymentLog(path) as log:
        log.write("build", "stdout", "before the disk filled")
        size = fill(filler)
        # Two pages of room: the next write is cut short in the middle of a line, then refused.
        os.truncate(filler, size - 8192)
        for _ in range(50):
            log.write_lines("build", "stdout", ["x" * 1000] * 10)
        assert isinstance(log.write_error, OSError) and log.write_error.errno == errno.ENOSPC
        assert log.full and log.dropped_bytes >= 50 * 10 * 1000
        filler.unlink()
        log.write_lines("build", "stdout", ["output after the error stays out"])
        log.agent("done", "deployment failed: disk full")
    warnings = [event for event in events if event["event"].startswith("writing a deployment log failed")]
    assert len(warnings) == 1, events
    texts = texts_of(path)
    assert texts[0] == "before the disk filled"
    assert "output after the error stays out" not in texts
    assert "deployment failed: disk full" in texts
    assert re.fullmatch(r"\d+ bytes of output could not be written to the log: No space left on device", texts[-1])
    # A write cut short in the middle of a line does not glue the next line to it.
    assert all(LINE.match(line) for line in lines_of(path)), lines_of(path)[-4:]


def test_a_log_that_cannot_be_opened_counts_everything(tmp_path: Path) -> None:
    """A writer whose file cannot be created does not raise either: it only counts and reports."""
    (tmp_path / "not-a-directory").write_text("")
    log = DeploymentLog(tmp_path / "not-a-directory" / "dep.log")
    log.write("build", "stdout", "lost")
    assert log.write_error is not None and log.dropped_bytes > 0
    log.close()
    assert log.closed
