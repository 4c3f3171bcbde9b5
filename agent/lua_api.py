"""The Lua runner's interface: what it is given (a KV for gleam.Get/GetDir/Set/Delete)
and what a run gives back (a RunOutcome).

Three sides meet here: `agent.lua_exec` runs Lua and calls a KV; `agent.store.EtcdKV` is
a KV over a real etcd client, in the agent process; `agent.lua_child`'s KV asks the agent
over the executor's channel, and `agent.executor` returns the same RunOutcome the in-process
runner does. Standard library only: both processes import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gleam.messages import JSON


class KVError(Exception):
    """A KV call that failed; its text says how, for the script's error value."""


class KV(Protocol):
    def get(self, key: str) -> str | None: ...

    def get_dir(self, key: str) -> dict[str, str]: ...

    def set(self, key: str, value: str, ttl: int | None) -> None: ...

    def delete(self, key: str) -> None: ...


def dir_prefix(key: str) -> str:
    """The prefix a KV "directory" covers: GetDir reads it, Delete removes it with the
    key itself (an etcd v2 directory, as the original had)."""
    stripped = key.rstrip("/")
    if not stripped:
        raise ValueError(f"refusing to use {key!r} as a directory: it is the root of etcd")
    return stripped + "/"


@dataclass(frozen=True)
class RunOutcome:
    """What one run of a function gave."""

    ok: bool
    result: JSON
    error: str | None
    duration_ms: float


@dataclass(frozen=True)
class ExecutorOptions:
    """What the executor process needs to build its `LuaRunner` (as its keywords)."""

    script_dir: Path
    agent_id: str
    regions: tuple[str, ...]
    time_limit: float
    memory_limit: int  # bytes
