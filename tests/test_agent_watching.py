"""agent.watching.WatchLoop in-process against a real etcd: start-up read, delivery in
revision order, and a silently stalled watch noticed and restarted."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent import pending, store
from agent.task_queue import TaskQueue
from agent.watching import WatchLoop, next_resume
from gleam import connection, keys
from gleam.embedded import EtcdServer
from tests.support import wait_until


class DeafFirstWatch(store.Store):
    """A Store whose first watch is created and never delivers: a watch stuck silently
    (etcd and the connection are fine; nothing arrives)."""

    def __init__(self, settings: connection.Settings) -> None:
        super().__init__(settings)
        self.deaf_left = 1

    def watch(
        self,
        key: str,
        *,
        start_revision: int,
        generation: int,
        deliver: Callable[[store.WatchMessage], None],
    ) -> None:
        if self.deaf_left:
            self.deaf_left -= 1
            return
        super().watch(key, start_revision=start_revision, generation=generation, deliver=deliver)


@pytest.fixture
def run_loop() -> Iterator[Callable[..., tuple[WatchLoop, TaskQueue]]]:
    loops: list[tuple[WatchLoop, threading.Thread]] = []

    def start(
        etcd: store.Store, task_keys: list[str], check_interval: float
    ) -> tuple[WatchLoop, TaskQueue]:
        tasks = TaskQueue()
        loop = WatchLoop(
            etcd, tasks, task_keys=task_keys, read_done=lambda _etcd: {},
            check_interval=check_interval,
        )  # fmt: skip
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        loops.append((loop, thread))
        return loop, tasks

    yield start
    for loop, thread in loops:
        loop.stop()
        thread.join(10)
        assert not thread.is_alive()


def take(tasks: TaskQueue, timeout: float = 20.0) -> pending.Job:
    job = tasks.take(timeout=timeout)
    assert job is not None, "no job within the deadline"
    tasks.complete(job)
    return job


def test_reads_then_watches_and_delivers_in_revision_order(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, run_loop: Callable[..., Any]
) -> None:
    a, b = layout.node_key("n"), layout.region_key("r")
    before = int(etcd.put(a, b"old").header.revision)
    loop, tasks = run_loop(
        store.Store(connection.make_settings(etcd_server.endpoint)), [a, b], 30.0
    )
    job = take(tasks)
    assert (job.key, job.revision, job.value) == (a, before, b"old")
    assert loop.synced.wait(10)
    # Two keys written and both seen before the worker takes one: oldest revision first.
    first, second = (int(etcd.put(k, v).header.revision) for k, v in ((b, b"1"), (a, b"2")))
    # Each key has its own watch, so either may deliver first: wait for both.
    wait_until(
        lambda: (
            tasks.delivered(b, first, read_at=second) and tasks.delivered(a, second, read_at=second)
        ),
        what="both writes seen",
    )
    assert [(j.key, j.revision) for j in (take(tasks), take(tasks))] == [(b, first), (a, second)]
    # One key written twice before the worker takes it: only the newest runs.
    older, newest = (int(etcd.put(b, v).header.revision) for v in (b"3", b"4"))
    wait_until(lambda: tasks.delivered(b, newest, read_at=newest), what="both writes seen")
    job = take(tasks)
    assert (job.key, job.revision, job.value, job.skipped) == (b, newest, b"4", (older,))
    assert loop.restarts == 0


def test_a_silently_stalled_watch_is_noticed_and_restarted(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, run_loop: Callable[..., Any]
) -> None:
    key = layout.node_key("stuck")
    deaf = DeafFirstWatch(connection.make_settings(etcd_server.endpoint))
    loop, tasks = run_loop(deaf, [key], 0.3)
    assert loop.synced.wait(10)
    revision = int(etcd.put(key, b'{"Name":"x"}').header.revision)
    job = take(tasks)
    assert (job.key, job.revision) == (key, revision)
    assert deaf.deaf_left == 0 and loop.restarts >= 1


def test_a_healthy_watch_is_never_restarted_by_the_checks(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, run_loop: Callable[..., Any]
) -> None:
    key = layout.node_key("busy")
    loop, tasks = run_loop(store.Store(connection.make_settings(etcd_server.endpoint)), [key], 0.5)
    assert loop.synced.wait(10)
    # A change delivered within one check interval is never taken for a stall.
    for n in range(10):
        revision = int(etcd.put(key, str(n).encode()).header.revision)
        assert take(tasks).revision == revision
    checks = loop.checks
    wait_until(lambda: loop.checks >= checks + 3, what="three more checks")
    assert loop.checks >= 3 and loop.restarts == 0


def test_next_resume_follows_changes_and_progress_notifications() -> None:
    change = pending.Observed("/k", 7, b"v")
    assert next_resume(3, store.WatchBatch(1, "/k", (change,), 9)) == 8
    assert next_resume(3, store.WatchBatch(1, "/k", (), 9)) == 10
    assert next_resume(12, store.WatchBatch(1, "/k", (change,), 9)) == 12
