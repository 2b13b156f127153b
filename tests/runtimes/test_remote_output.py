"""A remote release's output copied into the local log over a real sshd: masked, and capped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.logs import DeploymentLog, LogPolicy
from agent.runtimes.remote import RemoteProcessRuntime
from tests.conftest import log_entries
from tests.runtimes.test_remote_process import (  # noqa: F401 - fixtures
    connections,
    eventually,
    release_spec,
    remote_root,
    runtime,
)
from tests.sshd import free_port

SECRET = "remote-s3cr3t-value"


async def test_remote_release_output_is_masked_and_capped(
    runtime: RemoteProcessRuntime, remote_root: Path, tmp_path: Path  # noqa: F811
) -> None:
    """The follower writes under the log's policy: *** for the secret, nothing past the cap, one note at its end."""
    cap = 8192
    workdir = remote_root / "releases" / "dep_release"
    workdir.mkdir(parents=True)
    command = (
        'echo "token=$TOKEN"; i=0; while [ $i -lt 3000 ]; do echo "line $i"; i=$((i + 1)); done; '
        'while :; do echo "still $TOKEN"; sleep 0.05; done'
    )
    spec = replace(release_spec(tmp_path, workdir, command, free_port()), env={"TOKEN": SECRET})
    with DeploymentLog(spec.log_path, LogPolicy(max_bytes=cap, secrets=(SECRET,))) as log:
        handle = await runtime.start_release(spec, log)
    try:
        await eventually(lambda: ("release", "stdout", "token=***") in log_entries(spec.log_path), "masked output")
        # The remote file keeps its 3000 lines; the local log fills up to the cap and then only counts.
        await eventually(lambda: spec.log_path.stat().st_size > cap - 200, "the log to fill up")
        remote_stdout = Path(runtime.run_dir(spec.deployment_id)) / "stdout"
        full_at = remote_stdout.stat().st_size
        # Output that comes once the log is full is counted without being downloaded.
        await eventually(lambda: remote_stdout.stat().st_size > full_at + 100, "more output on the server")
    finally:
        await runtime.stop_release(handle, 1.0)
    text = spec.log_path.read_text(encoding="utf-8")
    assert SECRET not in text
    lines = text.splitlines()
    notes = [line for line in lines if "bytes of output dropped" in line]
    assert len(notes) == 1 and f"agent.max_log_bytes ({cap} bytes)" in notes[0]
    assert len(text.encode()) - len(notes[0]) - 1 <= cap
    await runtime.remove_release(handle, 1.0)
