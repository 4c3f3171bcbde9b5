"""gleam-agent under etcd trouble: killed, frozen, compacted, leases lost, late writes.
Each test has an etcd of its own (private_etcd, or a 3-member cluster) and real agent
subprocesses. After healing, each test checks the agent's history: every result record
names the revision the agent last ran for that key (from its own log), never an older one."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import store
from gleam import connection, keys, messages
from gleam.embedded import EtcdServer
from tests import run_history
from tests.agent_support import (
    StartAgent,
    info,
    node,
    result,
    send,
    wait_log,
    wait_registered,
    wait_result,
)
from tests.etcd_cluster import EtcdCluster
from tests.support import AgentProcess, client_for, connected, wait_until
from tests.tcp_proxy import Proxy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_gleam_environment")]

LAYOUT = keys.Layout("/gleam")


@pytest.fixture
def etcd(private_etcd: EtcdServer) -> Iterator[Any]:
    with connected(private_etcd.endpoint) as client:
        yield client


def assert_results_follow_runs(etcd: Any, agent_id: str, *agents: AgentProcess) -> None:
    """The history check: once settled, each of the agent's records names the revision it
    last ran for that key, over its processes' logs in order (never an older one)."""

    def mismatches() -> list[run_history.Mismatch]:
        return run_history.check(etcd, LAYOUT, agent_id, [a.log() for a in agents])

    # On a timeout the assertion just below reports the details.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not mismatches(), timeout=30, what="the records to match the runs")
    assert mismatches() == []
    assert run_history.last_runs(a.log() for a in agents), "the agent ran nothing?"
    for agent in agents:
        assert run_history.duplicates(agent.log()) == []


def test_etcd_killed_and_restarted_under_a_running_agent(
    private_etcd: EtcdServer, etcd: Any, start_agent: StartAgent, lua_dir: Path
) -> None:
    agent = start_agent(
        private_etcd.endpoint, "-id", "k", "-ttl", "5", "-check_interval", "1",
        layout=LAYOUT, script_dir=lua_dir,
    )  # fmt: skip
    _info, lease_before = wait_registered(etcd, LAYOUT, "k")
    revision = send(etcd, LAYOUT, node("k"), "echo", "before")
    wait_result(etcd, LAYOUT, "k", node("k"), revision)

    private_etcd.kill()
    wait_log(agent, "etcd: ")  # the watch loop noticed
    private_etcd.start()
    assert agent.proc.poll() is None
    revision = send(etcd, LAYOUT, node("k"), "echo", "after")
    got = wait_result(etcd, LAYOUT, "k", node("k"), revision)
    assert (got.ok, got.result) == (True, "after")
    # The registration is there and its lease is alive and kept alive.
    _info, lease_after = wait_registered(etcd, LAYOUT, "k")
    wait_until(lambda: etcd.get_lease_info(lease_after).TTL > 0, what="a live lease")
    assert lease_before and lease_after
    assert_results_follow_runs(etcd, "k", agent)


def test_a_result_finished_while_etcd_is_down_is_written_when_it_returns(
    private_etcd: EtcdServer,
    etcd: Any,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    agent = start_agent(private_etcd.endpoint, "-id", "w", layout=LAYOUT, script_dir=lua_dir)
    revision = send(etcd, LAYOUT, node("w"), "gate", {"gate": str(gate), "n": 5})
    wait_log(agent, "waiting at the gate")
    private_etcd.kill()
    gate.touch()
    wait_log(agent, "cannot write result")
    private_etcd.start()
    got = wait_result(etcd, LAYOUT, "w", node("w"), revision)
    assert (got.ok, got.result) == (True, 5)
    assert_results_follow_runs(etcd, "w", agent)


def test_a_frozen_etcd_is_noticed_and_the_agent_recovers(
    private_etcd: EtcdServer, etcd: Any, start_agent: StartAgent, lua_dir: Path
) -> None:
    agent = start_agent(
        private_etcd.endpoint, "-id", "f", "-check_interval", "1",
        layout=LAYOUT, script_dir=lua_dir,
    )  # fmt: skip
    wait_registered(etcd, LAYOUT, "f")
    revision = send(etcd, LAYOUT, node("f"), "echo", "before")
    wait_result(etcd, LAYOUT, "f", node("f"), revision)
    private_etcd.pause()
    try:
        # A read times out, or keepalive pings go unanswered: either way it is noticed.
        wait_log(agent, "etcd: ", timeout=40)
    finally:
        private_etcd.resume()
    revision = send(etcd, LAYOUT, node("f"), "echo", "after")
    got = wait_result(etcd, LAYOUT, "f", node("f"), revision, timeout=40)
    assert (got.ok, got.result) == (True, "after")
    wait_registered(etcd, LAYOUT, "f")
    assert agent.proc.poll() is None
    assert_results_follow_runs(etcd, "f", agent)


def compact(etcd: Any) -> int:
    revision = int(etcd.put("/compaction-marker", b"x").header.revision)
    etcd.compact(revision, physical=True)
    return revision


def test_compaction_while_the_agent_was_stopped(
    private_etcd: EtcdServer,
    etcd: Any,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    counter = tmp_path / "count.txt"
    args = ("-id", "c1")
    first = start_agent(private_etcd.endpoint, *args, layout=LAYOUT, script_dir=lua_dir)
    done = send(etcd, LAYOUT, node("c1"), "count", {"file": str(counter), "n": 1})
    wait_result(etcd, LAYOUT, "c1", node("c1"), done)
    assert first.stop() == 0
    for n in (2, 3):
        newest = send(etcd, LAYOUT, node("c1"), "count", {"file": str(counter), "n": n})
    compact(etcd)
    second = start_agent(private_etcd.endpoint, *args, layout=LAYOUT, script_dir=lua_dir)
    got = wait_result(etcd, LAYOUT, "c1", node("c1"), newest)
    assert (got.revision, got.result) == (newest, 3)
    assert counter.read_text().splitlines() == ["1", "3"]
    assert_results_follow_runs(etcd, "c1", first, second)


def test_compaction_while_the_watch_was_down_rereads_and_runs_what_changed(
    private_etcd: EtcdServer,
    etcd: Any,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    """The agent is frozen while etcd restarts (its watch is now dead), the key changes
    twice and etcd compacts past the agent's last revision. When the agent thaws, its
    resumed watch finds the revision compacted; it re-reads and runs the newest value."""
    counter = tmp_path / "count.txt"
    agent = start_agent(
        private_etcd.endpoint, "-id", "c2", "-ttl", "30", layout=LAYOUT, script_dir=lua_dir
    )
    done = send(etcd, LAYOUT, node("c2"), "count", {"file": str(counter), "n": 1})
    wait_result(etcd, LAYOUT, "c2", node("c2"), done)
    agent.signal(signal.SIGSTOP)
    try:
        private_etcd.kill()
        private_etcd.start()
        for n in (2, 3):
            newest = send(etcd, LAYOUT, node("c2"), "count", {"file": str(counter), "n": n})
        compact(etcd)
    finally:
        agent.signal(signal.SIGCONT)
    got = wait_result(etcd, LAYOUT, "c2", node("c2"), newest, timeout=40)
    assert (got.revision, got.result) == (newest, 3)
    assert counter.read_text().splitlines() == ["1", "3"]
    assert "compacted" in agent.log()
    assert_results_follow_runs(etcd, "c2", agent)


def test_a_lost_lease_is_replaced_and_the_agent_registers_again(
    private_etcd: EtcdServer, etcd: Any, start_agent: StartAgent, lua_dir: Path
) -> None:
    agent = start_agent(
        private_etcd.endpoint, "-id", "l", "-ttl", "3", layout=LAYOUT, script_dir=lua_dir
    )
    _info, lease = wait_registered(etcd, LAYOUT, "l")
    etcd.revoke_lease(lease)

    def registered_anew() -> tuple[messages.AgentInfo, int] | None:
        found = info(etcd, LAYOUT, "l")
        return found if found is not None and found[1] != lease else None

    found = wait_until(registered_anew, what="a registration with a new lease")
    assert found is not None
    record, new_lease = found
    assert record.pid == agent.pid
    wait_log(agent, "registering again")
    revision = send(etcd, LAYOUT, node("l"), "echo", "ok")
    assert wait_result(etcd, LAYOUT, "l", node("l"), revision).ok
    assert result(etcd, LAYOUT, "l", node("l")) is not None
    assert new_lease != lease
    assert_results_follow_runs(etcd, "l", agent)


def test_an_agent_started_before_etcd_waits_for_it(
    private_etcd: EtcdServer, etcd: Any, start_agent: StartAgent, lua_dir: Path
) -> None:
    private_etcd.stop()
    agent = start_agent(private_etcd.endpoint, "-id", "early", layout=LAYOUT, script_dir=lua_dir)
    wait_log(agent, "registration: ")
    private_etcd.start()
    wait_registered(etcd, LAYOUT, "early")
    revision = send(etcd, LAYOUT, node("early"), "echo", "late etcd")
    assert wait_result(etcd, LAYOUT, "early", node("early"), revision).result == "late etcd"
    assert_results_follow_runs(etcd, "early", agent)


def test_sigterm_while_etcd_is_down_still_exits_cleanly(
    private_etcd: EtcdServer, etcd: Any, start_agent: StartAgent, lua_dir: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "agent.pid"
    agent = start_agent(
        private_etcd.endpoint, "-id", "down", "-pid", str(pid_file),
        layout=LAYOUT, script_dir=lua_dir,
    )  # fmt: skip
    wait_registered(etcd, LAYOUT, "down")
    private_etcd.kill()
    wait_log(agent, "etcd: ")
    agent.signal(signal.SIGTERM)
    assert agent.wait(timeout=40) == 0
    assert not pid_file.exists()
    assert "could not revoke lease" in agent.log()


def test_etcd_restored_from_an_older_backup_is_noticed_and_new_tasks_run(
    private_etcd: EtcdServer,
    etcd: Any,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    counter, backup = tmp_path / "count.txt", tmp_path / "backup"
    member_data = Path(private_etcd.data_dir) / "member-data"
    agent = start_agent(
        private_etcd.endpoint, "-id", "rw", "-check_interval", "0.5",
        layout=LAYOUT, script_dir=lua_dir,
    )  # fmt: skip
    first = send(etcd, LAYOUT, node("rw"), "count", {"file": str(counter), "n": 1})
    wait_result(etcd, LAYOUT, "rw", node("rw"), first)
    private_etcd.stop()
    shutil.copytree(member_data, backup)
    private_etcd.start()
    for i in range(20):
        etcd.put(f"/elsewhere/{i}", b"x")
    second = send(etcd, LAYOUT, node("rw"), "count", {"file": str(counter), "n": 2})
    wait_result(etcd, LAYOUT, "rw", node("rw"), second)

    private_etcd.stop()
    shutil.rmtree(member_data)
    shutil.copytree(backup, member_data)
    private_etcd.start()
    wait_log(agent, "restored from a backup", timeout=40)
    third = send(etcd, LAYOUT, node("rw"), "count", {"file": str(counter), "n": 3})
    assert third < second, "etcd's revisions went back"
    got = wait_result(etcd, LAYOUT, "rw", node("rw"), third, timeout=40)
    assert (got.revision, got.result) == (third, 3)
    assert counter.read_text().splitlines() == ["1", "2", "3"]
    assert_results_follow_runs(etcd, "rw", agent)


def enable_auth(server: EtcdServer, password: str) -> Any:
    """Turn etcd auth on (user root) and return a client logged in as root."""
    etcdctl = [str(Path(sys.executable).parent / "etcdctl"), "--endpoints", server.endpoint]
    for args in (["user", "add", f"root:{password}"], ["auth", "enable"]):
        subprocess.run([*etcdctl, *args], check=True, capture_output=True, timeout=30)
    return connection.connect(
        connection.make_settings(server.endpoint, user="root", password=password)
    )


def test_an_agent_with_etcd_auth_runs_tasks_and_scripts_reach_etcd(
    private_etcd: EtcdServer, start_agent: StartAgent, lua_dir: Path
) -> None:
    authed = enable_auth(private_etcd, "secret")
    try:
        agent = start_agent(
            private_etcd.endpoint, "-id", "auth", "-user", "root", "-password", "secret",
            layout=LAYOUT,
        )  # fmt: skip
        wait_registered(authed, LAYOUT, "auth")
        revision = send(authed, LAYOUT, node("auth"), "etcd", "behind auth")
        got = wait_result(authed, LAYOUT, "auth", node("auth"), revision)
        assert (got.ok, got.result) == (True, "behind auth"), got.error
        assert authed.get("/foobar/config1")[0] == b"behind auth"
        assert agent.proc.poll() is None
        log = agent.log()
        assert log.count("etcd authentication over http://") == 1, log
    finally:
        authed.close()


# Everywhere a script, or a program it runs, could look for the agent's credentials.
LOOK_FOR_SECRETS = r"""
local _, env = gleam.exec({"env"})
local _, runner = gleam.exec({"sh", "-c", "tr '\\0' '\\n' < /proc/$PPID/environ"})
local f = assert(io.open("/proc/self/environ", "rb"))
local own = f:read("a"):gsub("%z", "\n")
f:close()
return {
  getenv = {os.getenv("GLEAM_PASSWORD") or false, os.getenv("GLEAM_USER") or false},
  exec_env = env, runner_environ = runner, own_environ = own,
}
"""


def test_credentials_stay_with_the_agent(
    private_etcd: EtcdServer, start_agent: StartAgent, lua_dir: Path, tmp_path: Path
) -> None:
    password = "pw-that-must-not-leak"
    (lua_dir / "secrets.lua").write_text(LOOK_FOR_SECRETS)
    password_file = tmp_path / "etcd-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    authed = enable_auth(private_etcd, password)
    try:
        from_env = start_agent(
            private_etcd.endpoint, "-id", "env", layout=LAYOUT, script_dir=lua_dir,
            env={"GLEAM_USER": "root", "GLEAM_PASSWORD": password},
        )  # fmt: skip
        from_file = start_agent(
            private_etcd.endpoint, "-id", "file", "-user", "root",
            "-password_file", str(password_file), layout=LAYOUT, script_dir=lua_dir,
        )  # fmt: skip
        for agent_id, agent in (("env", from_env), ("file", from_file)):
            wait_registered(authed, LAYOUT, agent_id)
            revision = send(authed, LAYOUT, node(agent_id), "secrets")
            got = wait_result(authed, LAYOUT, agent_id, node(agent_id), revision)
            assert got.ok, got.error
            assert got.result["getenv"] == [False, False]
            assert all(
                "PATH=" in got.result[k] for k in ("exec_env", "runner_environ", "own_environ")
            )
            assert password not in json.dumps(got.result)
            # Nor can any other process of the agent's user read it from /proc.
            for what in ("environ", "cmdline"):
                assert password.encode() not in Path(f"/proc/{agent.pid}/{what}").read_bytes()
    finally:
        authed.close()


# Late writes on a 3-member etcd (issue 15) -----------------------------------------------


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> EtcdCluster:
    return etcd_cluster


@pytest.fixture
def frozen_route(cluster: EtcdCluster) -> Iterator[tuple[Any, Proxy]]:
    """A follower to freeze, behind a proxy that keeps a dead client's requests alive
    (see tests.tcp_proxy); yields (that member, the proxy)."""
    leader = cluster.wait_leader()
    follower = next(m for m in cluster.members if m is not leader)
    proxy = Proxy(follower.port)
    try:
        yield follower, proxy
    finally:
        follower.resume()
        proxy.close()


def others(cluster: EtcdCluster, member: Any) -> str:
    return ",".join(m.endpoint for m in cluster.members if m is not member)


# A result bigger than this is the one write of the test that carries it.
PADDING = 8 * 1024


def test_a_late_result_write_from_a_dead_agent_never_overwrites_a_newer_result(
    cluster: EtcdCluster,
    frozen_route: tuple[Any, Proxy],
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    """Issue 15: a result write in flight to a member that is SIGSTOPped, the agent
    SIGKILLed, a newer task run and recorded by the restarted agent, the member SIGCONTed:
    the late write reaches etcd and fails its compare; the record names the newer run."""
    frozen, proxy = frozen_route
    etcd = client_for(others(cluster, frozen))
    try:
        gate = tmp_path / "gate"
        first = start_agent(
            f"{proxy.endpoint},{others(cluster, frozen)}", "-id", "late", "-ttl", "30",
            layout=LAYOUT, script_dir=lua_dir,
        )  # fmt: skip
        oldest = send(etcd, LAYOUT, node("late"), "echo", "first")
        wait_result(etcd, LAYOUT, "late", node("late"), oldest)
        dead_run = send(etcd, LAYOUT, node("late"), "gate", {"gate": str(gate), "n": "x" * PADDING})
        wait_log(first, "waiting at the gate")
        frozen.pause()
        gate.touch()
        in_flight = wait_until(
            lambda: proxy.requests_over(PADDING), what="the result write sent to the frozen member"
        )
        first.stop(sig=signal.SIGKILL)
        (link, stream), *_ = in_flight
        assert stream not in link.cancelled_streams(), "the client cancelled its write"

        newer = send(etcd, LAYOUT, node("late"), "echo", "newer")
        second = start_agent(
            others(cluster, frozen), "-id", "late", layout=LAYOUT, script_dir=lua_dir
        )
        got = wait_result(etcd, LAYOUT, "late", node("late"), newer, timeout=60)
        assert (got.revision, got.result) == (newer, "newer")

        frozen.resume()
        wait_until(
            lambda: stream in link.answered_streams(),
            timeout=60,
            what="the thawed member's answer to the late write",
        )
        assert dead_run < newer
        final = result(etcd, LAYOUT, "late", node("late"))
        assert final is not None and (final.revision, final.result) == (newer, "newer")
        assert_results_follow_runs(etcd, "late", first, second)
        # The thawed member has the same record: the late write was refused, not outvoted.
        thawed = client_for(frozen.endpoint)
        try:
            wait_until(
                lambda: result(thawed, LAYOUT, "late", node("late")) == final,
                what="the thawed member to catch up",
            )
        finally:
            thawed.close()
    finally:
        etcd.close()


def test_a_late_registration_put_with_a_revoked_lease_does_not_bring_the_record_back(
    cluster: EtcdCluster, frozen_route: tuple[Any, Proxy]
) -> None:
    """The registration is lease-bound: a late put whose lease is gone fails (etcd
    checks the lease when it applies the put), even when its compare still holds."""
    frozen, proxy = frozen_route
    etcd = client_for(others(cluster, frozen))
    late = store.Store(connection.make_settings(proxy.endpoint, timeout=120.0))
    key = LAYOUT.info_key("gone")
    value = b"x" * PADDING
    try:
        late.read_keys([key])  # connected through the proxy while the member runs
        lease = etcd.lease(30)
        frozen.pause()
        outcome: list[BaseException | store.TxnOutcome] = []

        def put() -> None:
            try:
                outcome.append(late.put_guarded([store.Guarded(key, value, 0, lease.id)]))
            except store.StoreError as exc:
                outcome.append(exc)

        writer = threading.Thread(target=put, daemon=True)
        writer.start()
        in_flight = wait_until(
            lambda: proxy.requests_over(PADDING), what="the registration put in flight"
        )
        proxy.sever_clients()  # the process that sent it is gone
        writer.join(30)
        assert outcome and isinstance(outcome[0], store.StoreError)
        etcd.revoke_lease(lease.id)
        frozen.resume()
        (link, stream), *_ = in_flight
        wait_until(
            lambda: stream in link.answered_streams(),
            timeout=60,
            what="the thawed member's answer to the late put",
        )
        assert etcd.get(key)[0] is None
    finally:
        late.close()
        etcd.close()
