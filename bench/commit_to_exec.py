"""Commit to execution: a commit in the ops repo, with the reconciler daemon running, to
the agent's result."""

from __future__ import annotations

import time
from collections.abc import Callable

from bench import opsrepo
from bench.harness import ECHO, Context, wait_registered
from bench.observe import Arrival, ResultWatch, current_revision
from bench.processes import BenchError, Daemon, reconcile_argv, start_agent, stop_all
from bench.report import Goal, Row
from bench.stats import Series
from gleam import keys

TITLE = "Commit to execution (workload 5)"
METHOD = """
A generated ops repository (1,000 manifests in the full run) holds one more manifest,
`tasks/nodes/commit-1.yaml`, for an agent running on this machine; the reconciler daemon
(`gleam-reconcile --repo R`, no `--once`) watches the checkout. Each sample edits that
manifest (a new sequence number in its data), commits it with `git commit`, and takes
the wall clock when `git commit` returns; the sample ends when the agent's result for
the task carrying that sequence number (the Lua chunk returns it) arrives at the
benchmark's watch. The next commit is made only after that. The daemon runs with its
default flags; a second series runs it with `-debounce 0.05` (its quiet period after a
checkout change) to show what the rest of the path costs. There is no baseline: the
plain alternatives (a CI job, a cron loop) start on a schedule or a push hook, not on a
commit in the checkout.
"""


# The daemon's quiet period after a checkout change, for the second, informative series:
# how fast the rest of the path (git read, diff, write, agent) is once that wait is short.
SHORT_DEBOUNCE = "0.05"


def _measure(ctx: Context, *, name: str, daemon_flags: tuple[str, ...]) -> tuple[Series, int]:
    """Seconds from each commit to its result; and the repo's size."""
    layout = ctx.layout(name)
    repo = opsrepo.generate(ctx.dir(f"ops-{name}"), size=ctx.sizes.commit_repo)
    agent_id = "commit-1"
    path = f"tasks/nodes/{agent_id}.yaml"
    opsrepo.commit_change(repo.path, path, name=ECHO, data={"seq": 0})
    result_key = layout.result_key(agent_id, keys.Target.node(agent_id))
    watch = ResultWatch(ctx.etcd, layout)
    agent = start_agent(
        endpoint=ctx.endpoint, prefix=layout.prefix, agent_id=agent_id, regions=(),
        script_dir=ctx.script_dir, log_dir=ctx.log_dir, extra=ctx.agent_args,
    )  # fmt: skip
    daemons = [agent]
    latencies = []
    try:
        wait_registered(ctx, layout, [agent], timeout=60)
        first = watch.expect({result_key: 0}, accept=_carries(0))
        argv = reconcile_argv(
            repo=repo.path, endpoint=ctx.endpoint, prefix=layout.prefix, once=False
        )
        log_path = ctx.log_dir / f"reconcile-daemon-{name}.log"
        daemon = Daemon("reconciler daemon", [*argv, *daemon_flags], log_path=log_path)
        daemons.append(daemon)
        watch.wait(
            first, timeout=180, what="the daemon's first reconcile", check=daemon.check_alive
        )
        for seq in range(1, ctx.sizes.commits + 1):
            floor = current_revision(ctx.etcd) + 1
            expectation = watch.expect({result_key: floor}, accept=_carries(seq))
            opsrepo.commit_change(
                repo.path, path, name=ECHO, data={"seq": seq}, message=f"bench: seq {seq}"
            )
            committed = time.time()
            found = watch.wait(
                expectation, timeout=60, what=f"commit {seq}", check=daemon.check_alive
            )
            arrival = found[result_key]
            if not arrival.result.ok:
                raise BenchError(f"the task of commit {seq} failed: {arrival.result.error}")
            latencies.append(arrival.arrived - committed)
    finally:
        watch.close()
        stop_all(daemons)
    return Series.of(latencies), len(repo.manifests)


def run(ctx: Context) -> list[Row]:
    default, size = _measure(ctx, name="commit", daemon_flags=())
    short, _ = _measure(
        ctx, name="commit-short-debounce", daemon_flags=("-debounce", SHORT_DEBOUNCE)
    )
    case = f"git commit → agent's result, daemon on a {size:,}-manifest repo"
    return [
        Row("commit → exec", f"{case}, default flags", "s", default,
            goals=(Goal.at_most(0.5),), per="commit"),
        Row("commit → exec", f"{case}, -debounce {SHORT_DEBOUNCE}", "s", short, per="commit"),
    ]  # fmt: skip


def _carries(seq: int) -> Callable[[Arrival], bool]:
    """Accept only the result of the task carrying `seq` (echo.lua returns it)."""
    return lambda arrival: arrival.result.result == seq
