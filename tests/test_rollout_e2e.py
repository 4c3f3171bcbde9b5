"""Rollouts with a real etcd and real agent processes (six or more in region web)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gleam import cli, keys, rollout, rollout_driver
from gleam.embedded import EtcdServer
from tests.reconcile_support import OpsRepo, run_cli
from tests.rollout_support import Region, gate, send_staged, wait_registered
from tests.support import ROOT, AgentProcess, client_for, wait_until

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


def wait_state(driver: rollout_driver.Driver, state: rollout.State) -> rollout.Gate:
    def reached() -> rollout.Gate | None:
        found = driver.step("web")
        return found if found is not None and found.state is state else None

    found = wait_until(reached, timeout=60, what=f"the rollout {state.value}")
    assert found is not None
    return found


def manifest(n: int, fail: list[str]) -> str:
    return (
        f"name: roll\ndata: {{n: {n}, fail: {json.dumps(fail)}}}\n"
        "rollout:\n  waves: [1, '50%', '100%']\n  first: [web-4]\n"
    )


def test_a_failing_canary_halts_with_only_the_canary_run_then_a_revert_completes(
    capsys: Any,
    web: Region,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    tmp_path: Path,
) -> None:
    repo = OpsRepo(tmp_path / "ops")
    repo.write("tasks/regions/web.yaml", manifest(1, ["web-4"]))
    repo.commit("a change that breaks web-4")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--wait", "60")
    assert code == 1, out + err
    halted = gate(etcd, layout)
    assert halted is not None and halted.state is rollout.State.HALTED
    assert halted.reason == "web-4 failed: Lua error: roll.lua:5: broken on web-4"
    assert "wave 1/3 admitted: web-4" in out
    key = layout.region_key("web")
    assert f"rollout {key} @{halted.revision} halted: {halted.reason}" in out
    assert "wave 2/3" not in out and "nothing was written" not in out
    assert web.ran(1) == {"web-4"}
    # The fix: a revert commit is a new revision, a fresh rollout from wave 1.
    repo.write("tasks/regions/web.yaml", manifest(2, []))
    repo.commit("revert")
    code, out, err = run_cli(
        capsys, etcd_server.endpoint, layout, repo, "--wait", "60", "--output", "json"
    )
    assert code == 0, out + err
    [entry] = json.loads(out)["rollouts"]
    assert (entry["region"], entry["state"], entry["wave"]) == ("web", "complete", 3)
    wait_until(lambda: web.ran(2) == set(IDS), what="every agent ran n=2")
    assert web.ran(1) == {"web-4"}  # nobody ran the broken revision later
    assert all(web.runs(a).count(2) == 1 for a in IDS)


def test_max_failed_tolerates_one_manual_waits_for_promote_and_abort_stops(
    web: Region, etcd: Any, layout: keys.Layout
) -> None:
    driver = rollout_driver.Driver.over(etcd, layout)
    plan = {"waves": [2, "100%"], "first": ["web-2", "web-3"], "max_failed": 1, "manual": True}
    send_staged(etcd, layout, n=1, fail=["web-2"], **plan)
    paused = wait_state(driver, rollout.State.PAUSED)
    assert paused.failed == ("web-2",) and paused.wave == 1
    assert web.ran(1) == {"web-2", "web-3"}
    driver.promote("web")
    done = wait_state(driver, rollout.State.COMPLETE)
    assert done.failed == ("web-2",)
    wait_until(lambda: web.ran(1) == set(IDS), what="every agent ran n=1")

    send_staged(etcd, layout, n=2, waves=[1, "100%"], first=["web-5"], manual=True)
    wait_state(driver, rollout.State.PAUSED)
    aborted = driver.abort("web")
    assert aborted.state is rollout.State.ABORTED
    with pytest.raises(rollout_driver.RolloutRefused):
        driver.promote("web")
    assert driver.step("web") == aborted  # nothing more is admitted
    assert web.ran(2) == {"web-5"}


def test_drivers_replaced_or_racing_admit_each_wave_once_and_held_agents_run_once(
    web: Region, etcd: Any, layout: keys.Layout
) -> None:
    lines: list[str] = []
    first = rollout_driver.Driver.over(etcd, layout, say=lines.append)
    send_staged(etcd, layout, n=1, waves=[1, 2, 4, "100%"])
    gate_now = wait_until(
        lambda: (g := first.step("web")) is not None and g.wave >= 2 and g, what="wave 2"
    )
    # The first driver is gone; a member of a later wave restarts while holding, and an
    # agent joins the region mid-rollout.
    later = gate_now.members[-1]
    web.agents[later].stop()
    web.start(later)
    web.start("web-7")
    wait_until(lambda: "holding" in web.agents[later].log(), what=f"{later} holding")
    wait_registered(etcd, layout, 7)
    # Two new drivers at once take over from the gate record.
    racers = [rollout_driver.Driver.over(etcd, layout, say=lines.append) for _ in range(2)]
    threads = [
        threading.Thread(target=rollout_driver.drive, args=(d, ["web"]), kwargs={"timeout": 60})
        for d in racers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = gate(etcd, layout)
    assert done is not None and done.state is rollout.State.COMPLETE
    admitted = [line.split(":")[0] for line in lines if "admitted" in line]
    assert admitted == [f"wave {i}/4 admitted" for i in range(1, 5)]
    wait_until(lambda: web.ran(1) == {*IDS, "web-7"}, what="every agent ran, web-7 too")
    assert all(web.runs(a) == [1] for a in [*IDS, "web-7"])
    assert "web-7" not in done.members


def test_the_client_sends_a_staged_task_drives_it_and_status_shows_held_agents(
    capsys: Any, web: Region, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    def client(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["-etcd", etcd_server.endpoint, "-prefix", layout.prefix, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    canary = rollout.admission_order(IDS, region="web", first=[])[0]
    send = ["-target", "region/web", "-fn", "roll", "-rollout", "1,50%,100%", "-wait", "60"]
    code, out, err = client(*send, "-data", json.dumps({"n": 1, "fail": [canary]}))
    assert code == 1, out + err
    assert f"wave 1/3 admitted: {canary}" in out and "halted" in out
    assert web.ran(1) == {canary}

    code, out, err = client("status")
    assert code == 1, out + err
    assert "ROLLOUTS (1)" in out and "halted" in out
    assert "5 held" in out
    capsys.readouterr()
    code = cli.main(
        ["-etcd", etcd_server.endpoint, "-prefix", layout.prefix, "--output", "json", "status"]
    )
    body = json.loads(capsys.readouterr().out)
    [entry] = body["rollouts"]
    assert (entry["state"], entry["failed"], entry["held"]) == ("halted", 1, 5)
    assert client("rollout", "status", "web")[0] == 1
    code, out, err = client("rollout", "abort", "web")
    assert code == 0 and "aborted" in out, out + err
    assert client("rollout", "promote", "web")[0] == 1  # an aborted rollout stays aborted

    code, out, err = client(*send, "-data", json.dumps({"n": 2}))
    assert code == 0, out + err
    assert "wave 3/3 admitted" in out and "complete" in out
    wait_until(lambda: web.ran(2) == set(IDS), what="every agent ran n=2")
    code, out, err = client("rollout", "status")
    assert code == 0 and "complete  wave 3/3  admitted all/6" in out, out + err
    for bad in (["rollout"], ["rollout", "promote"], ["rollout", "abort", "../x"]):
        assert client(*bad)[0] == 2
    assert client("-target", "node/web-1", "-fn", "roll", "-rollout", "1,100%")[0] == 2
    assert client("-target", "region/web", "-fn", "roll", "-rollout", "5,2,100%")[0] == 2


def test_the_reconcile_daemon_drives_a_rollout_and_a_killed_daemon_is_replaced(
    web: Region, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, tmp_path: Path
) -> None:
    repo = OpsRepo(tmp_path / "ops")
    repo.write(
        "tasks/regions/web.yaml",
        "name: roll\ndata: {n: 1}\nrollout:\n  waves: [1, 2, 4, '100%']\n  bake: 0.5\n",
    )
    repo.commit("staged")

    def daemon(name: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / name, "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "reconciler.cli", "-etcd", etcd_server.endpoint,
                 "-prefix", layout.prefix, "--repo", str(repo.path), "--interval", "60"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip

    first = daemon("first.log")
    try:
        wait_until(lambda: (g := gate(etcd, layout)) is not None and g.wave >= 2, what="wave 2")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = daemon("second.log")
        try:
            wait_until(
                lambda: (g := gate(etcd, layout)) is not None and g.state is rollout.State.COMPLETE,
                what="the rollout complete",
            )
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=30) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    logs = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text()
    for wave in range(1, 5):
        assert logs.count(f"wave {wave}/4 admitted") == 1, logs
    wait_until(lambda: web.ran(1) == set(IDS), what="every agent ran n=1")
    assert all(web.runs(a) == [1] for a in IDS)


def test_an_agent_frozen_while_holding_finds_its_gate_after_a_compaction_and_runs_once(
    private_etcd: EtcdServer,
    layout: keys.Layout,
    tmp_path: Path,
    start_agent: Callable[..., AgentProcess],
) -> None:
    etcd = client_for(private_etcd.endpoint)
    try:
        region = Region(tmp_path, private_etcd.endpoint, layout, start_agent)
        agent = region.start("web-1", "-ttl", "30")
        wait_registered(etcd, layout, 1)
        send_staged(etcd, layout, n=1, waves=["100%"])
        wait_until(lambda: "holding" in agent.log(), what="web-1 holding")
        agent.signal(signal.SIGSTOP)
        try:
            private_etcd.kill()
            private_etcd.start()
            started = rollout_driver.Driver.over(etcd, layout).step("web")
            assert started is not None and started.admitted == ("web-1",)
            revision = int(etcd.put("/compaction-marker", b"x").header.revision)
            etcd.compact(revision, physical=True)
        finally:
            agent.signal(signal.SIGCONT)
        wait_until(lambda: region.runs("web-1") == [1], timeout=40, what="web-1 ran n=1")
        assert "compacted" in agent.log()
    finally:
        etcd.close()
