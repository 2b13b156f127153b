"""The command line's exit codes, and the error that ends it with a usage mistake.

`submit --wait` (and `rollback --wait`) exit like `docker run`: with the build's own exit code
when the deployment failed on one, so a script can tell a failing test from a broken agent.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# sysexits.h EX_UNAVAILABLE: the agent could not be reached at all (refused, timed out, no socket).
EXIT_UNREACHABLE = 69
EXIT_INTERRUPTED = 130
# A cancelled deployment was killed (SIGTERM): 128 + 15, as a shell reports a process ended so.
EXIT_CANCELLED = 143


class UsageError(Exception):
    """Bad input found after argument parsing (an unreadable request file, say); exits 2."""


def exit_code_of(deployment: dict[str, object]) -> int:
    """The exit code for a deployment in a final status."""
    status = deployment.get("status")
    if status == "succeeded":
        return EXIT_OK
    if status == "cancelled":
        return EXIT_CANCELLED
    error = deployment.get("error")
    code = deployment.get("exit_code")
    # Only a build's code is passed on: a release's or a health check's failure is the agent's verdict.
    failed_build = isinstance(error, dict) and error.get("type") in ("build_failed", "timeout")
    if failed_build and isinstance(code, int) and not isinstance(code, bool) and 0 < code < 256:
        return code
    return EXIT_FAILED
