"""Gleam's shared package: key layout, wire format, etcd connection and client API.

Both the agent and the reconciler import from here; nothing here imports from them.
"""

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
