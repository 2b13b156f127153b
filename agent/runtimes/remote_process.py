"""The remote process runtime's former home: its names, re-exported from `agent.runtimes.remote`."""

from agent.runtimes.remote.channel import Connect
from agent.runtimes.remote.commands import OnStart
from agent.runtimes.remote.runtime import RemoteBuildJob, RemoteProcessRuntime
from agent.runtimes.remote.scripts import (
    GROUP_TAG_VARIABLE, MARKER, REMOTE_PORTS, launch_script, listening_ports, pick_free_port, release_script,
)

__all__ = [
    "GROUP_TAG_VARIABLE", "MARKER", "REMOTE_PORTS", "Connect", "OnStart", "RemoteBuildJob", "RemoteProcessRuntime",
    "launch_script", "listening_ports", "pick_free_port", "release_script",
]
