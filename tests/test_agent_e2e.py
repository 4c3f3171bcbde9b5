"""gleam-agent end to end: real etcd, real agent subprocesses running Lua."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gleam import keys, messages
from gleam.embedded import EtcdServer, free_port
from tests.agent_support import (
    StartAgent,
    info,
    node,
    put_raw,
    region,
    result,
    send,
    wait_log,
    wait_registered,
    wait_result,
)
from tests.support import EXAMPLE_SCRIPTS, ROOT, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_gleam_environment")]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# Registration and tasks -------------------------------------------------------------


def test_registration_record_and_node_task_result(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent
) -> None:
    agent = start_agent(
        etcd_server.endpoint, "-id", "web-1", "-region", "eu:web", "-ttl", "4", layout=layout
    )
    record, lease_id = wait_registered(etcd, layout, "web-1")
    assert record.id == "web-1"
    assert record.pid == agent.pid
    assert record.regions == ["eu", "web"]
    assert record.script_dir == str(EXAMPLE_SCRIPTS)
    assert record.version and record.hostname
    assert record.started.endswith("Z") and "T" in record.started
    assert lease_id != 0
    assert 0 < etcd.get_lease_info(lease_id).grantedTTL <= 5

    revision = send(etcd, layout, node("web-1"), "print", {"x": [1, 2]})
    got = wait_result(etcd, layout, "web-1", node("web-1"), revision)
    assert got.revision == revision
    assert (got.agent, got.key, got.name, got.ok) == (
        "web-1",
        layout.node_key("web-1"),
        "print",
        True,
    )
    assert got.result == {"x": [1, 2]}
    assert got.error is None and got.skipped == []
    assert got.started.endswith("Z") and got.duration_ms >= 0
    raw, meta = etcd.get(layout.result_key("web-1", node("web-1")))
    assert meta.lease_id == 0, "results are not bound to a lease"
    assert set(json.loads(raw)) >= {
        "key",
        "revision",
        "name",
        "ok",
        "result",
        "error",
        "started",
        "duration_ms",
    }

    # The lease is kept alive beyond its TTL.
    first_lease = lease_id
    wait_until(lambda: etcd.get_lease_info(first_lease).TTL > 0, what="lease alive")
    assert agent.proc.poll() is None


def test_region_task_runs_on_every_agent_of_the_region_and_no_other(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
) -> None:
    for agent_id, regions in (("a", "eu"), ("b", "us:eu"), ("c", "us")):
        start_agent(
            etcd_server.endpoint,
            "-id",
            agent_id,
            "-region",
            regions,
            layout=layout,
            script_dir=lua_dir,
        )
    for agent_id in "abc":
        wait_registered(etcd, layout, agent_id)
    revision = send(etcd, layout, region("eu"), "echo", "to eu")
    for agent_id in "ab":
        got = wait_result(etcd, layout, agent_id, region("eu"), revision)
        assert (got.ok, got.result, got.revision) == (True, "to eu", revision)
    # c runs a later task on its own region: it has seen everything before it.
    later = send(etcd, layout, region("us"), "echo", "to us")
    for agent_id in "bc":
        wait_result(etcd, layout, agent_id, region("us"), later)
    assert result(etcd, layout, "c", region("eu")) is None
    assert result(etcd, layout, "a", region("us")) is None


def test_task_written_while_the_agent_was_down_runs_once(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    counter = tmp_path / "count.txt"
    args = ("-id", "stable", "-region", "r1")
    first = start_agent(etcd_server.endpoint, *args, layout=layout, script_dir=lua_dir)
    wait_registered(etcd, layout, "stable")
    assert first.stop() == 0
    assert info(etcd, layout, "stable") is None

    revision = send(etcd, layout, node("stable"), "count", {"file": str(counter), "n": 1})
    second = start_agent(etcd_server.endpoint, *args, layout=layout, script_dir=lua_dir)
    got = wait_result(etcd, layout, "stable", node("stable"), revision)
    assert got.ok and got.revision == revision
    assert lines(counter) == ["1"]
    assert second.stop() == 0

    third = start_agent(etcd_server.endpoint, *args, layout=layout, script_dir=lua_dir)
    wait_log(third, f"at revision {revision} was already run by this agent")
    # A later task on another key runs, so the agent is past its start-up read.
    probe = send(etcd, layout, region("r1"), "count", {"file": str(counter), "n": 2})
    wait_result(etcd, layout, "stable", region("r1"), probe)
    assert lines(counter) == ["1", "2"]
    assert result(etcd, layout, "stable", node("stable")) == got


def test_burst_of_writes_while_a_task_runs_runs_only_the_newest(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    agent = start_agent(etcd_server.endpoint, "-id", "busy", layout=layout, script_dir=lua_dir)
    first = send(etcd, layout, node("busy"), "gate", {"gate": str(gate), "n": 0})
    wait_log(agent, "waiting at the gate")
    burst = [
        send(etcd, layout, node("busy"), "gate", {"gate": str(gate), "n": n}) for n in (1, 2, 3, 4)
    ]
    wait_log(agent, f"replaced by revision {burst[-1]}")
    gate.touch()
    got = wait_result(etcd, layout, "busy", node("busy"), burst[-1])
    assert (got.revision, got.result, got.ok) == (burst[-1], 4, True)
    assert got.skipped == burst[:-1]
    log = agent.log()
    assert log.count("running gate from") == 2, "only the first and the newest value ran"
    assert f"revision {first}" in log


def test_delete_runs_nothing(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    counter = tmp_path / "count.txt"
    agent = start_agent(
        etcd_server.endpoint, "-id", "d", "-region", "r", "-log_level", "debug",
        layout=layout, script_dir=lua_dir,
    )  # fmt: skip
    revision = send(etcd, layout, node("d"), "count", {"file": str(counter), "n": 1})
    got = wait_result(etcd, layout, "d", node("d"), revision)
    deleted = int(etcd.delete(layout.node_key("d"), return_response=True).header.revision)
    wait_log(agent, f"{layout.node_key('d')} is deleted or absent at revision {deleted}")
    probe = send(etcd, layout, region("r"), "count", {"file": str(counter), "n": 2})
    wait_result(etcd, layout, "d", region("r"), probe)
    assert lines(counter) == ["1", "2"]
    assert result(etcd, layout, "d", node("d")) == got


def test_a_dead_endpoint_in_the_list_is_skipped(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    start_agent(f"{dead},{etcd_server.endpoint}", "-id", "multi", layout=layout)
    wait_registered(etcd, layout, "multi")
    revision = send(etcd, layout, node("multi"), "print", "two endpoints")
    assert wait_result(etcd, layout, "multi", node("multi"), revision).ok


# Bad input and limits -----------------------------------------------------------------


def test_each_bad_input_gives_a_failed_result_and_the_agent_keeps_serving(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
) -> None:
    agent = start_agent(
        etcd_server.endpoint, "-id", "bad", "-task_timeout", "1", "-memory_limit", "16",
        layout=layout, script_dir=lua_dir,
    )  # fmt: skip
    cases: list[tuple[bytes, str | None, str]] = [
        (b"not json", None, "not JSON"),
        (b"null", None, "null"),
        (b"[1, 2]", None, "array"),
        (b'{"Data": 1}', None, 'no "Name"'),
        (b'{"Name": 5}', None, "not a string"),
        (b'{"Name": "../../etc/passwd"}', "../../etc/passwd", "invalid"),
        (b'{"Name": "no::such"}', "no::such", "not found"),
        (b'{"Name": "fail"}', "fail", "deliberate failure"),
        (b'{"Name": "quit"}', "quit", "os.exit"),
        (
            b'{"Name": "echo", "Data": "' + b"x" * (messages.MAX_MESSAGE_BYTES + 1) + b'"}',
            "echo",
            "limit",
        ),
        (b'{"Name": "spin"}', "spin", "time"),
        (b'{"Name": "bomb"}', "bomb", "memory"),
    ]
    for raw, name, error in cases:
        revision = put_raw(etcd, layout, node("bad"), raw)
        got = wait_result(etcd, layout, "bad", node("bad"), revision)
        assert got.revision == revision, raw[:40]
        assert got.ok is False, raw[:40]
        assert got.name == name, raw[:40]
        assert got.error is not None and error in got.error, (raw[:40], got.error)
    revision = send(etcd, layout, node("bad"), "echo", "still here")
    got = wait_result(etcd, layout, "bad", node("bad"), revision)
    assert (got.ok, got.result) == (True, "still here")
    assert agent.proc.poll() is None
    assert "Traceback" not in agent.log()


def test_the_example_scripts_run_in_a_real_agent(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    files = f"{layout.prefix}-files/"  # config::sync's key prefix and directory
    sync_env = {"GLEAM_SYNC_PREFIX": files, "GLEAM_SYNC_DIR": str(tmp_path)}
    start_agent(etcd_server.endpoint, "-id", "ex", layout=layout, env=sync_env)
    revision = send(etcd, layout, node("ex"), "print", {"hello": "world"})
    got = wait_result(etcd, layout, "ex", node("ex"), revision)
    assert (got.ok, got.result) == (True, {"hello": "world"})

    revision = send(etcd, layout, node("ex"), "etcd", "some config")
    got = wait_result(etcd, layout, "ex", node("ex"), revision)
    assert (got.ok, got.result) == (True, "some config"), got.error
    assert etcd.get("/foobar/config1")[0] == b"some config"

    etcd.put(f"{files}app.conf", b"key = value\n")
    revision = send(etcd, layout, node("ex"), "config::sync", "app.conf")
    got = wait_result(etcd, layout, "ex", node("ex"), revision)
    assert (got.ok, got.result) == (True, {"file": "app.conf", "bytes": 12}), got.error
    assert (tmp_path / "app.conf").read_text() == "key = value\n"
    revision = send(etcd, layout, node("ex"), "config::sync", "../escape.conf")
    got = wait_result(etcd, layout, "ex", node("ex"), revision)
    assert got.error is not None and "has a '..' segment" in got.error


# Signals and the pid file ---------------------------------------------------------------


def test_sigterm_lets_the_running_task_finish_then_cleans_up(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    gate, pid_file = tmp_path / "gate", tmp_path / "agent.pid"
    agent = start_agent(
        etcd_server.endpoint, "-id", "term", "-pid", str(pid_file), "-ttl", "30",
        layout=layout, script_dir=lua_dir,
    )  # fmt: skip
    wait_registered(etcd, layout, "term")
    assert pid_file.read_text().strip() == str(agent.pid)
    revision = send(etcd, layout, node("term"), "gate", {"gate": str(gate), "n": 7})
    wait_log(agent, "waiting at the gate")
    later = send(etcd, layout, keys.Target.node("term"), "echo", "never runs")
    wait_log(agent, f"queued {layout.node_key('term')} at revision {later}")
    agent.signal(signal.SIGTERM)
    wait_log(agent, "SIGTERM: stopping")
    assert agent.proc.poll() is None, "the agent waits for the running task"
    gate.touch()
    assert agent.wait(timeout=30) == 0
    got = result(etcd, layout, "term", node("term"))
    assert got is not None and (got.revision, got.result) == (revision, 7)
    # The lease was revoked: the registration is gone at once, not after 30 s.
    assert info(etcd, layout, "term") is None
    assert not pid_file.exists()


def test_a_second_signal_exits_without_waiting_for_the_task(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "agent.pid"
    agent = start_agent(
        etcd_server.endpoint, "-id", "impatient", "-pid", str(pid_file),
        layout=layout, script_dir=lua_dir,
    )  # fmt: skip
    send(etcd, layout, node("impatient"), "gate", {"gate": str(tmp_path / "never"), "n": 1})
    wait_log(agent, "waiting at the gate")
    agent.signal(signal.SIGINT)
    wait_log(agent, "SIGINT: stopping")
    agent.signal(signal.SIGINT)
    assert agent.wait(timeout=30) == 1
    assert "second signal" in agent.log()
    assert not pid_file.exists()


def test_sigint_stops_cleanly_too(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent
) -> None:
    agent = start_agent(etcd_server.endpoint, "-id", "int", "-ttl", "30", layout=layout)
    wait_registered(etcd, layout, "int")
    assert agent.stop(sig=signal.SIGINT) == 0
    assert info(etcd, layout, "int") is None


def test_a_pid_file_naming_a_live_process_refuses_to_start(
    etcd_server: EtcdServer, layout: keys.Layout, tmp_path: Path, start_agent: StartAgent
) -> None:
    pid_file = tmp_path / "agent.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    agent = start_agent(etcd_server.endpoint, "-id", "dup", "-pid", str(pid_file), layout=layout)
    assert agent.wait(timeout=30) == 1
    assert f"names process {os.getpid()}, which is running" in agent.log()
    assert pid_file.read_text() == f"{os.getpid()}\n"


def test_sighup_reloads_the_scripts(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    lua_dir: Path,
) -> None:
    agent = start_agent(etcd_server.endpoint, "-id", "hup", layout=layout, script_dir=lua_dir)
    revision = send(etcd, layout, node("hup"), "echo", 1)
    wait_result(etcd, layout, "hup", node("hup"), revision)
    assert "scripts reloaded" not in agent.log()
    agent.signal(signal.SIGHUP)
    wait_log(agent, "SIGHUP: reloading the scripts")
    revision = send(etcd, layout, node("hup"), "echo", 2)
    assert wait_result(etcd, layout, "hup", node("hup"), revision).result == 2
    wait_log(agent, "scripts reloaded")
    assert agent.proc.poll() is None


# Flags ----------------------------------------------------------------------------------


def test_flags_from_environment_and_config_file_and_a_filtered_log_file(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    config, log_file = tmp_path / "agent.yaml", tmp_path / "agent.log"
    config.write_text("region: [eu, web]\nlog_level: warning\n")
    agent = start_agent(
        etcd_server.endpoint, "-config", str(config), "-log", str(log_file),
        layout=layout, env={"GLEAM_ID": "from-env"},
    )  # fmt: skip
    record, _lease = wait_registered(etcd, layout, "from-env")
    assert record.regions == ["eu", "web"]
    revision = put_raw(etcd, layout, region("web"), b"not json")
    assert not wait_result(etcd, layout, "from-env", region("web"), revision).ok
    text = wait_until(lambda: log_file.read_text() if "ERROR" in log_file.read_text() else "")
    assert "bad task message" in text
    assert " INFO " not in text, "-log_level warning filters info lines"
    assert agent.log() == "", "with -log, nothing goes to standard error"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-id", "../x"], "-id"),
        (["-region", "a:b/c"], "-region"),
        (["-task_timeout", "never"], "-task_timeout"),
        (["-script", "/nonexistent/scripts"], "-script"),
        (["-cert", "/nonexistent.pem", "-key", "/nonexistent.key"], "-cert"),
        (["-etcd", "ftp://x"], "-etcd"),
        (["-log_level", "loud"], "-log_level"),
        (["-bogus"], "-bogus"),
        (["-user", "u", "-password_file", "/etc/passwd"], "-password_file: '/etc/passwd'"),
        (["-user", "u", "-password", "p", "-password_file", "/x"], "-password and -password_file"),
    ],
)
def test_bad_flags_exit_2_with_a_message_naming_the_flag(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.gleam_agent", "-script", str(EXAMPLE_SCRIPTS), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("GLEAM_")},
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
