"""Dispatch latency: a task written to a node key, to the Lua chunk starting on the
agent; against `etcdctl watch KEY -- date`."""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.harness import MARK, Context, wait_registered, warm_up_etcdctl
from bench.observe import ResultWatch, current_revision
from bench.processes import (
    BenchError,
    Daemon,
    MarkerLines,
    start_agent,
    start_etcdctl_watch,
    stop_all,
)
from bench.report import Goal, Row
from bench.stats import Series, percentile
from gleam import keys, messages

TITLE = "Dispatch latency (workload 2)"
METHOD = """
One agent (`python -m agent.gleam_agent -id ...`) watches its node key. The benchmark
writes a task, waits for its result, then writes the next: 500 tasks per repetition,
after a few warm-up tasks. The task (`bench::mark`) first writes one line into a named
pipe that the benchmark reads in a thread; *dispatch* is the wall time that line
arrived minus the wall time taken just before the write was sent. Both stamps come from
the benchmark's own clock, so no other process's clock (nor the agent's
millisecond-precision `started` field) is trusted; the pipe adds tens of microseconds.
*Round trip* is the time until the task's result arrives at the benchmark's watch.

Baseline, measured the same way: `etcdctl watch KEY -- date +%s.%N`. Each event runs
`date`, whose only act is to write one line to the benchmark's pipe; dispatch is the
arrival of that line minus the writer's stamp.
"""

WARMUP = 5


class GleamTasks:
    """Tasks sent one at a time to one agent's node key: `send(i)` writes task `i`, waits
    for its result and its chunk's mark, and returns (dispatch, round trip) in seconds.
    `encode(task, key, prev)` makes each message after the writer's clock stamp, so that
    a signing writer's work counts in the dispatch time."""

    def __init__(
        self,
        ctx: Context,
        watch: ResultWatch,
        marks: MarkerLines,
        fifo: str,
        *,
        layout: keys.Layout,
        agent: Daemon,
        agent_id: str,
        encode: Callable[[messages.Task, str, int], bytes] = (
            lambda task, _key, _prev: task.encode()
        ),
    ) -> None:
        target = keys.Target.node(agent_id)
        self._ctx, self._watch, self._marks, self._fifo = ctx, watch, marks, fifo
        self._agent, self._encode = agent, encode
        self._task_key = layout.task_key(target)
        self._result_key = layout.result_key(agent_id, target)
        self._floor = current_revision(ctx.etcd) + 1
        marks.drain()

    def send(self, i: int) -> tuple[float, float]:
        task = messages.Task(MARK, {"i": i, "mark": self._fifo})
        expectation = self._watch.expect({self._result_key: self._floor})
        written = time.time()
        payload = self._encode(task, self._task_key, self._floor - 1)
        revision = int(self._ctx.etcd.put(self._task_key, payload).header.revision)
        arrival = self._watch.wait(
            expectation, timeout=30, what=f"the result of task {i}", check=self._agent.check_alive
        )[self._result_key]
        if arrival.result.revision != revision or not arrival.result.ok:
            raise BenchError(f"unexpected result for revision {revision}: {arrival.result}")
        line, started = self._marks.next(timeout=5)
        if line != f"LUA{i}":
            raise BenchError(f"task {i}: the chunk wrote {line!r}")
        self._floor = revision + 1
        return started - written, arrival.arrived - written


def _gleam_rep(tasks: GleamTasks, count: int) -> tuple[list[float], list[float]]:
    """One repetition: `count` tasks, one after the other."""
    dispatch, round_trip = [], []
    for i in range(count):
        one, back = tasks.send(i)
        dispatch.append(one)
        round_trip.append(back)
    return dispatch, round_trip


def _baseline_rep(ctx: Context, lines: MarkerLines, key: str, tasks: int) -> list[float]:
    dispatch = []
    lines.drain()
    for i in range(tasks):
        payload = messages.Task(MARK, {"i": i}).encode()
        written = time.time()
        ctx.etcd.put(key, payload)
        dispatch.append(lines.next_mark(timeout=30) - written)
    return dispatch


def run(ctx: Context) -> list[Row]:
    layout = ctx.layout("dispatch")
    agent_id = "dispatch-1"
    fifo = ctx.dir("dispatch") / "chunk-started.fifo"
    marks = MarkerLines.fifo(fifo)
    agent = start_agent(
        endpoint=ctx.endpoint, prefix=layout.prefix, agent_id=agent_id, regions=(),
        script_dir=ctx.script_dir, log_dir=ctx.log_dir, extra=ctx.agent_args,
    )  # fmt: skip
    lines = MarkerLines.pipe()
    base_key = ctx.layout("dispatch-etcdctl").node_key("watched")
    watcher = start_etcdctl_watch(
        endpoint=ctx.endpoint, key=base_key, prefix=False, stdout_fd=lines.write_fd,
        log_dir=ctx.log_dir, name="etcdctl-watch-dispatch",
    )  # fmt: skip
    lines.close_writer()
    watch = ResultWatch(ctx.etcd, layout)
    tasks = ctx.sizes.dispatch_tasks

    def gleam(count: int) -> tuple[list[float], list[float]]:
        sender = GleamTasks(
            ctx, watch, marks, str(fifo), layout=layout, agent=agent, agent_id=agent_id
        )
        return _gleam_rep(sender, count)

    try:
        wait_registered(ctx, layout, [agent], timeout=60)
        gleam(WARMUP)
        warm_up_etcdctl(ctx, lines, base_key)
        _baseline_rep(ctx, lines, base_key, WARMUP)
        g_p50, g_p99, g_rt, b_p50, b_p99 = [], [], [], [], []
        for _ in range(ctx.reps):
            dispatch, round_trip = gleam(tasks)
            g_p50.append(percentile(dispatch, 50) * 1000)
            g_p99.append(percentile(dispatch, 99) * 1000)
            g_rt.append(percentile(round_trip, 50) * 1000)
            dispatch = _baseline_rep(ctx, lines, base_key, tasks)
            b_p50.append(percentile(dispatch, 50) * 1000)
            b_p99.append(percentile(dispatch, 99) * 1000)
    finally:
        watch.close()
        stop_all([agent, watcher])
    label = "etcdctl watch -- date"
    note = f"{tasks} tasks per run"
    return [
        Row("dispatch", "write → Lua chunk starts, p50", "ms", Series.of(g_p50),
            Series.of(b_p50), label, goals=(Goal.at_most(10), Goal.advantage(1.0)), note=note),
        Row("dispatch", "write → Lua chunk starts, p99", "ms", Series.of(g_p99),
            Series.of(b_p99), label, goals=(Goal.at_most(50),), note=note),
        Row("dispatch", "write → result back at the writer, p50", "ms", Series.of(g_rt),
            note=note),
    ]  # fmt: skip
