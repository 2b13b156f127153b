"""Builds and process releases on a remote server, over SSH.

Every command runs on a session channel of the server's shared connection as

    exec /bin/sh -c 'cd DIR && export K=V ...; echo MARKER $$ STARTTIME; read go; exec CMD'

The command runs only once the agent has recorded its pid (it answers "go" on stdin). sshd
makes the session's shell a session and process-group leader, and `exec` keeps its pid, so the
reported pid is the command's and also its process group. STARTTIME is field 22 of
`/proc/<pid>/stat` (clock ticks since the server booted): with the pid it names the process, and
every later signal is sent only after `/proc/<pid>/stat` still shows that start time. The shell
also exports `DEPLOY_AGENT_GROUP=<pid>:<starttime>`, which every descendant inherits: once the
leader is gone, a live member of group <pid> that carries the tag still proves the group ours.

A release is started differently (`release_script`): the shell starts a small supervisor with
`setsid`, detached, its output going to files in `run_dir(id)`, reports the supervisor's pid and
start time (which the supervisor writes to `started` there once it leads its group), and exits.
The supervisor writes the command's exit code next to its output, and `OutputFollower` copies
the files into the log over SFTP, so a release needs neither the connection nor one of sshd's
few session slots (MaxSessions) while it runs.

Signals always go on a fresh channel as `kill -TERM -PGID` (sshd refuses signal requests for
root logins, and the command's own channel dies with a dropped connection). Output streams into
the deployment's log line by line as it arrives.

The modules, by job: `layout` (the remote directories), `scripts` (every shell script sent, pure),
`channel` (the pid handshake on a session channel), `commands` (running to the end, stopping
groups), `transfer` (SFTP), `workspaces`, `output` (the release output follower) and `runtime`
(`RemoteProcessRuntime`, composing them).
"""

from agent.runtimes.remote.layout import REMOTE_ROOT, RemoteLayout, remote_release_dir
from agent.runtimes.remote.runtime import RemoteBuildJob, RemoteProcessRuntime

__all__ = ["REMOTE_ROOT", "RemoteBuildJob", "RemoteLayout", "RemoteProcessRuntime", "remote_release_dir"]
