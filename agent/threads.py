"""The running agent: four threads around one task queue, and the shutdown order.

    registration ── lease-bound <prefix>/info/<id>, kept alive
    watch ───────── task keys -> TaskQueue            (never runs Lua)
    worker ──────── TaskQueue -> Lua runner -> ResultWriter   (one job at a time)
    results ─────── result records -> etcd, retried through outages

Each loop owns its own Store (its own etcd client), so one loop's reconnect does not
disturb another. Each loop catches what it expects; a loop that ends anyway (an uncaught
exception, a bug) is logged with its traceback and reported through `on_thread_death`, so
that the agent exits and a service manager restarts it, instead of staying registered
with a dead watch or worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from agent import holding, inflight, observe, pending, results, store, trust
from agent.config import AgentConfig
from agent.registration import Registrar
from agent.task_queue import TaskQueue
from agent.watching import WatchLoop
from agent.worker import Runner, Worker
from gleam import connection, messages
from gleam.version import VERSION

log = logging.getLogger("agent")

# How long shutdown waits for the result writer once the last task finished.
RESULT_FLUSH_SECONDS = 5.0


def agent_info(
    config: AgentConfig, *, hostname: str, pid: int, started: float
) -> messages.AgentInfo:
    return messages.AgentInfo(
        id=config.agent_id,
        hostname=hostname,
        pid=pid,
        regions=list(config.regions),
        version=VERSION,
        started=messages.rfc3339(started),
        script_dir=str(config.script_dir),
    )


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        runner: Runner,
        *,
        connector: store.Connector = connection.connect,
        wall_clock: Callable[[], float] = time.time,
        started: inflight.StartedTasks | None = None,
        on_thread_death: Callable[[str], None] = lambda name: None,
        gate: trust.Gate | None = None,
    ) -> None:
        self.config = config
        self._on_thread_death = on_thread_death
        self._stopping = threading.Event()

        def new_store() -> store.Store:
            return store.Store(config.settings, connector=connector)

        # Staged region tasks wait for their rollout gate (agent.holding): the gate
        # records are watched beside the task keys.
        gates = holding.Gates(
            agent_id=config.agent_id, layout=config.layout, regions=config.regions
        )
        self.tasks = TaskQueue(pending.Pending(gates=gates))
        self.registrar = Registrar(
            new_store(),
            key=config.layout.info_key(config.agent_id),
            info=agent_info(
                config, hostname=socket.gethostname(), pid=os.getpid(), started=wall_clock()
            ),
            ttl=config.ttl,
            takeover=config.takeover,
        )
        self.watch = WatchLoop(
            new_store(),
            self.tasks,
            task_keys=(*config.task_keys, *gates.keys),
            read_done=lambda etcd: _seeded(
                gate, results.read_completions(etcd, layout=config.layout, agent_id=config.agent_id)
            ),
            # Register, then read: an agent that lists as registered has read its keys
            # or is about to. Bounded, so that a slow registration delays no task long.
            before_first_read=lambda: self.registrar.registered.wait(config.settings.timeout),
            check_interval=config.check_interval,
        )
        self.writer = results.ResultWriter(new_store())
        # Results pass a tap on their way to the writer: -metrics counts them there.
        self.results_tap = observe.ResultTap(self.writer)
        self.worker = Worker(
            self.tasks,
            runner,
            self.results_tap,
            agent_id=config.agent_id,
            layout=config.layout,
            started=started,
            gate=gate,
        )
        self._threads: dict[str, threading.Thread] = {}

    def start(self) -> None:
        """Register first, then read and watch the task keys; the worker and the writer
        wait for work."""
        for name, target in (
            ("registration", self.registrar.run),
            ("results", self.writer.run),
            ("worker", self.worker.run),
            ("watch", self.watch.run),
        ):
            thread = threading.Thread(
                target=supervised,
                args=(name, target),
                kwargs={"stopping": self._stopping, "on_death": self._on_thread_death},
                name=f"gleam-{name}",
                daemon=True,
            )
            self._threads[name] = thread
            thread.start()

    def dead_loops(self) -> tuple[str, ...]:
        """The loops whose thread has ended while the agent runs (for the watchdog)."""
        return tuple(name for name, t in self._threads.items() if not t.is_alive())

    def shutdown(self) -> bool:
        """Stop taking tasks, let the running one finish (bounded by the task timeout),
        write the results, revoke the lease. True if everything finished in time."""
        clean = True
        self._stopping.set()
        self.watch.stop()
        self.tasks.close()
        grace = self.config.task_timeout + 5.0
        if not self._join("worker", grace):
            log.error("the running task did not finish within %.0fs; exiting anyway", grace)
            clean = False
        self._join("watch", 5.0)
        if self.writer.close(timeout=RESULT_FLUSH_SECONDS):
            clean = False
        self._join("results", 2.0)
        self.registrar.stop()
        if not self._join("registration", self.config.settings.timeout + 2.0):
            clean = False
        return clean

    def _join(self, name: str, timeout: float) -> bool:
        thread = self._threads.get(name)
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()


def _seeded(
    gate: trust.Gate | None, done: Mapping[str, pending.Completed]
) -> Mapping[str, pending.Completed]:
    return done if gate is None else gate.seed(done)


def supervised(
    name: str,
    target: Callable[[], None],
    *,
    stopping: threading.Event,
    on_death: Callable[[str], None],
) -> None:
    """Run one of the agent's loops; if it ends before `stopping` is set (an exception, a
    bug), log it with its traceback and call `on_death(name)`."""
    try:
        target()
    except BaseException:
        log.critical("the %s thread failed", name, exc_info=True)
    if not stopping.is_set():
        log.critical("the %s thread stopped unexpectedly: the agent must exit", name)
        on_death(name)
