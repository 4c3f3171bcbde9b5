"""Helpers for the agent's end-to-end tests: test scripts, reading and waiting for result
records, writing task values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import lua_api
from gleam import client, keys, messages
from tests.support import AgentProcess, wait_until

StartAgent = Callable[..., AgentProcess]

# Functions the agent tests run, besides the shipped examples.
TEST_SCRIPTS = {
    # Append Data.n to the file Data.file: how many times a task ran is the line count.
    "count": """
local f = assert(io.open(gleam.Data.file, "a"))
f:write(tostring(gleam.Data.n), "\\n")
f:close()
return gleam.Data.n
""",
    # Wait until the file Data.gate exists, then return Data.n: a task that runs as long
    # as the test wants.
    "gate": """
gleam.Message("waiting at the gate")
local f = io.open(gleam.Data.gate)
while not f do
  gleam.exec({"sleep", "0.05"})
  f = io.open(gleam.Data.gate)
end
f:close()
return gleam.Data.n
""",
    "fail": 'error("deliberate failure")',
    "spin": "while true do end",
    "bomb": """
local t, i = {}, 0
while true do
  i = i + 1
  t[i] = string.rep("x", 1024 * 1024) .. i
end
""",
    "quit": "os.exit(3)",
    "echo": "return gleam.Data",
}


def write_scripts(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, body in TEST_SCRIPTS.items():
        (root / f"{name}.lua").write_text(body.lstrip(), encoding="utf-8")
    return root


def result(
    etcd: Any, layout: keys.Layout, agent_id: str, target: keys.Target
) -> messages.Result | None:
    value, _meta = etcd.get(layout.result_key(agent_id, target))
    return None if value is None else messages.decode_result(value)


def wait_result(
    etcd: Any,
    layout: keys.Layout,
    agent_id: str,
    target: keys.Target,
    revision: int,
    *,
    timeout: float = 30.0,
) -> messages.Result:
    """The agent's result for `target` once it covers `revision`."""

    def ready() -> messages.Result | None:
        found = result(etcd, layout, agent_id, target)
        return found if found is not None and found.revision >= revision else None

    found = wait_until(
        ready, timeout=timeout, what=f"{agent_id}'s result for {target} at revision {revision}"
    )
    assert found is not None
    return found


def send(etcd: Any, layout: keys.Layout, target: keys.Target, name: str, data: Any = None) -> int:
    return client.send_task(etcd, layout, target, messages.Task(name, data))


def put_raw(etcd: Any, layout: keys.Layout, target: keys.Target, raw: bytes) -> int:
    return int(etcd.put(layout.task_key(target), raw).header.revision)


def info(etcd: Any, layout: keys.Layout, agent_id: str) -> tuple[messages.AgentInfo, int] | None:
    """The agent's registration and the id of the lease it is bound to."""
    value, meta = etcd.get(layout.info_key(agent_id))
    return None if value is None else (messages.decode_agent_info(value), int(meta.lease_id))


def wait_registered(
    etcd: Any, layout: keys.Layout, agent_id: str, *, timeout: float = 30.0
) -> tuple[messages.AgentInfo, int]:
    found = wait_until(
        lambda: info(etcd, layout, agent_id), timeout=timeout, what=f"{agent_id} registered"
    )
    assert found is not None
    return found


def wait_log(agent: AgentProcess, text: str, *, timeout: float = 30.0, count: int = 1) -> str:
    """Wait until the agent's log holds `text` (at least `count` times)."""
    return wait_until(
        lambda: agent.log() if agent.log().count(text) >= count else "",
        timeout=timeout,
        what=f"{text!r} in the agent's log",
    )


def node(agent_id: str) -> keys.Target:
    return keys.Target.node(agent_id)


def region(name: str) -> keys.Target:
    return keys.Target.region(name)


class MemoryKV:
    """`agent.lua_api.KV` in a dict, with EtcdKV's rules (GetDir reads `key/`, Delete
    removes the key and everything under `key/`; a TTL is accepted and ignored), for Lua
    tests that need no etcd. tests/test_lua_exec.py checks that both answer alike."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def get_dir(self, key: str) -> dict[str, str]:
        prefix = self._prefix(key)
        return {k: v for k, v in sorted(self.data.items()) if k.startswith(prefix)}

    def set(self, key: str, value: str, ttl: int | None) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        prefix = self._prefix(key)
        for name in [k for k in self.data if k == key or k.startswith(prefix)]:
            del self.data[name]

    @staticmethod
    def _prefix(key: str) -> str:
        try:
            return lua_api.dir_prefix(key)
        except ValueError as exc:
            raise lua_api.KVError(f"ValueError: {exc}") from None
