"""Before the agent starts: can its etcd user read every task key it is to watch, and
is its id free?

An agent under a role (`gleam-client access grant agent`) that is started with a region
its role does not cover would otherwise retry a denied read forever. A key it may not
read stops it at start (exit 2) with the key and the user named. etcd being down is not
a reason to refuse to start: the agent waits for it as always.

Two agents with one id would share one node key and one set of results. So an agent
whose registration `<prefix>/info/<id>` is held by another live agent (another host, or
another running pid on this host) refuses to start (exit 2) naming the holder, unless
`-takeover` is given. A record left by this host's previous run of the id (its pid no
longer runs: killed before its lease expired) is not another agent: it is replaced. The
registration loop applies the same rule later (agent/registration.py): an agent that
finds its record taken by another holder stops (exit 1) rather than write it back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from agent import store
from gleam import messages


def unreadable(etcd: store.Store, task_keys: Sequence[str]) -> str | None:
    """Why the agent must not start (a task key it may not read), or None. One read per
    key, so that the message names the key (a denied transaction names none)."""
    for key in task_keys:
        try:
            etcd.get(key)
        except store.Denied as exc:
            return f"cannot read {key}: {exc} (its etcd role must allow READ on the key)"
        except store.StoreError:
            return None
    return None


def pid_running(pid: int) -> bool:
    """True if a process with this pid exists on this host (any user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def other_holder(
    raw: bytes | None,
    me: messages.AgentInfo,
    *,
    running: Callable[[int], bool] = pid_running,
) -> messages.AgentInfo | None:
    """The live agent other than `me` that the registration `raw` names, or None: no
    record, an unreadable one (no agent to name), `me`, or this host's earlier run of
    the id whose pid no longer runs."""
    if raw is None:
        return None
    try:
        other = messages.decode_agent_info(raw)
    except messages.MessageError:
        return None
    if (other.hostname, other.pid) == (me.hostname, me.pid):
        return None
    if other.hostname == me.hostname and not running(other.pid):
        return None
    return other


def held_by_another(etcd: store.Store, key: str, me: messages.AgentInfo) -> str | None:
    """Why the agent must not start (its registration is another live agent's), or None.
    etcd unreachable: None (the registration loop checks again once it answers)."""
    try:
        holder = other_holder(etcd.get(key), me)
    except store.StoreError:
        return None
    if holder is None:
        return None
    return taken_message(key, holder) + (
        "; stop that agent or give this one another -id, or start with -takeover to "
        "replace it (that agent then exits)"
    )


def taken_message(key: str, holder: messages.AgentInfo) -> str:
    return (
        f"{key} is held by another live agent: pid {holder.pid} on host "
        f"{holder.hostname!r} (started {holder.started!r})"
    )
