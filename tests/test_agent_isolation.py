"""The Lua executor process, end to end: real etcd, real agents, hostile tasks.

Each hostile task must give a result, and the agent must answer the next task within
2 s of it (the issue's demand; a generous bound for a fresh executor process)."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gleam import keys, messages
from gleam.embedded import EtcdServer
from tests.agent_support import (
    StartAgent,
    node,
    put_raw,
    send,
    wait_log,
    wait_result,
)
from tests.support import ROOT, AgentProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_gleam_environment")]

SCRIPTS = {
    # Blocks in one C call (open of a FIFO nobody writes): the count hook never runs.
    "fifo": 'local f = io.open(gleam.Data.fifo, "r") return "opened"',
    # Holds memory within 3 MiB of a 32 MiB cap, then reads a large etcd folder.
    "hog_getdir": """
local hold, i = {}, 0
while collectgarbage("count") < (32 - 3) * 1024 do
  i = i + 1
  hold[i] = string.rep("x", 256 * 1024) .. i
end
local folder, err = gleam.GetDir(gleam.Data.dir)
return {got = folder ~= nil, err = err, held = #hold}
""",
    # Appends a line (one per run), then waits for a gate file that never comes.
    "count_gate": """
local f = assert(io.open(gleam.Data.file, "a"))
f:write(tostring(gleam.Data.n), "\\n")
f:close()
while not io.open(gleam.Data.gate) do gleam.exec({"sleep", "0.05"}) end
return gleam.Data.n
""",
    # Leaves a program running in the background, then blocks on a FIFO.
    "linger": """
local code, out = gleam.exec({"sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"})
local f = assert(io.open(gleam.Data.pidfile, "w"))
f:write(out)
f:close()
io.open(gleam.Data.fifo, "r")
""",
    "limits": 'local code, out = gleam.exec({"cat", "/proc/self/limits"}) return out',
    "etcd_roundtrip": """
assert(gleam.Set(gleam.Data.key, "v") == nil)
return (gleam.Get(gleam.Data.key))
""",
}


@pytest.fixture
def scripts(lua_dir: Path) -> Path:
    for name, body in SCRIPTS.items():
        (lua_dir / f"{name}.lua").write_text(body.lstrip(), encoding="utf-8")
    return lua_dir


def executor_pids(agent: AgentProcess) -> list[int]:
    """The pids of the agent's executor processes so far, from its log."""
    return [int(pid) for pid in re.findall(r"Lua executor started \(pid (\d+)\)", agent.log())]


def current_executor(agent: AgentProcess, *, count: int = 1) -> int:
    wait_log(agent, "Lua executor started", count=count)
    return executor_pids(agent)[-1]


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: nobody may reap orphans in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def assert_next_task_ok(
    etcd: Any, layout: keys.Layout, agent_id: str, *, within: float = 2.0
) -> None:
    """The agent answers a plain task within `within` seconds."""
    written = time.monotonic()
    revision = send(etcd, layout, node(agent_id), "echo", "next")
    got = wait_result(etcd, layout, agent_id, node(agent_id), revision, timeout=within + 30)
    elapsed = time.monotonic() - written
    assert (got.ok, got.result) == (True, "next"), got.error
    assert elapsed < within, f"the next task took {elapsed:.2f} s"


def start(
    start_agent: StartAgent, etcd_server: EtcdServer, layout: keys.Layout, scripts: Path,
    agent_id: str, *args: str,
) -> AgentProcess:  # fmt: skip
    agent = start_agent(
        etcd_server.endpoint, "-id", agent_id, *args, layout=layout, script_dir=scripts
    )
    current_executor(agent)
    return agent


# Hostile values and scripts ---------------------------------------------------------------


def test_a_5000_digit_integer_fails_the_task_and_the_next_one_runs(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path,
) -> None:  # fmt: skip
    agent = start(start_agent, etcd_server, layout, scripts, "digits")
    raw = b'{"Name": "echo", "Data": ' + b"1" * 5000 + b"}"
    revision = put_raw(etcd, layout, node("digits"), raw)
    got = wait_result(etcd, layout, "digits", node("digits"), revision)
    assert not got.ok and got.error
    assert_next_task_ok(etcd, layout, "digits")
    assert agent.proc.poll() is None


@pytest.mark.parametrize(("memory_limit", "fails_with"), [("32", None), ("8", "memory limit")])
def test_a_mebibyte_of_empty_tables_gives_a_clean_result(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path, memory_limit: str, fails_with: str | None,
) -> None:  # fmt: skip
    agent = start(
        start_agent, etcd_server, layout, scripts, "tables", "-memory_limit", memory_limit
    )
    head, tail = b'{"Name": "echo", "Data": [', b"]}"
    count = (messages.MAX_MESSAGE_BYTES - len(head) - len(tail) + 1) // 3
    raw = head + b",".join([b"{}"] * count) + tail
    assert count > 340_000 and len(raw) <= messages.MAX_MESSAGE_BYTES
    revision = put_raw(etcd, layout, node("tables"), raw)
    got = wait_result(etcd, layout, "tables", node("tables"), revision)
    # Cleanly refused by a limit (the result's size, the memory cap), never a crash.
    assert not got.ok and got.error and "Lua executor" not in got.error, got.error
    if fails_with:
        assert fails_with in got.error
    assert_next_task_ok(etcd, layout, "tables")
    assert len(executor_pids(agent)) == 1, "the executor survived"


def test_getdir_of_a_large_folder_near_the_memory_cap_fails_cleanly(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path,
) -> None:  # fmt: skip
    folder = f"{layout.prefix}/big"
    value = b"v" * (32 * 1024)
    for batch in range(10):
        etcd.transaction(
            compare=[],
            success=[
                etcd.transactions.put(f"{folder}/{batch:02d}-{i:03d}", value) for i in range(30)
            ],
            failure=[],
        )  # 300 keys, about 9.6 MiB
    agent = start(start_agent, etcd_server, layout, scripts, "hog", "-memory_limit", "32")
    revision = send(etcd, layout, node("hog"), "hog_getdir", {"dir": folder})
    got = wait_result(etcd, layout, "hog", node("hog"), revision)
    if got.ok:
        assert got.result["got"] is False and "memory limit" in got.result["err"], got.result
    else:
        assert got.error and "memory limit" in got.error, got.error
    assert_next_task_ok(etcd, layout, "hog")
    assert len(executor_pids(agent)) == 1, "the executor survived"


def test_a_script_blocked_in_a_c_call_is_killed_at_the_time_limit(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path, tmp_path: Path,
) -> None:  # fmt: skip
    fifo = tmp_path / "nobody-writes"
    os.mkfifo(fifo)
    agent = start(start_agent, etcd_server, layout, scripts, "fifo", "-task_timeout", "2")
    first = executor_pids(agent)[-1]
    written = time.monotonic()
    revision = send(etcd, layout, node("fifo"), "fifo", {"fifo": str(fifo)})
    got = wait_result(etcd, layout, "fifo", node("fifo"), revision)
    elapsed = time.monotonic() - written
    assert not got.ok and got.error and "time limit of 2 s exceeded" in got.error
    assert got.duration_ms < 4000 and elapsed < 4.0, (got.duration_ms, elapsed)
    assert not alive(first)
    assert_next_task_ok(etcd, layout, "fifo")
    assert executor_pids(agent)[-1] != first


def test_an_executor_killed_from_outside_fails_its_task_and_is_replaced(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path, tmp_path: Path,
) -> None:  # fmt: skip
    agent = start(start_agent, etcd_server, layout, scripts, "victim")
    revision = send(etcd, layout, node("victim"), "gate", {"gate": str(tmp_path / "never"), "n": 1})
    wait_log(agent, "waiting at the gate")
    first = executor_pids(agent)[-1]
    os.kill(first, signal.SIGKILL)
    got = wait_result(etcd, layout, "victim", node("victim"), revision)
    assert not got.ok and got.error == "Lua executor killed by signal 9 (SIGKILL)"
    second = current_executor(agent, count=2)
    assert second != first
    assert_next_task_ok(etcd, layout, "victim")
    assert agent.proc.poll() is None


def test_programs_a_script_left_running_die_with_the_executor(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path, tmp_path: Path,
) -> None:  # fmt: skip
    fifo, pid_file = tmp_path / "fifo", tmp_path / "sleep.pid"
    os.mkfifo(fifo)
    start(start_agent, etcd_server, layout, scripts, "linger", "-task_timeout", "2")
    data = {"fifo": str(fifo), "pidfile": str(pid_file)}
    revision = send(etcd, layout, node("linger"), "linger", data)
    sleeper = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip()))
    got = wait_result(etcd, layout, "linger", node("linger"), revision)
    assert not got.ok and got.error and "time limit" in got.error
    wait_until(lambda: not alive(sleeper), timeout=10, what=f"sleep (pid {sleeper}) killed")


def test_the_executor_has_a_memory_backstop_that_programs_do_not_inherit(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path,
) -> None:  # fmt: skip
    agent = start(start_agent, etcd_server, layout, scripts, "limits")
    revision = send(etcd, layout, node("limits"), "limits")
    got = wait_result(etcd, layout, "limits", node("limits"), revision)
    assert got.ok, got.error
    executor = executor_pids(agent)[-1]

    def address_space(limits: str) -> str:
        found = re.search(r"^Max address space\s+(\S+)", limits, re.MULTILINE)
        assert found, limits
        return found.group(1)

    own_soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    ours = "unlimited" if own_soft == resource.RLIM_INFINITY else str(own_soft)
    backstop = address_space(Path(f"/proc/{executor}/limits").read_text())
    assert backstop != "unlimited" and int(backstop) > 64 * 1024 * 1024
    assert address_space(got.result) == ours


# What the executor is made of --------------------------------------------------------------


def test_the_executor_never_loads_grpc(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path,
) -> None:  # fmt: skip
    agent = start_agent(
        etcd_server.endpoint, "-id", "lean", layout=layout, script_dir=scripts,
        env={"GLEAM_SYNC_DIR": "/srv/sync"},
    )  # fmt: skip
    executor = current_executor(agent)
    key = f"{layout.prefix}/scratch"
    revision = send(etcd, layout, node("lean"), "etcd_roundtrip", {"key": key})
    got = wait_result(etcd, layout, "lean", node("lean"), revision)
    assert (got.ok, got.result) == (True, "v"), got.error
    maps = Path(f"/proc/{executor}/maps").read_text()
    assert "lua54" in maps, "the executor runs Lua"
    assert "grpc" not in maps, "gRPC's C core is mapped into the executor"
    # A script's own settings pass (the credentials do not: test_agent_executor).
    assert b"GLEAM_SYNC_DIR=/srv/sync" in Path(f"/proc/{executor}/environ").read_bytes()


def test_the_executor_modules_import_neither_grpc_nor_the_etcd_client(tmp_path: Path) -> None:
    """sys.modules of a process that imports the executor's entry module and runs a task
    (gleam.Get included) through its runner, as the executor does."""
    (tmp_path / "t.lua").write_text('return (gleam.Get("/k"))', encoding="utf-8")
    code = """
import sys
from agent import lua_child, lua_exec
class KV:
    def get(self, key): return "value"
runner = lua_exec.LuaRunner(sys.argv[1], kv=KV(), agent_id="a", regions=[])
outcome = runner.run("t", None)
assert outcome.ok and outcome.result == "value", outcome
print(sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "pyetcd", "google")))
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# Crash loops -------------------------------------------------------------------------------


def test_a_task_interrupted_twice_by_the_agent_dying_is_not_run_again(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    scripts: Path, tmp_path: Path,
) -> None:  # fmt: skip
    counter = tmp_path / "runs.txt"
    data = {"file": str(counter), "gate": str(tmp_path / "never"), "n": 1}
    revision = send(etcd, layout, node("loop"), "count_gate", data)
    for attempt in (1, 2):
        agent = start(start_agent, etcd_server, layout, scripts, "loop")
        wait_until(lambda: len(lines(counter)) == attempt, what=f"run {attempt}")  # noqa: B023
        executor = executor_pids(agent)[-1]
        agent.proc.kill()  # the agent dies in the middle of the task
        agent.wait()
        wait_until(lambda: not alive(executor), what="the executor gone with its agent")  # noqa: B023
    agent = start(start_agent, etcd_server, layout, scripts, "loop")
    got = wait_result(etcd, layout, "loop", node("loop"), revision)
    assert not got.ok
    assert got.error == "interrupted twice: the agent stopped while running it"
    assert lines(counter) == ["1", "1"], "run twice, not a third time"
    assert_next_task_ok(etcd, layout, "loop")
    # Finished with: a later start runs nothing again.
    assert agent.stop() == 0
    agent = start(start_agent, etcd_server, layout, scripts, "loop")
    assert_next_task_ok(etcd, layout, "loop")
    assert lines(counter) == ["1", "1"]
    assert "was running when the agent stopped" not in agent.log()


def test_a_state_dir_others_can_write_stops_the_agent_at_start(
    etcd_server: EtcdServer, layout: keys.Layout, start_agent: StartAgent, tmp_path: Path,
) -> None:  # fmt: skip
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    agent = start_agent(etcd_server.endpoint, "-id", "st", "-state_dir", str(shared), layout=layout)
    assert agent.wait(timeout=60) == 1
    assert "-state_dir:" in agent.log() and "writable by no one else" in agent.log()
    assert "Traceback" not in agent.log()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
