"""The rollout driver's reads and guarded gate writes, on the in-memory etcd
(gleam.fake_etcd, checked against a real etcd by test_fake_etcd.py): start, advance wave
by wave, halt, promote and abort, and the races its mod_revision guards settle. The same
driver over a real etcd and real agents: test_rollout_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest

from gleam import connection, etcdapi, fake_etcd, keys, messages, rollout, rollout_driver
from gleam.embedded import EtcdServer
from tests.support import connected

LAYOUT = keys.Layout("/gleam")
WEB = keys.Target.region("web")
AGENTS = ["web-1", "web-2", "web-3", "web-4"]


def register(etcd: fake_etcd.FakeEtcd, *ids: str, region: str = "web") -> None:
    for agent_id in ids:
        info = messages.AgentInfo(agent_id, "h", 1, [region], "1", "2026-11-30T07:00:00Z", "/s")
        etcd.put(LAYOUT.info_key(agent_id), info.encode())


def send_staged(etcd: fake_etcd.FakeEtcd, n: int = 1, **plan: Any) -> int:
    section = rollout.parse_plan(plan).to_json()
    task = messages.Task("roll", {"n": n}, rollout=section)
    return etcd.put(LAYOUT.region_key("web"), task.encode())


def answer(etcd: fake_etcd.FakeEtcd, revision: int, *ids: str, ok: bool = True) -> None:
    key = LAYOUT.region_key("web")
    for agent_id in ids:
        result = messages.Result(agent_id, key, revision, "roll", ok, error=None if ok else "boom")
        etcd.put(LAYOUT.result_key(agent_id, WEB), result.encode())


def stored_gate(etcd: fake_etcd.FakeEtcd) -> rollout.Gate | None:
    found = etcdapi.get_one(etcd, LAYOUT.rollout_key("web"))
    return None if found is None else rollout.decode_gate(found.value)


@pytest.fixture
def etcd() -> fake_etcd.FakeEtcd:
    backend = fake_etcd.FakeEtcd()
    register(backend, *AGENTS)
    register(backend, "db-1", region="db")
    return backend


def test_the_driver_starts_a_staged_task_and_admits_wave_by_wave_until_complete(
    etcd: fake_etcd.FakeEtcd,
) -> None:
    lines: list[str] = []
    driver = rollout_driver.Driver(etcd, LAYOUT, say=lines.append)
    revision = send_staged(etcd, waves=[1, "50%", "100%"], first=["web-3"])
    assert rollout_driver.staged_regions(etcd, LAYOUT) == ["web"]
    first = driver.step("web")
    assert first is not None and first == stored_gate(etcd)
    assert (first.revision, first.wave, first.admitted) == (revision, 1, ("web-3",))
    assert sorted(first.members) == AGENTS  # db-1 is not in region web
    assert driver.step("web") == first  # nobody answered: nothing written
    answer(etcd, revision, "web-3")
    second = driver.step("web")
    assert second is not None and second.wave == 2 and len(second.admitted) == 2
    answer(etcd, revision - 1, *AGENTS)  # results for another revision answer nothing
    assert driver.step("web") == second
    gates = rollout_driver.drive(driver, ["web"], timeout=0)
    assert gates == {"web": second}
    answer(etcd, revision, *second.admitted)
    third = driver.step("web")
    assert third is not None and third.wave == 3
    answer(etcd, revision, *AGENTS)
    done = rollout_driver.drive(driver, ["web"], timeout=5, sleep=lambda _: None)["web"]
    assert done is not None and done.state is rollout.State.COMPLETE
    assert lines[0] == "wave 1/3 admitted: web-3"
    assert lines[-1] == f"rollout {LAYOUT.region_key('web')} @{revision} complete"


def test_a_registration_not_stored_under_its_own_id_makes_no_member(
    etcd: fake_etcd.FakeEtcd,
) -> None:
    """A registration written by hand under another key (naming web-1 again, or an id
    that is no agent id) is not a live agent: web-1 is not admitted twice."""
    web_1 = messages.AgentInfo("web-1", "h", 1, ["web"], "1", "2026-11-30T07:00:00Z", "/s")
    etcd.put(LAYOUT.info_key("web-9"), web_1.encode())
    other = messages.AgentInfo("../x", "h", 1, ["web"], "1", "2026-11-30T07:00:00Z", "/s")
    etcd.put(LAYOUT.info_prefix + "../x", other.encode())
    send_staged(etcd, waves=["100%"])
    view = rollout_driver.read(etcd, LAYOUT, "web")
    assert view.region_agents == tuple(AGENTS) and "web-9" not in view.live
    gate = rollout_driver.Driver(etcd, LAYOUT).step("web")
    assert gate is not None and sorted(gate.members) == AGENTS


def test_a_gate_write_loses_when_the_gate_or_the_task_changed_since_the_read(
    etcd: fake_etcd.FakeEtcd,
) -> None:
    send_staged(etcd, waves=["100%"])
    view = rollout_driver.read(etcd, LAYOUT, "web")
    assert view.plan is not None and view.gate is None and view.gate_revision == 0
    gate = rollout.start(
        view.plan, key=view.task_key, revision=view.task_revision, region="web",
        agents=view.region_agents, now=rollout_driver.now_utc(),
    )  # fmt: skip
    assert rollout_driver.write(etcd, LAYOUT, view, gate)
    # A second driver with the same (now stale) view: its gate is not written.
    assert not rollout_driver.write(etcd, LAYOUT, view, gate)
    fresh = rollout_driver.read(etcd, LAYOUT, "web")
    assert fresh.current and fresh.gate == gate
    send_staged(etcd, n=2, waves=["100%"])  # the task is replaced under the driver
    assert not rollout_driver.write(etcd, LAYOUT, fresh, gate)
    assert stored_gate(etcd) == gate


def test_two_drivers_admit_each_wave_once(etcd: fake_etcd.FakeEtcd) -> None:
    lines: list[str] = []
    drivers = [rollout_driver.Driver(etcd, LAYOUT, say=lines.append) for _ in range(2)]
    revision = send_staged(etcd, waves=[1, "100%"], first=["web-1"])
    assert [d.step("web") for d in drivers][0] == stored_gate(etcd)
    answer(etcd, revision, "web-1")
    gates = [d.step("web") for d in drivers]
    assert gates[0] == gates[1] == stored_gate(etcd)
    assert gates[0] is not None and gates[0].wave == 2
    assert [line.split(":")[0] for line in lines].count("wave 2/2 admitted") == 1


def test_a_failure_halts_and_promote_and_abort_are_guarded_moves(
    etcd: fake_etcd.FakeEtcd,
) -> None:
    driver = rollout_driver.Driver(etcd, LAYOUT, say=lambda _: None)
    with pytest.raises(rollout_driver.RolloutRefused, match="no rollout for its current task"):
        driver.promote("web")
    revision = send_staged(etcd, waves=[1, "100%"], first=["web-2"])
    driver.step("web")
    answer(etcd, revision, "web-2", ok=False)
    halted = driver.step("web")
    assert halted is not None and halted.state is rollout.State.HALTED
    assert halted.reason == "web-2 failed: boom"
    promoted = driver.promote("web")
    assert promoted.state is rollout.State.PROGRESSING and stored_gate(etcd) == promoted
    aborted = driver.abort("web")
    assert aborted.state is rollout.State.ABORTED and stored_gate(etcd) == aborted
    with pytest.raises(rollout_driver.RolloutRefused):
        driver.promote("web")
    assert driver.step("web") == aborted


def test_a_result_record_garbled_after_the_task_halts_the_rollout_an_older_one_waits(
    etcd: fake_etcd.FakeEtcd,
) -> None:
    driver = rollout_driver.Driver(etcd, LAYOUT, say=lambda _: None)
    garbage_key = LAYOUT.result_key("web-2", WEB)
    etcd.put(garbage_key, b"\xff from before the task")
    revision = send_staged(etcd, waves=[1, "100%"], first=["web-2"])
    started = driver.step("web")
    assert driver.step("web") == started  # an older unreadable record: no report yet
    etcd.put(garbage_key, b"\xff written after the task")
    halted = driver.step("web")
    assert halted is not None and halted.state is rollout.State.HALTED
    assert halted.reason.startswith(f"web-2 failed: result record {garbage_key} cannot be read")
    assert revision == halted.revision


def test_an_etcd_failure_reaches_the_caller_as_the_seams_error(
    etcd: fake_etcd.FakeEtcd,
) -> None:
    send_staged(etcd, waves=["100%"])

    def refuse(call: str) -> None:
        raise etcdapi.EtcdError(f"{call}: etcd is away")

    etcd.fail = refuse
    driver = rollout_driver.Driver(etcd, LAYOUT)
    with pytest.raises(etcdapi.EtcdError, match="etcd is away"):
        driver.step_all()
    with pytest.raises(etcdapi.EtcdError):
        driver.abort("web")


def test_over_pyetcd_its_callers_still_get_pyetcds_errors(private_etcd: EtcdServer) -> None:
    # gleam-reconcile and gleam-client catch connection.ETCD_ERRORS around the driver.
    with connected(private_etcd.endpoint) as client:
        driver = rollout_driver.Driver.over(client, LAYOUT)
        assert driver.step_all() == {}
        private_etcd.stop()
        with pytest.raises(connection.ETCD_ERRORS):
            driver.step("web")
