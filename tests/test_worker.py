"""The worker ends a deployment in one place: its failure's fields, or cancelled/failed on a stop."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from agent.config import Config
from agent.errors import BuildFailed, ReleaseExited, RuntimeFailure, StopRequested
from agent.metrics import Metrics
from agent.models import BuildSpec, Deployment, DeploymentSpec, RunSpec, new_deployment_id, utc_now
from agent.store import Store
from agent.targets.base import Built
from agent.worker import RunningDeployment, Worker


class FakeTarget:
    """A target whose build does what the test says; records what the worker asked afterwards."""

    def __init__(self, outcome: BaseException | Built) -> None:
        self.outcome = outcome
        self.finished: list[bool] = []

    async def build(self, deployment: Deployment, log: Any, watch: Any) -> Built:
        await watch.building()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    async def finish_build(self, deployment: Deployment, *, kept: bool) -> None:
        self.finished.append(kept)


class FakeTargets:
    def __init__(self, target: FakeTarget) -> None:
        self.target = target

    def for_deployment(self, deployment: Deployment) -> FakeTarget:
        return self.target


class FakeReleases:
    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure

    async def deploy(self, deployment: Deployment, target: Any, log: Any, image: str | None) -> dict[str, Any]:
        if self.failure is not None:
            raise self.failure
        return {"release_image": image, "url": "http://127.0.0.1:1", "stage": None}

    async def prune(self, *args: Any, **kwargs: Any) -> list[str]:
        return []


@pytest.fixture
def config(tmp_path: Path) -> Config:
    base = Config()
    config = replace(base, agent=replace(base.agent, state_dir=tmp_path / "state"))
    config.logs_dir.mkdir(parents=True)
    return config


@pytest.fixture
async def store(config: Config) -> AsyncIterator[Store]:
    store = Store(config.database_path)
    await store.open()
    yield store
    await store.close()


async def carry_out(
    config: Config, store: Store, outcome: BaseException | Built, *, run: RunSpec | None = None,
    release_failure: BaseException | None = None, stop_reason: str | None = None,
) -> tuple[Deployment, FakeTarget]:
    spec = DeploymentSpec(application="web", build=BuildSpec(image="local/busybox", command="true"), run=run)
    now = utc_now()
    deployment_id = new_deployment_id()
    record, _ = await store.insert(Deployment(
        id=deployment_id, application="web", server="local", status="queued", created_at=now, updated_at=now,
        log_path=str(config.logs_dir / f"{deployment_id}.log"), spec=spec,
    ))
    target = FakeTarget(outcome)
    worker = Worker(config, store, FakeTargets(target), FakeReleases(release_failure), Metrics())  # type: ignore[arg-type]
    running = RunningDeployment(record.id, record.application, stop_reason=stop_reason)
    await worker.carry_out(record, running)
    return await store.get(record.id), target


async def test_a_failed_build_ends_failed_with_its_exit_code(config: Config, store: Store) -> None:
    """BuildFailed: error type build_failed and the exit code; the build's leftovers are not kept."""
    done, target = await carry_out(config, store, BuildFailed("build command exited with code 3", exit_code=3))
    assert done.status == "failed" and done.exit_code == 3
    assert done.error == {"type": "build_failed", "message": "build command exited with code 3"}
    assert target.finished == [False]
    assert "deployment failed: build command exited with code 3" in Path(done.log_path).read_text()


async def test_a_release_that_died_ends_failed_with_its_smoke_test(config: Config, store: Store) -> None:
    """A release failure carries its exit code and smoke test into the status."""
    smoke = {"passed": False, "url": "http://x", "errors": [], "duration_ms": 1, "tested_at": utc_now()}
    died = ReleaseExited("the release exited with code 4", exit_code=4, smoke_test=smoke)
    done, target = await carry_out(config, store, Built(0, "deploy-agent/web:x"), run=RunSpec(command="x"),
                                   release_failure=died)
    assert done.error == {"type": "release_exited", "message": "the release exited with code 4"}
    assert done.exit_code == 4 and done.smoke_test == smoke and target.finished == [False]


async def test_other_errors_report_their_type_and_surprises_are_internal(config: Config, store: Store) -> None:
    """An AgentError reports its own type (no exit code); any other exception is an internal_error."""
    done, _ = await carry_out(config, store, RuntimeFailure("git clone failed", exit_code=128))
    assert done.error == {"type": "runtime_failure", "message": "git clone failed"} and done.exit_code is None
    done, _ = await carry_out(config, store, ValueError("boom"))
    assert done.error == {"type": "internal_error", "message": "internal error: boom"}


async def test_a_stop_is_a_cancel_on_kill_and_a_failure_on_shutdown(config: Config, store: Store) -> None:
    """StopRequested is control flow: cancelled when killed, agent_shutdown when the agent stops."""
    done, _ = await carry_out(config, store, StopRequested(), stop_reason="kill")
    assert done.status == "cancelled" and done.error == {"type": "cancelled", "message": "killed on request"}
    done, _ = await carry_out(config, store, Built(0), stop_reason="shutdown")
    assert done.status == "failed" and done.error["type"] == "agent_shutdown"  # type: ignore[index]


async def test_a_release_served_from_its_build_keeps_what_the_build_left(config: Config, store: Store) -> None:
    """Success: the build's exit code and image are recorded, and its files stay for the release."""
    done, target = await carry_out(config, store, Built(0, "deploy-agent/web:x"), run=RunSpec(command="x"))
    assert done.status == "succeeded" and done.exit_code == 0 and done.release_image == "deploy-agent/web:x"
    assert target.finished == [True]
