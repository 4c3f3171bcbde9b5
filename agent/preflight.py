"""Before the agent starts: can its etcd user read every task key it is to watch?

An agent under a role (`gleam-client access grant agent`) that is started with a region
its role does not cover would otherwise retry a denied read forever. A key it may not
read stops it at start (exit 2) with the key and the user named. etcd being down is not
a reason to refuse to start: the agent waits for it as always.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent import store


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
