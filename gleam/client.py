"""The public Python client: send a task, list agents, read and wait for results.

gleam-client, gleam-reconcile --wait and the status command are built on these
functions; scripts can use them too (see the README). Every function takes a connected
pyetcd client (from `gleam.connection.connect`) and a `keys.Layout`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from gleam import connection, keys, messages


def send_task(
    etcd: connection.Client, layout: keys.Layout, target: keys.Target, task: messages.Task
) -> int:
    """Write `task` to the target's key; returns the write's revision (the key's new
    mod_revision, which agents put in their results)."""
    response = etcd.put(layout.task_key(target), task.encode())
    return int(response.header.revision)


def list_agents(etcd: connection.Client, layout: keys.Layout) -> list[messages.AgentInfo]:
    """Live agents: those whose lease-bound registration is present, sorted by id.
    A registration that cannot be decoded is skipped rather than failing the listing."""
    return _decode_agents(value for value, _meta in etcd.get_prefix(layout.info_prefix))


def _decode_agents(values: Iterable[bytes]) -> list[messages.AgentInfo]:
    agents = []
    for value in values:
        try:
            agents.append(messages.decode_agent_info(value))
        except messages.MessageError:
            continue
    return sorted(agents, key=lambda a: a.id)


def read_results(etcd: connection.Client, layout: keys.Layout) -> list[messages.Result]:
    """Every result record under the prefix (including those of departed agents)."""
    return _decode_results(
        ((_key(meta), value) for value, meta in etcd.get_prefix(layout.results_prefix)), layout
    )


def _key(meta: Any) -> str:
    return str(meta.key.decode("utf-8", "replace"))


def _decode_results(
    items: Iterable[tuple[str, bytes]], layout: keys.Layout
) -> list[messages.Result]:
    results = []
    for key, value in items:
        if layout.parse_result_key(key) is None:
            continue
        try:
            results.append(messages.decode_result(value))
        except messages.MessageError:
            continue
    return results


def watchers(target: keys.Target, agents: Iterable[messages.AgentInfo]) -> list[str]:
    """Ids of the agents that watch `target`: the node's own agent, or a region's members."""
    if target.kind is keys.Kind.NODE:
        return sorted(a.id for a in agents if a.id == target.name)
    return sorted(a.id for a in agents if target.name in a.regions)


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    PENDING = "pending"  # no result for this revision (yet)


@dataclass(frozen=True)
class Report:
    """One agent's answer (or silence) for one task key at one revision."""

    agent: str
    key: str
    revision: int
    outcome: Outcome
    result: messages.Result | None = None

    @property
    def error(self) -> str | None:
        return self.result.error if self.result is not None else None


def judge(
    expected: Mapping[str, int],
    agents: Iterable[messages.AgentInfo],
    results: Iterable[messages.Result],
    layout: keys.Layout,
) -> list[Report]:
    """Pure: for each task key at its expected revision, each watching agent's outcome.

    A result for a later revision also answers (the agent coalesced our write into a
    newer one, or ran ours and then a newer one)."""
    agent_list = list(agents)
    by_agent_key = {(r.agent, r.key): r for r in results}
    reports = []
    for key, revision in sorted(expected.items()):
        target = layout.parse_task_key(key)
        if target is None:
            raise keys.InvalidName(f"{key!r} is not a task key under {layout.prefix}")
        for agent_id in watchers(target, agent_list):
            result = by_agent_key.get((agent_id, key))
            if result is None or result.revision < revision:
                reports.append(Report(agent_id, key, revision, Outcome.PENDING, result))
            else:
                outcome = Outcome.OK if result.ok else Outcome.FAILED
                reports.append(Report(agent_id, key, revision, outcome, result))
    return reports


def wait_for_results(
    etcd: connection.Client,
    layout: keys.Layout,
    expected: Mapping[str, int],
    *,
    timeout: float,
    poll_interval: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Report]:
    """Wait until every live agent that watches each key in `expected` (key -> revision
    written) has a result for that revision or later, or until `timeout` seconds pass.

    The set of agents is taken when the wait starts, so an agent that dies meanwhile is
    reported PENDING rather than silently dropped. Returns the final reports."""
    agents = list_agents(etcd, layout)
    deadline = clock() + timeout
    while True:
        reports = judge(expected, agents, read_results(etcd, layout), layout)
        if all(r.outcome is not Outcome.PENDING for r in reports) or clock() >= deadline:
            return reports
        sleep(min(poll_interval, max(0.0, deadline - clock())))


# Several targets at once, listings and whole-fleet snapshots ----------------------------


def send_tasks(
    etcd: connection.Client,
    layout: keys.Layout,
    targets: Iterable[keys.Target],
    task: messages.Task,
) -> int:
    """Write `task` to every target's key in ONE etcd transaction: all keys or none.

    Returns the transaction's revision, which is every written key's new mod_revision
    (what agents put in their results, and what `wait_for_results` waits for)."""
    value = task.encode()
    task_keys = sorted({layout.task_key(t) for t in targets})
    if not task_keys:
        raise ValueError("send_tasks: no target given")
    _ok, responses = etcd.transaction(
        compare=[],
        success=[etcd.transactions.put(key, value) for key in task_keys],
        failure=[],
    )
    return int(responses[0].response_put.header.revision)


@dataclass(frozen=True)
class TaskEntry:
    """A task key as stored: its target, its raw value and the revisions etcd gave it."""

    key: str
    target: keys.Target
    revision: int  # mod_revision: what agents record having run
    value: bytes

    def decode(self) -> messages.Task:
        """The task message; raises MessageError for a value agents would refuse."""
        return messages.decode_task(self.value)


class Stored(NamedTuple):
    """A raw value with its mod_revision."""

    value: bytes
    revision: int


@dataclass(frozen=True)
class Snapshot:
    """Everything under the prefix, read in one request, so at one etcd revision: task
    keys, live registrations, results (of live and departed agents) and the
    reconciler's bookkeeping under `<prefix>/meta/` (raw values and revisions, by key)."""

    revision: int
    tasks: tuple[TaskEntry, ...]
    agents: tuple[messages.AgentInfo, ...]
    results: tuple[messages.Result, ...]
    meta: Mapping[str, Stored]


def _task_entries(items: Iterable[tuple[str, bytes, int]], layout: keys.Layout) -> list[TaskEntry]:
    entries = []
    for key, value, revision in items:
        target = layout.parse_task_key(key)
        if target is not None:
            entries.append(TaskEntry(key, target, revision, value))
    return sorted(entries, key=lambda e: (e.target.kind.value, e.target.name))


def list_tasks(etcd: connection.Client, layout: keys.Layout, kind: keys.Kind) -> list[TaskEntry]:
    """The task keys of one kind (`node` or `region`) with their values and revisions."""
    return _task_entries(
        (
            (_key(meta), value, int(meta.mod_revision))
            for value, meta in etcd.get_prefix(layout.tasks_prefix(kind))
        ),
        layout,
    )


def read_snapshot(etcd: connection.Client, layout: keys.Layout) -> Snapshot:
    """One consistent read of the whole prefix (see Snapshot)."""
    response = etcd.get_prefix_response(layout.prefix + "/")
    items = [
        (kv.key.decode("utf-8", "replace"), kv.value, int(kv.mod_revision)) for kv in response.kvs
    ]
    return Snapshot(
        revision=int(response.header.revision),
        tasks=tuple(_task_entries(items, layout)),
        agents=tuple(
            _decode_agents(value for key, value, _ in items if key.startswith(layout.info_prefix))
        ),
        results=tuple(_decode_results(((key, value) for key, value, _ in items), layout)),
        meta={
            key: Stored(value, revision)
            for key, value, revision in items
            if key.startswith(layout.meta_prefix)
        },
    )
