"""The agent under operations: /metrics scraped from a real agent against a real etcd,
/healthz through an etcd outage, systemd's notify protocol on a real datagram socket
(READY=1, WATCHDOG=1 that stops when a loop is wedged, STOPPING=1), JSON logs, and a log
file rotated away under a running agent."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gleam import keys
from gleam.embedded import EtcdServer
from tests.agent_support import (
    StartAgent,
    node,
    put_raw,
    send,
    wait_registered,
    wait_result,
)
from tests.observe_support import NotifySocket, healthz, metrics_url, scrape, value
from tests.support import AgentProcess, client_for, wait_until

pytestmark = pytest.mark.usefixtures("no_gleam_environment")


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def url_of(agent: AgentProcess) -> str:
    found = wait_until(lambda: metrics_url(agent.log()), what="the metrics listener's address")
    assert found is not None
    return found


def test_metrics_count_ok_and_failed_tasks(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    lua_dir: Path,
) -> None:  # fmt: skip
    agent = start_agent(
        etcd_server.endpoint, "-id", "m1", "-metrics", "127.0.0.1:0",
        layout=layout, script_dir=lua_dir,
    )  # fmt: skip
    wait_registered(etcd, layout, "m1")
    base = url_of(agent)
    before = scrape(base)
    assert value(before, "gleam_agent_tasks_total", outcome="ok") == 0
    assert value(before, "gleam_agent_last_task_timestamp_seconds") == 0

    revision = send(etcd, layout, node("m1"), "echo", "hello")
    assert wait_result(etcd, layout, "m1", node("m1"), revision).ok
    revision = send(etcd, layout, node("m1"), "fail")
    assert not wait_result(etcd, layout, "m1", node("m1"), revision).ok
    revision = put_raw(etcd, layout, node("m1"), b"not json")
    assert not wait_result(etcd, layout, "m1", node("m1"), revision).ok

    def counted() -> Any:
        samples = scrape(base)
        done = value(samples, "gleam_agent_tasks_total", outcome="failed") == 2
        return samples if done else None

    after = wait_until(counted, what="three results counted")
    assert value(after, "gleam_agent_tasks_total", outcome="ok") == 1
    assert value(after, "gleam_agent_task_duration_seconds_count") == 3
    assert value(after, "gleam_agent_last_task_timestamp_seconds") > time.time() - 60
    assert value(after, "gleam_agent_registered") == 1
    assert value(after, "gleam_agent_etcd_connected") == 1
    assert value(after, "gleam_agent_tasks_queued") == 0
    assert value(after, "gleam_agent_results_unwritten") == 0
    assert value(after, "gleam_agent_watch_restarts_total", reason="stalled") == 0
    assert value(after, "gleam_agent_lua_executor_restarts_total") == 0
    assert value(after, "gleam_agent_info", version=_version()) == 1
    assert value(after, "process_resident_memory_bytes")
    # No label names an agent, a key, a commit or a function.
    for _name, labels in after:
        assert {k for k, _v in labels} <= {"outcome", "reason", "version", "le", "implementation",
                                           "major", "minor", "patchlevel"}  # fmt: skip
    assert healthz(base) == (200, "ok: registered as m1, watching 1 key(s)\n")
    status, _ = healthz(base.replace("/metrics", "") + "/nothing-here")
    assert status == 404


def _version() -> str:
    from gleam.version import VERSION

    return VERSION


def test_healthz_is_503_while_etcd_is_stopped_and_200_when_it_is_back(
    private_etcd: EtcdServer, start_agent: StartAgent, lua_dir: Path, notify: NotifySocket
) -> None:
    layout = keys.Layout("/health")
    etcd = client_for(private_etcd.endpoint)
    try:
        agent = start_agent(
            private_etcd.endpoint, "-id", "h1", "-check_interval", "0.5",
            "-metrics", "127.0.0.1:0", layout=layout, script_dir=lua_dir,
            env=notify.env(watchdog_seconds=1.0),
        )  # fmt: skip
        wait_registered(etcd, layout, "h1")
        base = url_of(agent)
        wait_until(lambda: healthz(base)[0] == 200, what="/healthz 200")

        private_etcd.kill()
        status, reason = wait_until(
            lambda: (got := healthz(base))[0] == 503 and got, timeout=60, what="/healthz 503"
        )
        assert "etcd" in reason and reason.count("\n") == 1
        assert value(scrape(base), "gleam_agent_etcd_connected") == 0
        # etcd being down is no wedge: the loops keep retrying and the pings go on.
        down = time.monotonic()
        wait_until(lambda: len(notify.pings_after(down)) >= 3, what="pings while etcd is down")
        assert "etcd unreachable" in notify.last_status()

        private_etcd.start()
        wait_until(lambda: healthz(base)[0] == 200, timeout=60, what="/healthz 200 again")
        samples = scrape(base)
        assert value(samples, "gleam_agent_etcd_connected") == 1
        assert (value(samples, "gleam_agent_watch_restarts_total", reason="etcd") or 0) >= 1
    finally:
        etcd.close()


def test_systemd_hears_ready_watchdog_status_and_stopping(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    lua_dir: Path, notify: NotifySocket,
) -> None:  # fmt: skip
    agent = start_agent(
        etcd_server.endpoint, "-id", "sd1", layout=layout, script_dir=lua_dir,
        env=notify.env(watchdog_seconds=1.0),
    )  # fmt: skip
    ready = notify.wait_for("READY", "1")
    # Registered and watching by then.
    wait_registered(etcd, layout, "sd1", timeout=1)
    wait_until(lambda: len(notify.pings_after(ready)) >= 3, what="periodic WATCHDOG=1")
    assert "watching 1 key(s)" in notify.last_status()
    revision = send(etcd, layout, node("sd1"), "echo", 1)
    wait_result(etcd, layout, "sd1", node("sd1"), revision)
    wait_until(lambda: "1 task(s) run" in notify.last_status(), what="STATUS= after a task")

    assert agent.stop() == 0
    notify.wait_for("STOPPING", "1", timeout=5)


def test_watchdog_pings_stop_when_the_watch_loop_or_the_worker_is_wedged(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    lua_dir: Path,
) -> None:  # fmt: skip
    # Two agents at once (the limits take a while to pass): one's watch loop wedges on
    # its first round, the other's worker on its first task (GLEAM_TEST_WEDGE, tests only).
    sockets = {"watch": NotifySocket(), "worker": NotifySocket()}
    try:
        agents = {
            loop: start_agent(
                etcd_server.endpoint, "-id", f"wedge-{loop}", "-check_interval", "0.5",
                "-task_timeout", "1", "-metrics", "127.0.0.1:0", layout=layout,
                script_dir=lua_dir,
                env={**sock.env(watchdog_seconds=1.0), "GLEAM_TEST_WEDGE": loop},
            )
            for loop, sock in sockets.items()
        }  # fmt: skip
        ready = {loop: sock.wait_for("READY", "1") for loop, sock in sockets.items()}
        send(etcd, layout, node("wedge-worker"), "echo", "stuck")
        for loop, sock in sockets.items():
            wait_until(lambda s=sock, r=ready[loop]: s.pings_after(r), what=f"{loop}: pings")
            status = sock.wait_for("STATUS", "stalled", timeout=60)
            assert ("watch loop" if loop == "watch" else "worker") in sock.last_status()
            # From then on, silence: no ping for several periods, while the process lives.
            wait_until(
                lambda s=sock, at=status: time.monotonic() - at > 3.0, timeout=10, what="3 s"
            )
            assert sock.pings_after(status + 0.5) == []
            assert agents[loop].proc.poll() is None
            code, reason = healthz(url_of(agents[loop]))
            assert code == 503 and reason.startswith("stalled")
        for agent in agents.values():
            agent.stop(sig=signal.SIGKILL)  # a wedged agent would wait out its grace times
    finally:
        for sock in sockets.values():
            sock.close()


def test_json_logs_carry_the_task_fields_and_survive_rotation(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    lua_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    log_file = tmp_path / "agent.json.log"
    start_agent(
        etcd_server.endpoint, "-id", "j1", "-log", str(log_file), "-log_format", "json",
        layout=layout, script_dir=lua_dir,
    )  # fmt: skip
    wait_registered(etcd, layout, "j1")
    revision = send(etcd, layout, node("j1"), "echo", "first")
    wait_result(etcd, layout, "j1", node("j1"), revision)

    def done_line(path: Path, rev: int) -> dict[str, Any] | None:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for doc in lines:
            if doc.get("revision") == rev and "duration_ms" in doc:
                return doc
        return None

    doc = wait_until(lambda: done_line(log_file, revision), what="the task's JSON line")
    assert doc["agent"] == "j1" and doc["function"] == "echo"
    assert doc["key"] == layout.task_key(node("j1")) and doc["level"] == "info"
    assert {"time", "logger", "message"} <= doc.keys()

    # logrotate's default: rename the file; the agent opens a new one at the old path.
    log_file.rename(tmp_path / "agent.json.log.1")
    revision = send(etcd, layout, node("j1"), "echo", "second")
    wait_result(etcd, layout, "j1", node("j1"), revision)
    wait_until(lambda: log_file.exists() and done_line(log_file, revision), what="a new log")


def test_a_metrics_address_in_use_stops_the_agent_with_a_clear_message(
    etcd_server: EtcdServer, start_agent: StartAgent, lua_dir: Path
) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        agent = start_agent(
            etcd_server.endpoint, "-id", "busy", "-metrics", f"127.0.0.1:{port}",
            script_dir=lua_dir,
        )  # fmt: skip
        assert agent.wait() == 1
        assert f"-metrics: cannot listen on 127.0.0.1:{port}" in agent.log()
        assert "Traceback" not in agent.log()
    finally:
        taken.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-metrics", "9271"], "-metrics: '9271' is not HOST:PORT"),
        (["-log_format", "xml"], "-log_format: 'xml' is not one of text, json"),
    ],
)
def test_bad_operations_flags_exit_2_naming_the_flag(
    etcd_server: EtcdServer, start_agent: StartAgent, lua_dir: Path, args: list[str], message: str
) -> None:
    agent = start_agent(etcd_server.endpoint, *args, script_dir=lua_dir)
    assert agent.wait() == 2
    assert message in agent.log()


def test_sigterm_still_exits_0_with_metrics_and_notify_on(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    lua_dir: Path, notify: NotifySocket,
) -> None:  # fmt: skip
    agent = start_agent(
        etcd_server.endpoint, "-id", "t1", "-metrics", "127.0.0.1:0", layout=layout,
        script_dir=lua_dir, env=notify.env(watchdog_seconds=2.0),
    )  # fmt: skip
    notify.wait_for("READY", "1")
    agent.signal(signal.SIGTERM)
    assert agent.wait() == 0
    notify.wait_for("STOPPING", "1", timeout=5)
