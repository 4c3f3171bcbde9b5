"""The public Python client: send a task, list agents, read and wait for results.

gleam-client, gleam-reconcile --wait and the status command are built on these
functions; scripts can use them too (see the README). Every function takes a connected
pyetcd client (from `gleam.connection.connect`) and a `keys.Layout`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from gleam import keys, messages

Etcd = Any  # pyetcd.MultiEndpointEtcd3Client; pyetcd ships no type hints.


def send_task(etcd: Etcd, layout: keys.Layout, target: keys.Target, task: messages.Task) -> int:
    """Write `task` to the target's key; returns the write's revision (the key's new
    mod_revision, which agents put in their results)."""
    response = etcd.put(layout.task_key(target), task.encode())
    return int(response.header.revision)


def list_agents(etcd: Etcd, layout: keys.Layout) -> list[messages.AgentInfo]:
    """Live agents: those whose lease-bound registration is present, sorted by id.
    A registration that cannot be decoded is skipped rather than failing the listing."""
    agents = []
    for value, _meta in etcd.get_prefix(layout.info_prefix):
        try:
            agents.append(messages.decode_agent_info(value))
        except messages.MessageError:
            continue
    return sorted(agents, key=lambda a: a.id)


def read_results(etcd: Etcd, layout: keys.Layout) -> list[messages.Result]:
    """Every result record under the prefix (including those of departed agents)."""
    results = []
    for value, meta in etcd.get_prefix(layout.results_prefix):
        parsed = layout.parse_result_key(meta.key.decode("utf-8", "replace"))
        if parsed is None:
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


class Outcome(str, Enum):
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
    etcd: Etcd,
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
