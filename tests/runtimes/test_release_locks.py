"""The release manager's per-application locks: no state for names that do not exist, none left after use."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

import pytest

from agent.config import Config, DockerSettings
from agent.errors import Conflict, NotFound
from agent.releases import ReleaseManager
from agent.runtimes.container import ContainerRuntime
from agent.runtimes.process import ProcessRuntime
from agent.ssh import SshConnections
from agent.store import Store
from agent.targets.resolver import Targets


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ReleaseManager]:
    """A release manager over a real store; its container runtime is never asked to do anything."""
    config = Config()
    config = replace(config, agent=replace(config.agent, state_dir=tmp_path / "state"))
    config.agent.state_dir.mkdir()
    store = Store(config.database_path)
    await store.open()
    containers = ContainerRuntime(DockerSettings(), max_streams=1)
    targets = Targets(config, SshConnections({}), containers, ProcessRuntime(config.run_dir))
    manager = ReleaseManager(config, store, targets)
    yield manager
    await manager.close()
    await containers.close()
    await store.close()


async def test_stop_and_start_of_unknown_applications_leave_no_locks(manager: ReleaseManager) -> None:
    """1000 stops and 1000 starts of names with no release answer NotFound and create no per-name state."""
    for index in range(1000):
        with pytest.raises(NotFound):
            await manager.stop_application(f"missing-{index}")
        with pytest.raises(NotFound):
            await manager.start_application(f"missing-{index}")
    assert manager._locks == {}


async def test_a_known_application_leaves_no_lock_once_done(manager: ReleaseManager) -> None:
    """A refused stop or start of an existing application drops its lock afterwards."""
    await manager.store.set_application("web", "dep_x", "stopped")
    with pytest.raises(Conflict, match="already stopped"):
        await manager.stop_application("web")
    await manager.store.set_application("web", "dep_x", "running")
    with pytest.raises(Conflict, match="already running"):
        await manager.start_application("web")
    assert manager._locks == {}


async def test_a_held_lock_refuses_stop_and_is_dropped_after_its_holder_and_waiters(manager: ReleaseManager) -> None:
    """While a deployment holds the lock, stop answers Conflict; waiters (even cancelled ones) leave nothing behind."""
    await manager.store.set_application("web", "dep_x", "running")
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with manager.lock("web"):
            order.append("holder")
            await release.wait()

    async def waiter(name: str) -> None:
        async with manager.lock("web"):
            order.append(name)

    holding = asyncio.create_task(holder())
    while not manager.is_locked("web"):
        await asyncio.sleep(0)
    waiting = [asyncio.create_task(waiter("first")), asyncio.create_task(waiter("second"))]
    cancelled = asyncio.create_task(waiter("cancelled"))
    await asyncio.sleep(0)
    with pytest.raises(Conflict, match="being put into service"):
        await manager.stop_application("web")
    cancelled.cancel()
    release.set()
    await asyncio.gather(holding, *waiting)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert order == ["holder", "first", "second"]
    assert manager._locks == {}
    assert not manager.is_locked("web")
