"""What every workload shares: the sizes of a run, the run's context (etcd, work
directory, scripts), and waiting for agents to register."""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyetcd.exceptions

from bench.processes import BenchError, Daemon, MarkerLines, check_all
from gleam import keys

SCRIPTS = Path(__file__).resolve().parent / "scripts"
NOOP = "bench::noop"
MARK = "bench::mark"
ECHO = "bench::echo"


@dataclass(frozen=True)
class Sizes:
    """How big each workload is. FULL is what the issue's targets are stated for."""

    name: str
    reconcile: tuple[int, ...]
    reconcile_baseline: int
    dispatch_tasks: int
    fanout_agents: int
    throughput_tasks: int
    commits: int
    commit_repo: int
    reps: int
    # Agents of the large-fleet workload (`--agents N`): 300 processes swamp a 2-core
    # machine shared with other work, and each agent may soon be two processes.
    fleet_agents: int = 300


FULL = Sizes("full", (1000, 10000, 100000), 1000, 500, 100, 1000, 15, 1000, reps=5)
QUICK = Sizes("quick", (200, 1000), 100, 100, 20, 300, 5, 200, reps=3, fleet_agents=30)
# For the smoke test: every code path, tiny sizes, seconds per workload.
SMOKE = Sizes("smoke", (20,), 10, 5, 3, 20, 2, 10, reps=1, fleet_agents=3)
PROFILES = {s.name: s for s in (FULL, QUICK, SMOKE)}


@dataclass
class Context:
    """One benchmark run: an etcd, a connected client, a work directory."""

    endpoint: str
    etcd: Any  # pyetcd client
    workdir: Path
    sizes: Sizes
    reps: int
    script_dir: Path = SCRIPTS
    # Extra flags for every agent the workloads start (`--metrics`, `--agent-arg`).
    agent_args: tuple[str, ...] = ()
    etcd_pid: int | None = None  # the etcd the run started, for its memory
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def log_dir(self) -> Path:
        path = self.workdir / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def layout(self, name: str) -> keys.Layout:
        """A key prefix no other measurement of this run uses (an empty etcd, as far as
        any Gleam process on that prefix can tell)."""
        return keys.Layout(f"/bench-{name}-{next(self._counter)}")


def count_keys(etcd: Any, prefix: str) -> int:
    return int(etcd.get_prefix_response(prefix, count_only=True).count)


def wait_registered(
    ctx: Context, layout: keys.Layout, daemons: list[Daemon], *, timeout: float
) -> None:
    """Wait until every agent's registration is in etcd (it is watching by then)."""
    deadline = time.monotonic() + timeout
    present = 0
    while True:
        # etcd too busy to answer in time: ask again until the deadline.
        with contextlib.suppress(pyetcd.exceptions.Etcd3Exception):
            present = count_keys(ctx.etcd, layout.info_prefix)
        if present >= len(daemons):
            return
        check_all(daemons)
        if time.monotonic() > deadline:
            raise BenchError(
                f"only {present}/{len(daemons)} agents registered within {timeout}s; "
                f"logs in {ctx.log_dir}"
            )
        time.sleep(0.1)


def warm_up_etcdctl(ctx: Context, lines: MarkerLines, key: str, *, count: int = 1) -> None:
    """Write to `key` until each of `count` `etcdctl watch` processes has run its command
    once: etcdctl prints nothing when its watch is in place, so this is how to know."""
    deadline = time.monotonic() + 60 + count
    while time.monotonic() < deadline:
        lines.drain()
        ctx.etcd.put(key, b"warm-up")
        try:
            for _ in range(count):
                lines.next_mark(timeout=2.0)
            return
        except BenchError:
            continue
    raise BenchError(f"not all {count} etcdctl watch processes ran their command")
