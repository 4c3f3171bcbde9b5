"""The running agent as operations see it: systemd readiness and watchdog, /healthz, and
Prometheus metrics (only with -metrics).

Everything here reads state the agent's loops keep anyway (the watch loop's timestamps
and restart reasons, the worker's current task, the queue, the result writer), plus one
tap on the results the worker hands to the writer (`ResultTap`). The rules (is the agent
healthy, which loop is wedged, what STATUS= says) are pure functions of a `View`.

    READY=1     registered and watching
    WATCHDOG=1  every loop thread alive, the watch loop went round within its limit, and
                the worker is idle or within -task_timeout + WORKER_GRACE of its task
    /healthz    200 while registered and etcd answered the watch within the check
                interval; 503 with the reason otherwise
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agent.backoff import Backoff
from agent.config import AgentConfig
from gleam import liveness, messages, metrics
from gleam.liveness import Health
from gleam.version import VERSION

if TYPE_CHECKING:
    from agent.threads import Agent

log = logging.getLogger("agent.observe")

# A task may run -task_timeout seconds; the Lua limit, then the kill of what it started,
# need a moment more. Past this the worker is taken to be wedged.
WORKER_GRACE = 10.0
# Beyond the check interval, what one round of the watch loop may take: etcd calls (each
# bounded by the client timeout) and a reconnect backoff.
WATCH_SLACK = 5.0

# The watch loop's restart reasons (a fixed set: label values must not grow).
RESTART_REASONS = ("compacted", "stalled", "rewound", "etcd", "error")


class ResultSink(Protocol):
    def submit(self, key: str, result: messages.Result) -> None: ...


class ResultTap:
    """Between the worker and the result writer: passes every result on, and tells
    `on_result` (set by -metrics) about it first."""

    def __init__(self, sink: ResultSink) -> None:
        self._sink = sink
        self.on_result: Callable[[messages.Result], None] | None = None

    def submit(self, key: str, result: messages.Result) -> None:
        if self.on_result is not None:
            self.on_result(result)
        self._sink.submit(key, result)


@dataclass(frozen=True)
class Limits:
    check_interval: float
    watch: float  # seconds the watch loop may go without going round
    worker: float  # seconds one task may hold the worker


def limits(config: AgentConfig) -> Limits:
    return Limits(
        check_interval=config.check_interval,
        watch=config.check_interval + 2 * config.settings.timeout + Backoff().cap + WATCH_SLACK,
        worker=config.task_timeout + WORKER_GRACE,
    )


@dataclass(frozen=True)
class View:
    """The agent's state at one moment; ages in seconds, None for never / idle."""

    agent_id: str
    keys: int
    registered: bool
    connected: bool
    answered_age: float | None  # since etcd last answered the watch loop
    watch_age: float  # since the watch loop last went round
    busy_for: float | None  # how long the worker has been on its task
    dead: tuple[str, ...]  # loop threads that have ended
    queued: int
    ran: int


def stalled(view: View, lim: Limits) -> tuple[str, ...]:
    """The loops that are wedged (or gone): while any is, no watchdog ping."""
    out = [f"{name} loop (thread ended)" for name in view.dead]
    if view.watch_age > lim.watch:
        out.append(f"watch loop (no round for {view.watch_age:.0f}s)")
    if view.busy_for is not None and view.busy_for > lim.worker:
        out.append(f"worker (on one task for {view.busy_for:.0f}s)")
    return tuple(out)


def health(view: View, lim: Limits) -> Health:
    wedged = stalled(view, lim)
    if wedged:
        return Health.bad(f"stalled: {', '.join(wedged)}")
    if not view.registered:
        return Health.bad("not registered in etcd")
    if not view.connected:
        return Health.bad("the watch is not connected to etcd")
    if view.answered_age is None or view.answered_age > lim.check_interval + WATCH_SLACK:
        return Health.bad(f"etcd has not answered the watch for over {lim.check_interval:g}s")
    return Health.good(f"ok: registered as {view.agent_id}, watching {view.keys} key(s)")


def verdict(view: View, lim: Limits, *, stopping: bool = False) -> liveness.Verdict:
    wedged = stalled(view, lim)
    ready = view.registered and view.connected
    if stopping:
        return liveness.Verdict(ready, wedged, "stopping: finishing the running task", True)
    if wedged:
        status = f"stalled: {', '.join(wedged)}"
    elif not view.registered:
        status = "registering in etcd"
    elif not view.connected:
        status = "etcd unreachable; reconnecting the watch"
    else:
        status = f"watching {view.keys} key(s); {view.ran} task(s) run, {view.queued} queued"
    return liveness.Verdict(ready=ready, stalled=wedged, status=status)


class Observer:
    """Reads the agent; runs the systemd pinger and, with -metrics, the HTTP listener."""

    def __init__(
        self,
        agent: Agent,
        *,
        runner: object,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.agent = agent
        self.limits = limits(agent.config)
        self._runner = runner
        self._clock = clock
        self.watched = liveness.Watched(self.verdict, environ=environ)
        self._stopping = False

    def view(self) -> View:
        agent, now = self.agent, self._clock()
        answered = agent.watch.answered_at
        busy = agent.worker.busy_since
        return View(
            agent_id=agent.config.agent_id,
            keys=len(agent.config.task_keys),
            registered=agent.registrar.registered.is_set(),
            connected=agent.watch.connected,
            answered_age=None if answered is None else now - answered,
            watch_age=now - agent.watch.alive_at,
            busy_for=None if busy is None else now - busy,
            dead=agent.dead_loops(),
            queued=agent.tasks.waiting_count(),
            ran=agent.worker.ran,
        )

    def verdict(self) -> liveness.Verdict:
        return verdict(self.view(), self.limits, stopping=self._stopping)

    def health(self) -> Health:
        return health(self.view(), self.limits)

    def start(self, address: tuple[str, int] | None) -> None:
        """Start the pinger (under systemd) and the listener (with -metrics). Raises
        metrics.ListenError when the address cannot be listened on."""
        self.watched.start(
            address, health=self.health, register=lambda registry: AgentMetrics(self, registry)
        )

    def executor_restarts(self) -> int:
        # The Lua executor's restarts, when the runner counts them (`restarts`).
        return int(getattr(self._runner, "restarts", 0))

    def stopping(self) -> None:
        """Shutdown begins: STOPPING=1 now; the pings go on until `close`."""
        self._stopping = True
        self.watched.pinger.tick()

    def close(self) -> None:
        self.watched.stop()


class AgentMetrics:
    """gleam_agent_* metrics: counted at each result (the tap), the rest read from the
    agent when Prometheus scrapes."""

    def __init__(self, observer: Observer, registry: Any) -> None:
        prom = metrics.load()
        self._observer = observer
        self.tasks = prom.Counter(
            "gleam_agent_tasks",
            "Tasks run, by outcome (failed: any failure: message, script, limit)",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("ok", "failed"):
            self.tasks.labels(outcome)
        self.duration = prom.Histogram(
            "gleam_agent_task_duration_seconds",
            "How long tasks ran",
            buckets=metrics.DURATION_BUCKETS,
            registry=registry,
        )
        self.last_task = prom.Gauge(
            "gleam_agent_last_task_timestamp_seconds",
            "When the last task finished (Unix time; 0: none yet)",
            registry=registry,
        )
        prom.Info("gleam_agent", "The agent's version", registry=registry).info(
            {"version": VERSION}
        )
        registry.register(self)
        observer.agent.results_tap.on_result = self.on_result

    def on_result(self, result: messages.Result) -> None:
        self.tasks.labels("ok" if result.ok else "failed").inc()
        self.duration.observe(max(0.0, result.duration_ms / 1000))
        self.last_task.set_to_current_time()

    def describe(self) -> list[Any]:
        return []  # nothing to check at registration; the names are fixed below

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        observer = self._observer
        agent, view = observer.agent, observer.view()
        yield GaugeMetricFamily(
            "gleam_agent_tasks_queued", "Tasks waiting to run", value=view.queued
        )
        # gleam_agent_tasks_held (tasks held back by a rollout) comes with rollouts.
        yield GaugeMetricFamily(
            "gleam_agent_etcd_connected",
            "1 while the watch is connected to etcd",
            value=int(view.connected),
        )
        yield GaugeMetricFamily(
            "gleam_agent_registered", "1 while registered in etcd", value=int(view.registered)
        )
        yield GaugeMetricFamily(
            "gleam_agent_results_unwritten",
            "Result records not yet written to etcd",
            value=len(agent.writer.pending()),
        )
        restarts = CounterMetricFamily(
            "gleam_agent_watch_restarts", "Watch restarts, by reason", labels=["reason"]
        )
        counts = dict(agent.watch.restart_reasons)
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], counts.get(reason, 0))
        yield restarts
        yield CounterMetricFamily(
            "gleam_agent_lua_executor_restarts",
            "Restarts of the Lua executor (after a crash or a kill)",
            value=observer.executor_restarts(),
        )
