"""Gleam's shared package: key layout, wire format, etcd connection and client API.

Both the agent and the reconciler import from here; nothing here imports from them.

The public names below are imported on first use (PEP 562), not when the package is
imported: `import gleam.keys` must not load the etcd client and its gRPC runtime, because
the agent's Lua executor process imports `gleam.keys` and `gleam.messages` and must stay
free of both (it holds no etcd connection, and gRPC alone is about 20 MiB).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gleam.client import (
        Outcome,
        Report,
        Snapshot,
        TaskEntry,
        judge,
        list_agents,
        list_tasks,
        read_results,
        read_snapshot,
        send_task,
        send_tasks,
        wait_for_results,
        watchers,
    )
    from gleam.connection import ConfigError, Settings, connect, make_settings
    from gleam.keys import InvalidName, Kind, Layout, Target
    from gleam.messages import AgentInfo, MessageError, Result, Task, decode_task
    from gleam.status import FleetStatus
    from gleam.targeting import TargetError
    from gleam.version import VERSION

# Where each public name lives.
_SOURCES: dict[str, tuple[str, ...]] = {
    "gleam.client": (
        "Outcome", "Report", "Snapshot", "TaskEntry", "judge", "list_agents", "list_tasks",
        "read_results", "read_snapshot", "send_task", "send_tasks", "wait_for_results",
        "watchers",
    ),
    "gleam.connection": ("ConfigError", "Settings", "connect", "make_settings"),
    "gleam.keys": ("InvalidName", "Kind", "Layout", "Target"),
    "gleam.messages": ("AgentInfo", "MessageError", "Result", "Task", "decode_task"),
    "gleam.status": ("FleetStatus",),
    "gleam.targeting": ("TargetError",),
    "gleam.version": ("VERSION",),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "VERSION",
    "AgentInfo",
    "ConfigError",
    "FleetStatus",
    "InvalidName",
    "Kind",
    "Layout",
    "MessageError",
    "Outcome",
    "Report",
    "Result",
    "Settings",
    "Snapshot",
    "Target",
    "TargetError",
    "Task",
    "TaskEntry",
    "connect",
    "decode_task",
    "judge",
    "list_agents",
    "list_tasks",
    "make_settings",
    "read_results",
    "read_snapshot",
    "send_task",
    "send_tasks",
    "wait_for_results",
    "watchers",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'gleam' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
