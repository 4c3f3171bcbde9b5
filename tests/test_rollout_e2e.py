"""Rollouts with a real etcd and real agent processes (six or more in region web)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gleam import keys, rollout, rollout_driver
from gleam.embedded import EtcdServer
from tests.rollout_support import Region, send_staged, wait_registered
from tests.support import AgentProcess, wait_until

pytestmark = pytest.mark.slow

IDS = [f"web-{i}" for i in range(1, 7)]


@pytest.fixture
def web(
    tmp_path: Path,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: Callable[..., AgentProcess],
) -> Region:
    region = Region(tmp_path, etcd_server.endpoint, layout, start_agent)
    for agent_id in IDS:
        region.start(agent_id)
    wait_registered(etcd, layout, len(IDS))
    return region


def drive(
    etcd: Any, layout: keys.Layout, lines: list[str] | None = None, timeout: float = 60.0
) -> rollout.Gate:
    driver = rollout_driver.Driver(etcd, layout, say=(lines if lines is not None else []).append)
    gates = rollout_driver.drive(driver, ["web"], timeout=timeout)
    found = gates["web"]
    assert found is not None
    return found


def test_a_failing_canary_halts_with_only_the_canary_run_then_a_fix_completes(
    web: Region, etcd: Any, layout: keys.Layout
) -> None:
    send_staged(etcd, layout, n=1, fail=["web-4"], waves=[1, "50%", "100%"], first=["web-4"])
    lines: list[str] = []
    halted = drive(etcd, layout, lines)
    assert halted.state is rollout.State.HALTED
    assert halted.reason == "web-4 failed: Lua error: roll.lua:5: broken on web-4"
    assert lines[0] == "wave 1/3 admitted: web-4"
    assert (
        lines[-1]
        == f"rollout {layout.region_key('web')} @{halted.revision} halted: {halted.reason}"
    )
    assert web.ran(1) == {"web-4"}
    # The fix: a new revision starts a fresh rollout from wave 1, which completes.
    revision = send_staged(etcd, layout, n=2, waves=[1, "50%", "100%"], first=["web-4"])
    lines.clear()
    done = drive(etcd, layout, lines)
    assert (done.state, done.revision, done.admitted) == (rollout.State.COMPLETE, revision, "*")
    wait_until(lambda: web.ran(2) == set(IDS), what="every agent ran n=2")
    assert web.ran(1) == {"web-4"}  # nobody ran the broken revision later
    assert [line.split(":")[0] for line in lines if "admitted" in line] == [
        "wave 1/3 admitted",
        "wave 2/3 admitted",
        "wave 3/3 admitted",
    ]
    assert all(web.runs(a).count(2) == 1 for a in IDS)
