"""What the benchmarks share: an agent started from a config, bare baselines, an open-loop load
generator, percentiles and process CPU/RSS readings. Nothing here is timed on its own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import aiohttp
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = "local/busybox"
FINAL = {"succeeded", "failed", "cancelled"}
# A build that prints as fast as it can: the load of the API figures.
YES_COMMAND = "yes 'a line of build output that is about as long as a real one, give or take'"


# The agent as a user installs it (scripts/install.sh): this checkout pip-installed into a venv of
# its own with the runtime dependencies only. The development venv also holds the test tools, and
# some of them change what the agent loads (structlog imports `rich` when it is there: ~5 MiB and
# ~0.1 s of start-up that no installed agent has).
INSTALLED_VENV = ROOT / "bench" / ".venv-installed"


def _tree_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted([ROOT / "pyproject.toml", *(ROOT / "agent").rglob("*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def installed_python() -> str:
    """The interpreter of INSTALLED_VENV, with this checkout as it is now installed into it."""
    python = INSTALLED_VENV / "bin" / "python"
    marker = INSTALLED_VENV / ".installed-tree"
    digest = _tree_digest()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(INSTALLED_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)], check=True)
        marker.write_text(digest)
    elif not marker.exists() or marker.read_text() != digest:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(ROOT)],
                       check=True)
        marker.write_text(digest)
    return str(python)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Seconds until `url`/healthz answers 200."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if process.poll() is not None:
            raise SystemExit(f"{url}: exited with {process.returncode}")
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return time.monotonic() - began
        except requests.ConnectionError:
            pass
        time.sleep(0.01)
    process.kill()
    raise SystemExit(f"{url} did not become healthy")


class Agent:
    """A deploy-agent daemon of this checkout in a temporary state directory."""

    def __init__(self, state: Path | None = None, **agent_settings: Any) -> None:
        self._tmp = None if state else tempfile.TemporaryDirectory(prefix="bench-agent-")
        self.state = state or Path(self._tmp.name)  # type: ignore[union-attr]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = {"max_concurrent": 4, "max_queued": 100_000, **agent_settings}
        lines = ["[agent]", f'listen = "127.0.0.1:{self.port}"', f'state_dir = "{self.state}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
        lines += ["", "[[auth.tokens]]", 'name = "bench"', f'token = "{TOKEN}"', 'scopes = ["admin"]', ""]
        self.config = self.state / "bench-config.toml"
        self.config.write_text("\n".join(lines))
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def start(self) -> "Agent":
        # Not from ROOT: the installed package, not the checkout beside it, is what runs.
        self.process = subprocess.Popen(
            [installed_python(), "-m", "agent", "run", "--config", str(self.config)],
            cwd=self.state, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.startup_s = wait_healthy(self.url, self.process)
        return self

    @property
    def ps(self) -> psutil.Process:
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update(AUTH)
        return session

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(f"{self.url}/v1/deployments", json=body, headers=AUTH, timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_final(self, deployment_id: str, timeout: float = 3600) -> dict[str, Any]:
        """Long polls until the deployment is final."""
        session = self.session()
        deadline = time.monotonic() + timeout
        etag = None
        while time.monotonic() < deadline:
            headers = {"If-None-Match": etag} if etag else {}
            response = session.get(f"{self.url}/v1/deployments/{deployment_id}", params={"wait": 30} if etag else None,
                                   headers=headers, timeout=60)
            if response.status_code == 200:
                etag = response.headers.get("ETag")
                if response.json()["status"] in FINAL:
                    return response.json()
        raise SystemExit(f"{deployment_id} did not finish")

    def kill_all(self) -> None:
        session = self.session()
        for status in ("queued", "building", "deploying"):
            for deployment in session.get(f"{self.url}/v1/deployments", params={"status": status, "limit": 500}).json()["data"]:
                session.post(f"{self.url}/v1/deployments/{deployment['id']}/kill")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.kill_all()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        # Only this agent's containers: another agent on the machine keeps its own.
        ours = {log.stem for log in (self.state / "logs").glob("dep_*.log")}
        listed = subprocess.run(
            ["docker", "ps", "-a", "--filter", "label=deploy-agent.deployment",
             "--format", '{{.ID}} {{.Label "deploy-agent.deployment"}}'],
            capture_output=True, text=True,
        ).stdout.split("\n")
        leftovers = [line.split()[0] for line in listed if line.strip() and line.split()[-1] in ours]
        if leftovers:
            subprocess.run(["docker", "rm", "-f", *leftovers], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._tmp is not None:
            self._tmp.cleanup()


# --- bare baselines ------------------------------------------------------------------------

BARE_SERVER = r'''
import importlib, json, os, sqlite3, sys
for name in filter(None, os.environ.get("BARE_IMPORTS", "").split(",")):
    importlib.import_module(name)
from aiohttp import web
body = open(sys.argv[2], "rb").read()
db = sqlite3.connect(sys.argv[3], isolation_level=None, check_same_thread=False)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT)")
async def fixed(request):
    return web.Response(body=body, content_type="application/json")
async def health(request):
    return web.json_response({"status": "ok"})
async def insert(request):
    data = await request.read()
    db.execute("INSERT INTO t (body) VALUES (?)", (data.decode(),))   # durable: synchronous=FULL, as the agent
    return web.Response(body=data, status=201, content_type="application/json")
app = web.Application()
app.router.add_get("/fixed", fixed); app.router.add_get("/healthz", health); app.router.add_post("/insert", insert)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''


# What the mandated stack costs before any agent code: the floor of an idle agent's RSS
# (pydantic.main: `import pydantic` alone defers BaseModel, which every pydantic user loads).
STACK_IMPORTS = (
    "asyncio", "sqlite3", "aiohttp.web", "pydantic.main", "docker", "structlog", "prometheus_client", "psutil",
)


class BareServer:
    """A bare aiohttp process: GET /fixed answers `body` as it is, POST /insert writes one SQLite row
    with the agent's durability (WAL, synchronous=FULL), on the event loop, as simply as can be."""

    def __init__(self, body: bytes, *, python: str | None = None, imports: tuple[str, ...] = ()) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-bare-")
        directory = Path(self._tmp.name)
        (directory / "server.py").write_text(BARE_SERVER)
        (directory / "body.json").write_bytes(body)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [python or sys.executable, str(directory / "server.py"), str(self.port), str(directory / "body.json"),
             str(directory / "bare.sqlite")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "BARE_IMPORTS": ",".join(imports)},
        )
        wait_healthy(self.url, self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._tmp.cleanup()


# --- load ------------------------------------------------------------------------------------


async def _open_loop(url: str, rate: float, duration_s: float, method: str, body: Any, headers: dict[str, str]) -> list[float]:
    """Requests sent at a fixed rate whether or not earlier ones answered (no coordinated omission):
    each latency counts from when its request was due, not from when the generator got to it."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(due: float, payload: Any) -> None:
            nonlocal errors
            try:
                async with session.request(method, url, json=payload) as response:
                    await response.read()
                    if response.status >= 400:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - due)

        tasks = []
        start = time.perf_counter() + 0.05
        count = int(rate * duration_s)
        for index in range(count):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = body(index) if callable(body) else body
            tasks.append(asyncio.create_task(one(due, payload)))
        await asyncio.gather(*tasks)
    if errors:
        print(f"  ({errors} of {count} requests to {url} failed)", file=sys.stderr)
    return latencies


def open_loop(url: str, rate: float, duration_s: float, *, method: str = "GET", body: Any = None,
              headers: dict[str, str] | None = None) -> list[float]:
    return asyncio.run(_open_loop(url, rate, duration_s, method, body, headers or AUTH))


def percentile(values: Iterable[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def cpu_percent_over(process: psutil.Process, seconds: float) -> float:
    """The process's (and its children's) CPU use over `seconds`, in % of one core."""
    def total() -> float:
        times = process.cpu_times()
        value = times.user + times.system
        for child in process.children(recursive=True):
            with contextlib.suppress(Exception):
                child_times = child.cpu_times()
                value += child_times.user + child_times.system
        return value

    before = total()
    time.sleep(seconds)
    return (total() - before) / seconds * 100


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def report(name: str, value: str, baseline: str | None = None, ratio: float | None = None, target: str = "") -> None:
    """One figure: what, ours, the baseline, the ratio, and the target it is held to."""
    parts = [f"{name:<58} {value:>12}"]
    if baseline is not None:
        parts.append(f"baseline {baseline:>12}")
    if ratio is not None:
        parts.append(f"ratio {ratio:6.2f}x")
    if target:
        parts.append(f"target {target}")
    print("  ".join(parts), flush=True)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))

