"""Gleam's shared package: key layout, wire format, etcd connection and client API.

Both the agent and the reconciler import from here; nothing here imports from them.
"""

from gleam.client import (
    Outcome,
    Report,
    judge,
    list_agents,
    read_results,
    send_task,
    wait_for_results,
    watchers,
)
from gleam.connection import ConfigError, Settings, connect, make_settings
from gleam.keys import InvalidName, Kind, Layout, Target
from gleam.messages import AgentInfo, MessageError, Result, Task, decode_task
from gleam.version import VERSION

__all__ = [
    "VERSION",
    "AgentInfo",
    "ConfigError",
    "InvalidName",
    "Kind",
    "Layout",
    "MessageError",
    "Outcome",
    "Report",
    "Result",
    "Settings",
    "Target",
    "Task",
    "connect",
    "decode_task",
    "judge",
    "list_agents",
    "make_settings",
    "read_results",
    "send_task",
    "wait_for_results",
    "watchers",
]
