"""Helpers for the rollout end-to-end tests: a region of agents whose `roll` script
records every run in a file per agent and fails on the agents the task's data names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gleam import client, keys, messages, rollout
from tests.support import AgentProcess, wait_until

ROLL = """
local f = assert(io.open("{ran}", "a"))
f:write(tostring(gleam.Data.n), "\\n")
f:close()
for _, id in ipairs(gleam.Data.fail or {{}}) do
  if id == "{id}" then error("broken on {id}\\nsecond line") end
end
return gleam.Data.n
"""


class Region:
    """Agents in region `web`, each with its own script directory."""

    def __init__(
        self, tmp: Path, endpoint: str, layout: keys.Layout, start: Callable[..., AgentProcess]
    ) -> None:
        self.tmp, self.endpoint, self.layout, self._start = tmp, endpoint, layout, start
        self.agents: dict[str, AgentProcess] = {}

    def ran_file(self, agent_id: str) -> Path:
        return self.tmp / "ran" / agent_id

    def start(self, agent_id: str, *extra: str) -> AgentProcess:
        scripts = self.tmp / "scripts" / agent_id
        scripts.mkdir(parents=True, exist_ok=True)
        self.ran_file(agent_id).parent.mkdir(exist_ok=True)
        body = ROLL.format(ran=self.ran_file(agent_id), id=agent_id)
        (scripts / "roll.lua").write_text(body.lstrip(), encoding="utf-8")
        agent = self._start(
            self.endpoint,
            "-id",
            agent_id,
            "-region",
            "web",
            "-check_interval",
            "1",
            *extra,
            layout=self.layout,
            script_dir=scripts,
        )
        self.agents[agent_id] = agent
        return agent

    def runs(self, agent_id: str) -> list[int]:
        path = self.ran_file(agent_id)
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def ran(self, n: int) -> set[str]:
        """The agents that ran the task with data n."""
        return {a for a in self.agents if n in self.runs(a)}


def wait_registered(etcd: Any, layout: keys.Layout, count: int) -> None:
    wait_until(lambda: len(client.list_agents(etcd, layout)) >= count, what=f"{count} agents")


def send_staged(
    etcd: Any,
    layout: keys.Layout,
    *,
    n: int,
    fail: list[str] = (),
    **plan: Any,  # type: ignore[assignment]
) -> int:
    """Write a staged `roll` task to region web (no gate: a driver starts it)."""
    section = rollout.parse_plan(plan).to_json()
    task = messages.Task("roll", {"n": n, "fail": list(fail)}, rollout=section)
    return client.send_task(etcd, layout, keys.Target.region("web"), task)


def gate(etcd: Any, layout: keys.Layout) -> rollout.Gate | None:
    value, _meta = etcd.get(layout.rollout_key("web"))
    return None if value is None else rollout.decode_gate(value)
