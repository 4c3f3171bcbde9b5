"""Fixtures: a real etcd server for the session, a fresh key prefix per test, and
agent subprocesses that are always cleaned up."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gleam import keys
from gleam.embedded import EtcdServer
from tests.agent_support import write_scripts
from tests.etcd_cluster import EtcdCluster
from tests.support import EXAMPLE_SCRIPTS, AgentProcess, connected


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd for the whole session; tests keep apart by using their own prefix."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def private_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own, for tests that kill, freeze or compact it."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster of this test's own (tests/etcd_cluster.py)."""
    with EtcdCluster(3, root=str(tmp_path / "etcd-cluster")) as cluster:
        yield cluster


@pytest.fixture
def layout() -> keys.Layout:
    """A key prefix no other test uses."""
    return keys.Layout(f"/t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[Any]:
    with connected(etcd_server.endpoint) as client:
        yield client


@pytest.fixture
def no_gleam_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """GLEAM_* variables in the developer's shell must not change the agents under test
    (modules of agent tests use it for every test: `pytestmark`)."""
    for name in list(os.environ):
        if name.startswith("GLEAM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def lua_dir(tmp_path: Path) -> Path:
    """A script directory with the agent tests' scripts (agent_support.TEST_SCRIPTS)."""
    return write_scripts(tmp_path / "scripts")


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """An empty script directory."""
    root = tmp_path / "scripts"
    root.mkdir()
    return root


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start gleam-agent subprocesses: start_agent(endpoint, "-id", "web-1", ...).
    Every agent started is stopped (SIGTERM, then SIGKILL) when the test ends."""
    agents: list[AgentProcess] = []

    def start(
        endpoint: str,
        *args: str,
        layout: keys.Layout | None = None,
        script_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        argv = ["-etcd", endpoint, "-script", str(script_dir or EXAMPLE_SCRIPTS)]
        if layout is not None:
            argv += ["-prefix", layout.prefix]
        argv += list(args)
        # The state file (agent.inflight) of this test's own, not the user's default.
        env = {"GLEAM_STATE_DIR": str(tmp_path / "agent-state"), **(env or {})}
        agent = AgentProcess(argv, log_path=tmp_path / f"agent-{len(agents)}.log", env=env)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
