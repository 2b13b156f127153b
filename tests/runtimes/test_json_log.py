"""Reading a json-file log from disk: batches, following, Docker's rotation, resuming at a position."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from agent.runtimes.docker.json_log import FilePosition, JsonLogReader, parse_entries, readable_log_path


def entry(text: str, stream: str = "stdout", stamp: str = "2026-12-02T10:00:00.123456789Z") -> bytes:
    return json.dumps({"log": text, "stream": stream, "time": stamp}).encode() + b"\n"


def read_all(reader: JsonLogReader, ended: bool = True) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for batch in reader.batches(lambda: ended, threading.Event()):
        out.extend((entry["stream"], entry["time"], entry["log"]) for entry in batch)
    return out


def test_entries_of_a_batch_keep_stream_time_and_text() -> None:
    data = entry("one\n") + entry("two, \"quoted\"\n", "stderr") + entry("part")
    assert [(e["stream"], e["time"], e["log"]) for e in parse_entries(data)] == [
        ("stdout", "2026-12-02T10:00:00.123456789Z", "one\n"),
        ("stderr", "2026-12-02T10:00:00.123456789Z", 'two, "quoted"\n'),
        ("stdout", "2026-12-02T10:00:00.123456789Z", "part"),
    ]


def test_a_torn_line_is_passed_over_and_the_rest_kept() -> None:
    data = entry("one\n") + b'{"log":"to\n' + entry("three\n")
    assert [e["log"] for e in parse_entries(data)] == ["one\n", "three\n"]


def test_an_unfinished_last_line_waits_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    whole = entry("one\n")
    path.write_bytes(whole + entry("two\n")[:10])
    reader = JsonLogReader(path)
    assert [text for _, _, text in read_all(reader)] == ["one\n"]
    assert reader.position == FilePosition(os.stat(path).st_ino, len(whole))


def test_following_reads_what_is_appended_until_the_end(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    path.write_bytes(entry("one\n"))
    ended = threading.Event()
    texts: list[str] = []

    def follow() -> None:
        for batch in JsonLogReader(path).batches(ended.is_set, threading.Event()):
            texts.extend(entry["log"] for entry in batch)

    thread = threading.Thread(target=follow)
    thread.start()
    with open(path, "ab") as handle:
        for number in range(50):
            handle.write(entry(f"line {number}\n"))
            handle.flush()
    ended.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert texts == ["one\n"] + [f"line {number}\n" for number in range(50)]


def test_the_end_wakes_a_reader_waiting_at_the_end_of_the_file(tmp_path: Path) -> None:
    """With `wake`, the container's exit ends the copy at once: no poll interval is slept through."""
    import time

    from agent.runtimes.docker.json_log import POLL_S

    path = tmp_path / "c-json.log"
    path.write_bytes(entry("one\n"))
    ended = threading.Event()
    finished_at: list[float] = []

    def follow() -> None:
        for _ in JsonLogReader(path).batches(ended.is_set, threading.Event(), wake=ended):
            pass
        finished_at.append(time.monotonic())

    thread = threading.Thread(target=follow)
    thread.start()
    time.sleep(0.12)  # asleep at the end of the file
    began = time.monotonic()
    ended.set()
    thread.join(timeout=5)
    assert finished_at and finished_at[0] - began < POLL_S / 2


def test_a_rotation_is_followed_into_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    path.write_bytes(entry("old\n"))
    ended = threading.Event()
    batches = JsonLogReader(path).batches(ended.is_set, threading.Event())
    assert [entry["log"] for entry in next(batches)] == ["old\n"]
    # Docker's rotation: the file is renamed (its last lines written first), a new one started.
    with open(path, "ab") as handle:
        handle.write(entry("last of old\n"))
    os.rename(path, tmp_path / "c-json.log.1")
    path.write_bytes(entry("new\n"))
    ended.set()
    rest = [entry["log"] for batch in batches for entry in batch]
    assert rest == ["last of old\n", "new\n"]


def test_a_resume_finds_its_file_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    first = entry("one\n")
    path.write_bytes(first + entry("two\n"))
    inode = os.stat(path).st_ino
    os.rename(path, tmp_path / "c-json.log.1")
    path.write_bytes(entry("three\n"))
    reader = JsonLogReader(path, FilePosition(inode, len(first)))
    assert [text for _, _, text in read_all(reader)] == ["two\n", "three\n"]
    assert not reader.lost_entries


def test_a_resume_whose_file_was_rotated_away_says_so_and_reads_what_is_left(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    path.write_bytes(entry("kept\n"))
    reader = JsonLogReader(path, FilePosition(inode=1, offset=5))
    assert [text for _, _, text in read_all(reader)] == ["kept\n"]
    assert reader.lost_entries


def test_closing_ends_a_follow_that_never_ends(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    path.write_bytes(b"")
    closing = threading.Event()
    thread = threading.Thread(target=lambda: list(JsonLogReader(path).batches(lambda: False, closing)))
    thread.start()
    closing.set()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_only_a_readable_file_named_for_the_container_is_read(tmp_path: Path) -> None:
    container_id = "ab" * 32
    path = tmp_path / f"{container_id}-json.log"
    path.write_bytes(b"")
    assert readable_log_path({"Id": container_id, "LogPath": str(path)}) == path
    assert readable_log_path({"Id": "cd" * 32, "LogPath": str(path)}) is None
    assert readable_log_path({"Id": container_id, "LogPath": str(tmp_path / f"{container_id}-gone.log")}) is None
    assert readable_log_path({"Id": container_id}) is None
