"""Large fleet: N agent processes (300 in the full run) on one region, connected to etcd
directly and then through `etcd grpc-proxy`; what they cost etcd and themselves."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.fanout import gleam_round
from bench.harness import Context, wait_registered
from bench.observe import ResultWatch
from bench.processes import BenchError, Daemon, rss_mib, start_agent, stop_all
from bench.report import Better, Goal, Row, Stat
from bench.stats import Series
from gleam import keys
from gleam.embedded import EtcdGrpcProxy

TITLE = "Large fleet (workload 6)"
METHOD = """
N agent subprocesses (300 in the full run; `--agents N` sets it) start on this machine,
all in one region, first connected to etcd directly, then (stopped and started again on
a fresh prefix) through one `etcd grpc-proxy start` in front of the same etcd. For each:
after a warm-up, each repetition writes one region task (`bench::noop`) and times the
write to the last of the N results arriving at the benchmark's watch (*all results*);
*result writes per second* is N divided by that time. etcd's own figures are read when
the fleet has registered and run the warm-up: its resident memory (VmRSS, against the
same etcd before any agent started), the client TCP connections established to its
port (`/proc/net/tcp`), and its watch streams and watchers (`etcd_debugging_mvcc_*` in
its `/metrics`). The proxied fleet runs after the direct one on the same etcd, whose
RSS does not shrink in between: its etcd RSS is an upper bound, while its connection and
watch counts are exact. Agents' memory as in the fan-out workload, each agent's processes
together (the agent and any child it keeps, such as a Lua process): VmRSS of the worst
agent and private memory (USS) per agent.
"""


@dataclass(frozen=True)
class EtcdLoad:
    rss_mib: float
    connections: int
    watch_streams: int
    watchers: int


def _established(port: int) -> int:
    """TCP connections established to 127.0.0.1:`port` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":
                count += 1
    return count


def _metric(text: str, name: str) -> int:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return int(float(found.group(1))) if found else -1


def etcd_load(ctx: Context) -> EtcdLoad:
    if ctx.etcd_pid is None:
        raise BenchError("this workload needs the etcd the benchmark started")
    with urllib.request.urlopen(f"{ctx.endpoint}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    port = int(ctx.endpoint.rsplit(":", 1)[1])
    return EtcdLoad(
        rss_mib=rss_mib(ctx.etcd_pid),
        connections=_established(port),
        watch_streams=_metric(metrics, "etcd_debugging_mvcc_watch_stream_total"),
        watchers=_metric(metrics, "etcd_debugging_mvcc_watcher_total"),
    )


@dataclass(frozen=True)
class Measured:
    all_results: Series  # ms, per repetition
    rss: Series  # MiB per agent, after the rounds
    uss: Series
    etcd: EtcdLoad
    proxy_rss: float | None


START_BATCH = 20


@contextmanager
def _fleet(ctx: Context, endpoint: str, name: str, count: int) -> Iterator[list[Daemon]]:
    layout = ctx.layout(name)
    agents: list[Daemon] = []
    try:
        # In batches, each registered before the next starts: hundreds of Python
        # processes starting at once on two cores starve etcd of CPU until connection
        # attempts time out, which a real fleet (one agent per host) never does.
        for i in range(count):
            agents.append(
                start_agent(
                    endpoint=endpoint,
                    prefix=layout.prefix,
                    agent_id=f"{name}-{i:04d}",
                    regions=("fleet",),
                    script_dir=ctx.script_dir,
                    log_dir=ctx.log_dir,
                    extra=ctx.agent_args,
                )
            )
            if len(agents) % START_BATCH == 0 or len(agents) == count:
                wait_registered(ctx, layout, agents, timeout=120 + 2 * START_BATCH)
        yield agents
    finally:
        stop_all(agents, timeout=60)


def _measure(ctx: Context, endpoint: str, name: str, proxy: EtcdGrpcProxy | None) -> Measured:
    count = ctx.sizes.fleet_agents
    with _fleet(ctx, endpoint, name, count) as agents:
        layout = _layout_of(agents[0])
        fleet = {a.argv[a.argv.index("-id") + 1]: a for a in agents}
        watch = ResultWatch(ctx.etcd, layout)
        try:
            gleam_round(ctx, watch, layout, fleet, "fleet", -1)  # warm-up: all watching
            load = etcd_load(ctx)
            times = [gleam_round(ctx, watch, layout, fleet, "fleet", r)[0] for r in range(ctx.reps)]
        finally:
            watch.close()
        return Measured(
            all_results=Series.of(times),
            # Each agent's process tree: the agent and its Lua executor count as one.
            rss=Series.of([a.rss_mib() for a in agents]),
            uss=Series.of([a.uss_mib() for a in agents]),
            etcd=load,
            proxy_rss=rss_mib(proxy.proc.pid) if proxy is not None and proxy.proc else None,
        )


def _layout_of(agent: Daemon) -> keys.Layout:
    return keys.Layout(agent.argv[agent.argv.index("-prefix") + 1])


def run(ctx: Context) -> list[Row]:
    count = ctx.sizes.fleet_agents
    idle = etcd_load(ctx)
    direct = _measure(ctx, ctx.endpoint, "fleet", None)
    proxy = EtcdGrpcProxy(ctx.endpoint, data_dir=str(ctx.dir("grpc-proxy")))
    try:
        proxy.start()
        proxy_idle = rss_mib(proxy.proc.pid) if proxy.proc else 0.0
        proxied = _measure(ctx, proxy.endpoint, "proxied", proxy)
    finally:
        proxy.close()
    rows = []
    for how, m in (("direct", direct), ("through grpc-proxy", proxied)):
        rate = Series.of(count * 1000 / ms for ms in m.all_results.values)
        rows += [
            Row("fleet", f"one region task → all {count} agents' results, {how}", "ms",
                m.all_results, goals=(Goal.at_most(1500),)),
            Row("fleet", f"result writes per second, {count} agents, {how}", "/s", rate,
                better=Better.HIGHER),
            Row("fleet", f"etcd RSS with {count} agents {how} (idle etcd: "
                f"{idle.rss_mib:.0f} MiB)", "MiB", Series.of([m.etcd.rss_mib])),
            Row("fleet", f"etcd client connections, {count} agents {how}", "connections",
                Series.of([m.etcd.connections]),
                note=f"{m.etcd.watch_streams} watch streams, {m.etcd.watchers} watchers "
                f"(idle etcd: {idle.connections} connection, {idle.watch_streams} "
                f"streams, {idle.watchers} watchers)"),
            Row("fleet", f"agent RSS after running tasks, {count} agents, {how}", "MiB",
                m.rss, per="agent", goals=(Goal.at_most(40, stat=Stat.MAX),)),
            Row("fleet", f"agent private memory (USS), {count} agents, {how}", "MiB",
                m.uss, per="agent"),
        ]  # fmt: skip
    if proxied.proxy_rss is not None:
        rows.append(
            Row("fleet", f"grpc-proxy RSS with {count} agents (idle proxy: "
                f"{proxy_idle:.0f} MiB)", "MiB", Series.of([proxied.proxy_rss]))
        )  # fmt: skip
    return rows
