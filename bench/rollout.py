"""Rollouts: how fast a driver admits the next wave, and a 3-wave rollout end to end."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from bench.harness import NOOP, Context, wait_registered
from bench.processes import BenchError, Daemon, start_agent, stop_all
from bench.report import Goal, Row
from bench.stats import Series
from gleam import client, keys, messages, rollout, rollout_driver

TITLE = "Rollouts (waves)"
METHOD = """
N agent subprocesses (20 in the full and quick runs) in one region. Each repetition
writes a staged region task (`bench::noop`, waves `[1, "50%", "100%"]`, bake 0) and drives
it in this process with gleam.rollout_driver (polling every 50 ms, as the reconcile
daemon does) until the gate record says complete. *Wave advance* is, for each wave but the
last, the time from the last ok result of the wave (the result's start plus its
duration, from the agents' clocks on this machine) to the gate write admitting the next
wave; *3-wave rollout* is from the task write to the gate write that completes it. No
baseline: no plain tool gates waves on per-host results.
"""


def _end(result: messages.Result) -> float:
    started = datetime.strptime(result.started, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return started.timestamp() + result.duration_ms / 1000


def _one(ctx: Context, layout: keys.Layout, region: str, seq: int) -> tuple[float, list[float]]:
    admitted_at: dict[int, float] = {}
    gates: dict[int, rollout.Gate] = {}

    def say(line: str) -> None:
        if line.startswith("wave ") and " admitted" in line:
            admitted_at[int(line.split()[1].split("/")[0])] = time.time()

    driver = rollout_driver.Driver.over(ctx.etcd, layout, say=say)
    plan = rollout.parse_plan({"waves": [1, "50%", "100%"]})
    task = messages.Task(NOOP, {"seq": seq}, rollout=plan.to_json())
    written = time.time()
    client.send_task(ctx.etcd, layout, keys.Target.region(region), task)
    deadline = time.monotonic() + 120
    while True:
        gate = driver.step(region)
        if gate is not None:
            gates[gate.wave] = gate
            if gate.state is rollout.State.COMPLETE:
                break
            if gate.state is not rollout.State.PROGRESSING:
                raise BenchError(f"the rollout stopped: {gate.state.value} {gate.reason}")
        if time.monotonic() > deadline:
            raise BenchError("the rollout did not complete within 120 s")
        time.sleep(rollout_driver.POLL_SECONDS)
    total = (time.time() - written) * 1000
    target = keys.Target.region(region)
    advances = []
    for wave in range(1, gate.waves):
        members = gates[wave].admitted if wave in gates else ()
        ends = []
        for agent in members:
            value, _meta = ctx.etcd.get(layout.result_key(agent, target))
            if value is not None:
                ends.append(_end(messages.decode_result(value)))
        if ends and wave + 1 in admitted_at:
            advances.append(max(0.0, (admitted_at[wave + 1] - max(ends)) * 1000))
    return total, advances


def run(ctx: Context) -> list[Row]:
    count = 6 if ctx.sizes.name == "smoke" else 20
    layout = ctx.layout("rollout")
    region = "waves"
    agents: list[Daemon] = []
    try:
        for i in range(count):
            agents.append(
                start_agent(
                    endpoint=ctx.endpoint,
                    prefix=layout.prefix,
                    agent_id=f"wave-{i:02d}",
                    regions=(region,),
                    script_dir=ctx.script_dir,
                    log_dir=ctx.log_dir,
                    extra=ctx.agent_args,
                )  # fmt: skip
            )
        wait_registered(ctx, layout, agents, timeout=60 + 3 * count)
        _one(ctx, layout, region, -1)  # warm-up
        totals, advances = [], []
        for rep in range(ctx.reps):
            total, steps = _one(ctx, layout, region, rep)
            totals.append(total)
            advances += steps
    finally:
        stop_all(agents)
    return [
        Row("rollout", "wave advance: last ok result of a wave → next wave admitted, bake 0",
            "ms", Series.of(advances), goals=(Goal.at_most(100),)),
        Row("rollout", f"3-wave rollout to {count} agents, write → complete, bake 0", "ms",
            Series.of(totals), goals=(Goal.at_most(2000),)),
    ]  # fmt: skip
