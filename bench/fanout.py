"""Fan-out: one region task reaching many agent subprocesses; their resident memory.
Against the same number of `etcdctl watch KEY -- date` processes."""

from __future__ import annotations

import time

from bench.harness import NOOP, Context, wait_registered, warm_up_etcdctl
from bench.observe import ResultWatch, current_revision
from bench.processes import (
    BenchError,
    Daemon,
    MarkerLines,
    check_all,
    start_agent,
    start_etcdctl_watch,
    stop_all,
)
from bench.report import Goal, Row, Stat
from bench.stats import Series, percentile
from gleam import keys, messages

TITLE = "Fan-out (workload 3)"
METHOD = """
N agent subprocesses (100 in the full run) start on this machine, all watching one
region. After a warm-up task, each repetition writes one task (`bench::noop`) to the
region key and waits until every agent's result has arrived at the benchmark's watch of
the result keys: *all results* is the time from the write to the last arrival (an upper
bound of "written": it includes delivering the result back), *median agent* the median
arrival. Resident memory is each agent's VmRSS from `/proc/<pid>/status`, summed over the
agent and its Lua executor process (and any other descendant), read when the
fleet has registered (idle after start) and again after the repetitions (idle after
running tasks, with its Lua runtime and caches warm); the target applies to the worst
agent. RSS counts shared libraries in full, as a single agent on a host pays them; the
private memory (USS: private pages from `/proc/<pid>/smaps_rollup`) is what each further
process costs. Baseline: N `etcdctl watch REGIONKEY -- date` processes, timed by the last `date`
stamp read back, and their VmRSS.
"""


BOTH = "agent process + Lua executor process"


def _wait_marks(lines: MarkerLines, count: int, *, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    return [lines.next_mark(timeout=max(0.1, deadline - time.monotonic())) for _ in range(count)]


def gleam_round(
    ctx: Context,
    watch: ResultWatch,
    layout: keys.Layout,
    fleet: dict[str, Daemon],
    region: str,
    seq: int,
) -> tuple[float, float]:
    ids = list(fleet)
    target = keys.Target.region(region)
    floor = current_revision(ctx.etcd) + 1
    expectation = watch.expect({layout.result_key(i, target): floor for i in ids})
    written = time.time()
    ctx.etcd.put(layout.task_key(target), messages.Task(NOOP, {"seq": seq}).encode())
    arrivals = watch.wait(
        expectation,
        timeout=120,
        what=f"{len(ids)} agents' results",
        check=lambda: check_all(fleet.values()),
    )
    failed = [a for a in arrivals.values() if not a.result.ok]
    if failed:
        raise BenchError(f"{len(failed)} agents failed the task: {failed[0].result.error}")
    times = [(a.arrived - written) * 1000 for a in arrivals.values()]
    return max(times), percentile(times, 50)


def _baseline_round(ctx: Context, lines: MarkerLines, key: str, count: int) -> tuple[float, float]:
    lines.drain()
    written = time.time()
    ctx.etcd.put(key, b"task")
    marks = _wait_marks(lines, count, timeout=120)
    times = [(read - written) * 1000 for read in marks]
    return max(times), percentile(times, 50)


def run(ctx: Context) -> list[Row]:
    count = ctx.sizes.fanout_agents
    layout = ctx.layout("fanout")
    region = "fleet"
    ids = [f"fan-{i:03d}" for i in range(count)]
    base_key = ctx.layout("fanout-etcdctl").region_key(region)
    agents: list[Daemon] = []
    watchers: list[Daemon] = []
    lines = MarkerLines.pipe()
    watch = ResultWatch(ctx.etcd, layout)
    try:
        for agent_id in ids:
            agents.append(
                start_agent(
                    endpoint=ctx.endpoint,
                    prefix=layout.prefix,
                    agent_id=agent_id,
                    regions=(region,),
                    script_dir=ctx.script_dir,
                    log_dir=ctx.log_dir,
                    extra=ctx.agent_args,
                )  # fmt: skip
            )
        for i in range(count):
            watchers.append(
                start_etcdctl_watch(
                    endpoint=ctx.endpoint,
                    key=base_key,
                    prefix=False,
                    stdout_fd=lines.write_fd,
                    log_dir=ctx.log_dir,
                    name=f"etcdctl-fan-{i:03d}",
                )  # fmt: skip
            )
        lines.close_writer()
        wait_registered(ctx, layout, agents, timeout=60 + 3 * count)
        fleet = dict(zip(ids, agents, strict=True))
        gleam_round(ctx, watch, layout, fleet, region, -1)  # warm-up: every agent watching
        rss_start = [a.rss_mib() for a in agents]
        warm_up_etcdctl(ctx, lines, base_key, count=count)
        g_all, g_mid, b_all, b_mid = [], [], [], []
        for rep in range(ctx.reps):
            last, mid = gleam_round(ctx, watch, layout, fleet, region, rep)
            g_all.append(last)
            g_mid.append(mid)
            last, mid = _baseline_round(ctx, lines, base_key, count)
            b_all.append(last)
            b_mid.append(mid)
        rss_after = [a.rss_mib() for a in agents]
        uss_after = [a.uss_mib() for a in agents]
        rss_etcdctl = [w.rss_mib() for w in watchers]
        uss_etcdctl = [w.uss_mib() for w in watchers]
    finally:
        watch.close()
        stop_all([*agents, *watchers])
    label = f"{count} × etcdctl watch -- date"
    return [
        Row("fan-out", f"one region task → all {count} agents' results", "ms",
            Series.of(g_all), Series.of(b_all), label, goals=(Goal.at_most(1000, stat=Stat.MAX),)),
        Row("fan-out", f"one region task → median agent's result, {count} agents", "ms",
            Series.of(g_mid), Series.of(b_mid), label),
        Row("fan-out", "agent RSS, idle after start", "MiB", Series.of(rss_start),
            Series.of(rss_etcdctl), "etcdctl watch", per="agent", note=BOTH),
        Row("fan-out", "agent RSS, idle after running tasks", "MiB", Series.of(rss_after),
            Series.of(rss_etcdctl), "etcdctl watch", per="agent",
            goals=(Goal.at_most(40, stat=Stat.MAX),), note=BOTH),
        Row("fan-out", "agent private memory (USS), idle after running tasks", "MiB",
            Series.of(uss_after), Series.of(uss_etcdctl), "etcdctl watch", per="agent",
            note=BOTH),
    ]  # fmt: skip
