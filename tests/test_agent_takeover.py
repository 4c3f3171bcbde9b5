"""Duplicate agent ids (issue 14): an agent whose registration is held by another live
agent refuses to start (exit 2, naming the holder and the key) unless -takeover is
given; the agent taken over exits 1 instead of writing its record back; an agent
restarted after a SIGKILL, on the same host, replaces its own stale record."""

from __future__ import annotations

import signal
import socket
from typing import Any

import pytest

from agent import config, preflight
from gleam import flags, keys, messages
from gleam.embedded import EtcdServer
from tests.agent_support import StartAgent, info, wait_log, wait_registered
from tests.support import wait_until


def record(hostname: str, pid: int) -> messages.AgentInfo:
    return messages.AgentInfo("web-1", hostname, pid, [], "1", "2026-11-30T07:00:00Z", "/s")


ME = record("host-a", 100)


@pytest.mark.parametrize(
    ("raw", "running", "holder"),
    [
        (None, True, False),  # free
        (b"not json", True, False),  # unreadable: no agent to name
        (b"\xff" * 10, True, False),
        (ME.encode(), True, False),  # this process
        (record("host-a", 101).encode(), False, False),  # this host's earlier run, gone
        (record("host-a", 101).encode(), True, True),  # another running agent here
        (record("host-b", 100).encode(), False, True),  # another host (its pids unknown)
        (record("host-b", 101).encode(), True, True),
    ],
)
def test_other_holder(raw: bytes | None, running: bool, holder: bool) -> None:
    found = preflight.other_holder(raw, ME, running=lambda _pid: running)
    assert (found is not None) is holder


def test_pid_running() -> None:
    import os

    assert preflight.pid_running(os.getpid())
    assert not preflight.pid_running(0)
    assert not preflight.pid_running(-1)


@pytest.mark.usefixtures("no_gleam_environment")
@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, False),
        (["-takeover"], {}, True),
        (["--takeover"], {}, True),
        ([], {"GLEAM_TAKEOVER": "1"}, True),
        ([], {"GLEAM_TAKEOVER": "yes"}, True),
        ([], {"GLEAM_TAKEOVER": "off"}, False),
        (["-takeover"], {"GLEAM_TAKEOVER": "0"}, True),  # the command line wins
    ],
)
def test_takeover_switch(argv: list[str], env: dict[str, str], expected: bool) -> None:
    cfg, _ = config.parse(["-id", "a", *argv], environ=env, hostname="h", pid=1)
    assert cfg.takeover is expected


@pytest.mark.usefixtures("no_gleam_environment")
def test_takeover_switch_refuses_a_bad_word() -> None:
    with pytest.raises(flags.FlagError, match="-takeover: 'maybe' is not true or false"):
        config.parse(["-id", "a"], environ={"GLEAM_TAKEOVER": "maybe"}, hostname="h", pid=1)


@pytest.mark.slow
def test_a_second_agent_with_a_live_id_is_refused_and_takeover_replaces_the_first(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent
) -> None:
    key = layout.info_key("dup")
    first = start_agent(etcd_server.endpoint, "-id", "dup", "-ttl", "2", layout=layout)
    assert wait_registered(etcd, layout, "dup")[0].pid == first.pid

    second = start_agent(etcd_server.endpoint, "-id", "dup", layout=layout)
    assert second.wait(timeout=60) == 2
    text = second.log()
    host = socket.gethostname()
    assert f"{key} is held by another live agent: pid {first.pid} on host {host!r}" in text
    assert "-takeover" in text and "Traceback" not in text

    third = start_agent(etcd_server.endpoint, "-id", "dup", "-takeover", layout=layout)
    wait_until(
        lambda: (found := info(etcd, layout, "dup")) is not None and found[0].pid == third.pid,
        timeout=30,
        what="the -takeover agent registered",
    )
    # The first agent finds its record taken at its next check (once per TTL) and exits
    # 1 without writing it back; its lease revoked, the record stays the new agent's.
    assert first.wait(timeout=60) == 1
    assert f"{key} is held by another live agent: pid {third.pid}" in first.log()
    found = info(etcd, layout, "dup")
    assert found is not None and found[0].pid == third.pid
    wait_log(third, "registered")
    assert third.proc.poll() is None


@pytest.mark.slow
def test_an_agent_of_another_host_is_named(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent
) -> None:
    key = layout.info_key("web-1")
    etcd.put(key, record("elsewhere.example", 4242).encode())
    refused = start_agent(etcd_server.endpoint, "-id", "web-1", layout=layout)
    assert refused.wait(timeout=60) == 2
    assert f"{key} is held by another live agent: pid 4242 on host 'elsewhere.example'" in (
        refused.log()
    )


@pytest.mark.slow
def test_an_agent_restarted_after_sigkill_replaces_its_own_stale_record(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent
) -> None:
    killed = start_agent(etcd_server.endpoint, "-id", "again", "-ttl", "60", layout=layout)
    wait_registered(etcd, layout, "again")
    killed.signal(signal.SIGKILL)
    killed.wait()
    stale = info(etcd, layout, "again")
    assert stale is not None and stale[0].pid == killed.pid  # the lease has not expired
    restarted = start_agent(etcd_server.endpoint, "-id", "again", "-ttl", "60", layout=layout)
    wait_until(
        lambda: (
            (found := info(etcd, layout, "again")) is not None and found[0].pid == restarted.pid
        ),
        timeout=30,
        what="the restarted agent registered",
    )
    assert restarted.proc.poll() is None
