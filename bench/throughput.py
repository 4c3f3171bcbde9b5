"""Agent throughput: tasks per second through one agent, on distinct keys; against
`etcdctl watch --prefix -- date`."""

from __future__ import annotations

import time

from bench.harness import NOOP, Context, wait_registered, warm_up_etcdctl
from bench.observe import ResultWatch, current_revision, put_many
from bench.processes import (
    BenchError,
    Daemon,
    MarkerLines,
    start_agent,
    start_etcdctl_watch,
    stop_all,
)
from bench.report import Better, Goal, Row
from bench.stats import Series
from gleam import keys, messages

TITLE = "Agent throughput (workload 4)"
METHOD = """
One agent watches N region keys (`-region t0000:t0001:...`, N = 1,000 in the full run),
so no two tasks share a key and nothing coalesces. Each repetition writes one
`bench::noop` task to every key, in transactions of 128 writes (all N writes take a few
tens of milliseconds), and waits until the agent's N results *for those writes* (matched
by revision) have arrived at the benchmark's watch. Throughput = N ÷ (last result's
arrival − first write), so it counts completed tasks, end to end, never writes. The
agent-side rate (N ÷ span from the first task's start to the last task's end, from the
results' `started` and `duration_ms`) is shown too. Baseline: `etcdctl watch --prefix
REGIONS -- date` (one `date` process per event, run one after another) on the same
writes, counted by the `date` lines read back.
"""


def _tasks(layout: keys.Layout, regions: list[str], rep: int) -> dict[str, bytes]:
    return {layout.region_key(r): messages.Task(NOOP, {"rep": rep}).encode() for r in regions}


def _gleam_round(
    ctx: Context,
    watch: ResultWatch,
    layout: keys.Layout,
    agent: Daemon,
    agent_id: str,
    regions: list[str],
    rep: int,
) -> tuple[float, float]:
    floor = current_revision(ctx.etcd) + 1
    wanted = {layout.result_key(agent_id, keys.Target.region(r)): floor for r in regions}
    expectation = watch.expect(wanted)
    tasks = _tasks(layout, regions, rep)
    first_write = time.time()
    put_many(ctx.etcd, tasks)
    arrivals = watch.wait(
        expectation, timeout=300, what=f"{len(regions)} results", check=agent.check_alive
    ).values()
    failed = [a for a in arrivals if not a.result.ok]
    if failed:
        raise BenchError(f"{len(failed)} tasks failed: {failed[0].result.error}")
    end_to_end = len(regions) / (max(a.arrived for a in arrivals) - first_write)
    first_start = min(a.started for a in arrivals)
    last_end = max(a.started + a.result.duration_ms / 1000 for a in arrivals)
    agent_side = len(regions) / (last_end - first_start)
    return end_to_end, agent_side


def _baseline_round(
    ctx: Context, lines: MarkerLines, layout: keys.Layout, regions: list[str], rep: int
) -> float:
    lines.drain()
    first_write = time.time()
    put_many(ctx.etcd, _tasks(layout, regions, rep))
    deadline = time.monotonic() + 300
    last_read = first_write
    for _ in regions:
        last_read = lines.next_mark(timeout=max(0.1, deadline - time.monotonic()))
    return len(regions) / (last_read - first_write)


def run(ctx: Context) -> list[Row]:
    count = ctx.sizes.throughput_tasks
    layout = ctx.layout("throughput")
    base_layout = ctx.layout("throughput-etcdctl")
    regions = [f"t{i:04d}" for i in range(count)]
    agent_id = "throughput-1"
    agent = start_agent(
        endpoint=ctx.endpoint, prefix=layout.prefix, agent_id=agent_id, regions=regions,
        script_dir=ctx.script_dir, log_dir=ctx.log_dir, extra=ctx.agent_args,
    )  # fmt: skip
    lines = MarkerLines.pipe()
    watcher = start_etcdctl_watch(
        endpoint=ctx.endpoint, key=f"{base_layout.prefix}/region/", prefix=True,
        stdout_fd=lines.write_fd, log_dir=ctx.log_dir, name="etcdctl-watch-throughput",
    )  # fmt: skip
    lines.close_writer()
    watch = ResultWatch(ctx.etcd, layout)
    try:
        wait_registered(ctx, layout, [agent], timeout=120)
        _gleam_round(ctx, watch, layout, agent, agent_id, regions[:10], -1)  # warm-up
        warm_up_etcdctl(ctx, lines, base_layout.region_key("warm-up"))
        g_rate, g_agent, b_rate = [], [], []
        for rep in range(ctx.reps):
            rate, agent_side = _gleam_round(ctx, watch, layout, agent, agent_id, regions, rep)
            g_rate.append(rate)
            g_agent.append(agent_side)
            b_rate.append(_baseline_round(ctx, lines, base_layout, regions, rep))
    finally:
        watch.close()
        stop_all([agent, watcher])
    note = f"{count:,} tasks per run"
    return [
        Row("throughput", f"tasks/s through one agent, {count:,} distinct keys, end to end",
            "tasks/s", Series.of(g_rate), Series.of(b_rate), "etcdctl watch --prefix -- date",
            better=Better.HIGHER, goals=(Goal.at_least(1000),), note=note),
        Row("throughput", "tasks/s, agent side (first start → last end)", "tasks/s",
            Series.of(g_agent), better=Better.HIGHER, note=note),
    ]  # fmt: skip
