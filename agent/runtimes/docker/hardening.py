"""What every container the agent creates is denied: new privileges and most capabilities."""

from __future__ import annotations

from typing import Any

from docker import APIClient

# No setuid binary, file capability or exec may gain privileges.
SECURITY_OPT = ("no-new-privileges",)
# Docker's default set without NET_RAW (raw sockets: spoofing on the bridge network), MKNOD
# (device nodes), SYS_CHROOT, AUDIT_WRITE (the host's audit log), SETPCAP and SETFCAP
# (granting capabilities to processes and files). What stays is what a build or release
# running as root does in ordinary work:
KEPT_CAPABILITIES = (
    "CHOWN",  # chown files: package installs, `chown app /workspace`
    "DAC_OVERRIDE",  # root reads and writes files whatever their mode bits (caches, read-only files)
    "FOWNER",  # chmod, utime and xattrs on files of other users (tar, cp -p, package managers)
    "FSETID",  # keep setuid/setgid bits across chmod and chown (package installs)
    "SETUID",  # switch to another user: su, gosu, apt's _apt sandbox, a release dropping root
    "SETGID",  # the same for groups (setgroups)
    "KILL",  # signal processes of other users in the container (a root supervisor's workers)
    "NET_BIND_SERVICE",  # listen on ports below 1024 (httpd -p 80)
)


def hardening_options() -> dict[str, list[str]]:
    """Host config of every container: no new privileges, and only the capabilities kept above."""
    return {"security_opt": list(SECURITY_OPT), "cap_drop": ["ALL"], "cap_add": list(KEPT_CAPABILITIES)}


def create_running_host_config(
    api: APIClient, memory: int | None, nano_cpus: int | None, pids: int | None, **options: Any
) -> dict[str, Any]:
    """Host config of a container that runs a command (a build or a release): hardened and limited."""
    return api.create_host_config(
        init=True,  # docker-init forwards SIGTERM to the command and reaps zombies
        privileged=False,
        **hardening_options(),
        mem_limit=memory,
        nano_cpus=nano_cpus,
        pids_limit=pids,
        **options,
    )
