"""Rollout holds on the agent: which staged region task this agent may run yet. Pure.

A region task whose message has `Rollout` runs only once the region's gate record
(`<prefix>/rollout/<region>`) names the task's revision and admits this agent (or all
agents, `"*"`). The gate records arrive through the watch loop like task keys, so they
have the same catch-up, resume and compaction guarantees."""

from __future__ import annotations

from collections.abc import Iterable

from gleam import keys, rollout


class Gates:
    """The newest gate record of each of this agent's regions."""

    def __init__(self, *, agent_id: str, layout: keys.Layout, regions: Iterable[str]) -> None:
        self._agent_id = agent_id
        # gate key -> the region task key it governs
        self._task_of = {layout.rollout_key(r): layout.region_key(r) for r in regions}
        self._gates: dict[str, rollout.Gate | None] = {}

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._task_of)

    def clear(self) -> None:
        """Forget every gate record (etcd went back in time: they are read again)."""
        self._gates.clear()

    def is_gate(self, key: str) -> bool:
        return key in self._task_of

    def observe(self, gate_key: str, value: bytes | None) -> str | None:
        """Take a gate record's new value (None: deleted); returns the task key it
        governs. A gate record that cannot be decoded admits nobody."""
        gate: rollout.Gate | None = None
        if value is not None:
            try:
                gate = rollout.decode_gate(value)
            except rollout.RolloutError:
                gate = None
        task_key = self._task_of[gate_key]
        self._gates[task_key] = gate
        return task_key

    def holds(self, task_key: str, revision: int, value: bytes) -> bool:
        """Must this task value wait? Only staged region tasks not admitted yet."""
        if task_key not in self._gates and task_key not in self._task_of.values():
            return False
        if rollout.staged(value) is None:
            return False
        gate = self._gates.get(task_key)
        return gate is None or not gate.admits(self._agent_id, revision)
