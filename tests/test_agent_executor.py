"""The Lua executor process and its channel, driven from the test process: frames, a KV
served by the parent, a child that hangs, dies or lies. Real child processes; a small
in-memory KV (etcd itself is covered end to end in test_agent_isolation)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gleam
from agent import frames
from agent.executor import (
    MAX_STDERR_LINE,
    MAX_STDERR_LINES,
    LuaExecutor,
    child_environment,
    describe_exit,
    session_members,
)
from agent.lua_api import ExecutorOptions, KVError
from tests.support import wait_until


class MemoryKV:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        if key == "/broken":
            raise KVError("UNAVAILABLE: etcd is down")
        return self.data.get(key)

    def get_dir(self, key: str) -> dict[str, str]:
        return {k: v for k, v in self.data.items() if k.startswith(key.rstrip("/") + "/")}

    def set(self, key: str, value: str, ttl: int | None) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


@pytest.fixture
def kv() -> MemoryKV:
    return MemoryKV()


@pytest.fixture
def executor(scripts: Path, kv: MemoryKV) -> Iterator[LuaExecutor]:
    runner = LuaExecutor(options(scripts, time_limit=2), kv=kv, kill_grace=0.5)
    runner.start()
    yield runner
    runner.close()


def options(scripts: Path, *, time_limit: float = 60) -> ExecutorOptions:
    return ExecutorOptions(scripts, "web-1", ("eu",), time_limit, 16 * 1024 * 1024)


def script(root: Path, text: str, name: str = "t") -> str:
    (root / f"{name}.lua").write_text(text, encoding="utf-8")
    return name


# Frames ---------------------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[frames.Channel, frames.Channel]]:
    a, b = socket.socketpair()
    left = frames.Channel(a, max_in=1024, max_out=1024)
    right = frames.Channel(b, max_in=1024, max_out=1024)
    yield left, right
    left.close()
    right.close()


def test_frames_carry_json_values_whole(pair: tuple[frames.Channel, frames.Channel]) -> None:
    left, right = pair
    values = [["run", "a::b", {"x": [1, 2.5, None, "\ud800é"]}, False], "x" * 900, 2**63]
    for value in values:
        left.send(value)
    assert [right.receive(deadline=time.monotonic() + 5) for _ in values] == values


def test_a_frame_over_the_limit_is_refused_on_both_sides(
    pair: tuple[frames.Channel, frames.Channel],
) -> None:
    left, right = pair
    with pytest.raises(ValueError, match="over the 1024-byte limit"):
        left.send("x" * 2000)
    left._sock.sendall(b"\xff\xff\xff\xff")  # a peer announcing 4 GiB
    with pytest.raises(frames.FrameError, match="over the 1024-byte limit"):
        right.receive(deadline=time.monotonic() + 5)


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[1, 2", b"1" * 5000])
def test_a_frame_that_is_not_json_is_an_error(body: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(len(body).to_bytes(4, "big") + body)
        with pytest.raises(frames.FrameError):
            frames.Channel(b, max_in=8192, max_out=0).receive(deadline=time.monotonic() + 5)


def test_receive_times_out_and_sees_the_peer_close(
    pair: tuple[frames.Channel, frames.Channel],
) -> None:
    left, right = pair
    with pytest.raises(TimeoutError):
        right.receive(deadline=time.monotonic() + 0.05)
    left.close()
    with pytest.raises(frames.Closed):
        right.receive(deadline=time.monotonic() + 5)


@pytest.mark.parametrize("value", [10**5000, {1, 2}, 1j], ids=["5000-digits", "set", "complex"])
def test_values_json_cannot_carry_raise_before_anything_is_sent(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        frames.encode(["run", "t", value, False])


# The executor ---------------------------------------------------------------------------------


def test_a_task_runs_in_the_child_and_etcd_calls_go_through_the_parent(
    executor: LuaExecutor, scripts: Path, kv: MemoryKV
) -> None:
    kv.data.update({"/cfg/a": "1", "/cfg/b": "2"})
    text = """
assert(gleam.Set("/out", "written") == nil)
local folder = gleam.GetDir("/cfg")
local missing, err = gleam.Get("/nope")
local _, down = gleam.Get("/broken")
return {pid = gleam.exec({"sh", "-c", "echo $PPID"}), folder = folder, err = err, down = down,
        got = gleam.Get("/out"), data = gleam.Data, id = gleam.id, regions = gleam.regions}
"""
    outcome = executor.run(script(scripts, text), {"n": [1, 2]})
    assert outcome.ok, outcome.error
    assert outcome.result["folder"] == {"/cfg/a": "1", "/cfg/b": "2"}
    assert outcome.result["err"] == "gleam.Get /nope: key not found"
    assert outcome.result["down"] == "gleam.Get /broken: UNAVAILABLE: etcd is down"
    assert outcome.result["got"] == "written" and kv.data["/out"] == "written"
    assert outcome.result["data"] == {"n": [1, 2]}
    assert (outcome.result["id"], outcome.result["regions"]) == ("web-1", ["eu"])
    assert outcome.result["pid"] == 0  # exit code of sh
    assert executor.pid != os.getpid()


def test_script_logs_reach_the_parents_log(
    executor: LuaExecutor, scripts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    outcome = executor.run(script(scripts, 'gleam.Warning("careful", 42) return 1'), None)
    assert outcome.ok
    assert any(
        r.name == "agent.lua" and r.levelname == "WARNING" and "careful 42" in r.getMessage()
        for r in caplog.records
    )


def test_a_script_blocked_in_a_c_call_gets_its_child_killed(
    executor: LuaExecutor, scripts: Path, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    first = executor.pid
    started = time.monotonic()
    outcome = executor.run(script(scripts, f'io.open("{fifo}", "r")'), None)
    assert not outcome.ok and outcome.error
    assert outcome.error.startswith("time limit of 2 s exceeded")
    assert time.monotonic() - started < 10
    assert executor.pid != first
    assert executor.run(script(scripts, "return 'again'"), None).result == "again"


def test_a_child_that_dies_is_reported_by_how_and_replaced(
    executor: LuaExecutor, scripts: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    name = script(scripts, f'while not io.open("{gate}") do gleam.exec({{"sleep", "0.05"}}) end')
    first = executor.pid
    assert first is not None
    threading.Timer(0.3, os.kill, (first, signal.SIGKILL)).start()
    outcome = executor.run(name, None)
    assert (outcome.ok, outcome.error) == (False, "Lua executor killed by signal 9 (SIGKILL)")
    assert executor.run(script(scripts, "return 2", "u"), None).result == 2
    assert executor.pid not in (None, first)
    assert executor.restarts == 1  # gleam_agent_lua_executor_restarts_total


def test_a_child_that_lies_is_killed_and_replaced(
    executor: LuaExecutor, scripts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that sends nonsense (as one taken over by a script would) ends its task."""
    first = executor.pid
    child = executor._child
    assert child is not None
    real_receive = child.channel.receive
    lies = iter([["kv", "format_disk", "/"]])

    def lying(*, deadline: float | None = None) -> Any:
        for lie in lies:
            real_receive(deadline=deadline)  # the real "done"
            return lie
        return real_receive(deadline=deadline)

    monkeypatch.setattr(child.channel, "receive", lying)
    outcome = executor.run(script(scripts, "return 1"), None)
    assert not outcome.ok and outcome.error and "broke the protocol" in outcome.error
    assert executor.pid != first
    assert executor.run(script(scripts, "return 3", "v"), None).result == 3


def test_data_json_cannot_carry_fails_the_task_in_the_parent(
    executor: LuaExecutor, scripts: Path
) -> None:
    outcome = executor.run(script(scripts, "return 1"), {"n": 10**5000})
    assert not outcome.ok and outcome.error
    assert outcome.error.startswith("the task's data cannot be passed to the Lua executor")


def test_a_folder_larger_than_the_memory_limit_is_refused_by_the_parent(
    executor: LuaExecutor, scripts: Path, kv: MemoryKV
) -> None:
    kv.data.update({f"/big/{n}": "x" * 1024 * 1024 for n in range(20)})
    text = 'local f, err = gleam.GetDir("/big") return {f == nil, err}'
    outcome = executor.run(script(scripts, text), None)
    assert outcome.ok, outcome.error
    assert outcome.result[0] is True
    assert "more than the Lua memory limit of 16 MiB" in outcome.result[1]


def test_reload_reaches_the_child(
    scripts: Path, kv: MemoryKV, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")  # before the child starts: it sends only what the parent logs
    executor = LuaExecutor(options(scripts), kv=kv)
    executor.start()
    try:
        name = script(scripts, "return 1")
        assert executor.run(name, None).result == 1
        executor.reload()
        assert executor.run(name, None).result == 1
        assert "scripts reloaded" in caplog.text
    finally:
        executor.close()


def test_close_stops_the_child(scripts: Path, kv: MemoryKV) -> None:
    runner = LuaExecutor(options(scripts), kv=kv)
    runner.start()
    pid = runner.pid
    assert pid is not None
    runner.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# Pure pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (-9, "Lua executor killed by signal 9 (SIGKILL)"),
        (-6, "Lua executor killed by signal 6 (SIGABRT)"),
        (134, "Lua executor exited with status 134"),
        (1, "Lua executor exited with status 1"),
        (-77, "Lua executor killed by signal 77"),
    ],
)
def test_describe_exit(returncode: int, text: str) -> None:
    assert describe_exit(returncode) == text


def test_the_child_environment_has_no_credentials() -> None:
    environ = {
        "PATH": "/bin", "GLEAM_PASSWORD": "s3cret", "GLEAM_USER": "root", "GLEAM_KEY": "/k",
        "GLEAM_PASSWORD_FILE": "/p", "GLEAM_SYNC_DIR": "/srv/sync",
    }  # fmt: skip
    assert child_environment(environ) == {"PATH": "/bin", "GLEAM_SYNC_DIR": "/srv/sync"}


def test_session_members_finds_a_sessions_processes() -> None:
    leader = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        found = wait_until(lambda: len(session_members(leader.pid)) >= 2, what="sh and sleep")
        assert found and os.getpid() not in session_members(leader.pid)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_the_package_face_lists_exactly_what_it_can_import() -> None:
    for name in gleam.__all__:
        assert getattr(gleam, name) is not None
    assert set(gleam.__all__) == set(gleam._MODULE_OF)
    with pytest.raises(AttributeError):
        _ = gleam.no_such_name


def test_a_flood_on_stderr_is_logged_only_so_far(
    executor: LuaExecutor, scripts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = 'for i = 1, 2000 do io.stderr:write(string.rep("e", 10000), "\\n") end return 1'
    assert executor.run(script(scripts, text), None).ok
    wait_until(lambda: "the rest is dropped" in caplog.text, what="the cut-off line")
    lines = [r for r in caplog.records if r.getMessage().startswith("Lua executor (pid")]
    assert len(lines) == MAX_STDERR_LINES + 1
    assert all(len(r.getMessage()) < MAX_STDERR_LINE + 100 for r in lines)
    assert executor.run(script(scripts, "return 2", "u"), None).result == 2


def test_a_time_limit_beyond_any_timer_still_works(scripts: Path, kv: MemoryKV) -> None:
    runner = LuaExecutor(options(scripts, time_limit=1e300), kv=kv)
    runner.start()
    try:
        assert runner.run(script(scripts, "return 5"), None).result == 5
    finally:
        runner.close()
