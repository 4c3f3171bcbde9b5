"""The worker and the agent's threads never die quietly: a value the decoder chokes on, a
runner or sink that raises, a task interrupted twice, a loop that ends by surprise."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import inflight, pending, threads
from agent.task_queue import TaskQueue
from agent.worker import Worker
from gleam import keys, messages
from tests.support import wait_until
from tests.test_agent_results import FakeOutcome, FakeRunner, Sink

LAYOUT = keys.Layout("/g")
KEY = LAYOUT.node_key("web-1")
OK = FakeOutcome(True, "fine", None, 1.0)


def make_worker(
    runner: Any, *, sink: Any = None, started: inflight.StartedTasks | None = None
) -> tuple[Worker, TaskQueue]:
    tasks = TaskQueue()
    worker = Worker(tasks, runner, sink or Sink(), agent_id="web-1", layout=LAYOUT, started=started)
    return worker, tasks


def test_a_5000_digit_integer_is_a_bad_message_not_a_dead_worker() -> None:
    worker, _ = make_worker(FakeRunner(OK))
    record = worker.execute(pending.Job(KEY, 3, b'{"Name": "echo", "Data": ' + b"7" * 5000 + b"}"))
    assert not record.ok and record.error and record.error.startswith("bad task message")
    assert record.name in ("echo", None)


def test_a_lone_surrogate_name_gives_a_result_that_can_be_written() -> None:
    worker, _ = make_worker(FakeRunner(OK))
    record = worker.execute(pending.Job(KEY, 4, b'{"Name": "\\ud800", "Data": 1}'))
    assert not record.ok and record.name == "\\ud800"
    messages.decode_result(record.encode())


class BrokenSink:
    def __init__(self) -> None:
        self.calls = 0

    def submit(self, key: str, result: messages.Result) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("lost")


def test_the_worker_survives_a_sink_that_raises_and_runs_the_next_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = BrokenSink()
    worker, tasks = make_worker(FakeRunner(OK), sink=sink)
    thread = threading.Thread(target=worker.run)
    thread.start()
    for revision in (1, 2):
        tasks.observe([pending.Observed(f"{KEY}{revision}", revision, b'{"Name": "t"}')])
    tasks.observe([pending.Observed(KEY, 3, b'{"Name": "t"}')])
    wait_until(lambda: worker.ran == 3, what="three jobs run")
    tasks.close()
    thread.join(10)
    assert worker.ran == 3 and sink.calls >= 1
    assert "was lost" in caplog.text


def test_a_task_started_twice_already_is_refused_and_forgotten(tmp_path: Path) -> None:
    started = inflight.StartedTasks(tmp_path / "s.state")
    for _ in range(inflight.MAX_RUNS):
        started.begin(KEY, 9)  # two starts the agent never finished
    runner = FakeRunner(OK)
    worker, _ = make_worker(runner, started=started)
    record = worker.execute(pending.Job(KEY, 9, b'{"Name": "dangerous"}'))
    assert (record.ok, record.name, record.error) == (
        False,
        "dangerous",
        inflight.INTERRUPTED_TWICE,
    )
    assert runner.calls == []
    assert inflight.StartedTasks(tmp_path / "s.state").records == {}
    # A newer value of the key runs normally.
    assert worker.execute(pending.Job(KEY, 10, b'{"Name": "dangerous"}')).ok


def test_a_task_is_recorded_while_it_runs_and_forgotten_after(tmp_path: Path) -> None:
    path = tmp_path / "s.state"
    seen: list[dict[str, inflight.Started]] = []

    class Peek:
        def run(self, name: str, data: messages.JSON) -> FakeOutcome:
            seen.append(inflight.StartedTasks(path).records)
            raise RuntimeError("the runner broke")

    worker, _ = make_worker(Peek(), started=inflight.StartedTasks(path))
    record = worker.execute(pending.Job(KEY, 4, b'{"Name": "t"}'))
    assert not record.ok and record.error and "the runner broke" in record.error
    assert seen == [{KEY: inflight.Started(KEY, 4, 1)}]
    assert inflight.StartedTasks(path).records == {}


class Boom(BaseException):
    """Not an Exception: nothing on the way catches it."""


def test_a_loop_that_dies_is_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    deaths: list[str] = []

    def loop() -> None:
        raise Boom("bug")

    threads.supervised("worker", loop, stopping=threading.Event(), on_death=deaths.append)
    assert deaths == ["worker"]
    assert "the worker thread failed" in caplog.text and "Boom: bug" in caplog.text


def test_a_loop_ending_during_shutdown_is_not_a_death(caplog: pytest.LogCaptureFixture) -> None:
    deaths: list[str] = []
    stopping = threading.Event()
    stopping.set()
    caplog.set_level(logging.INFO)
    threads.supervised("watch", lambda: None, stopping=stopping, on_death=deaths.append)
    assert deaths == []


class CountingSink(Sink):
    """Records when each result was handed over: after how many jobs had run."""

    def __init__(self, worker: list[Worker]) -> None:
        super().__init__()
        self.worker = worker
        self.handed_at: list[int] = []

    def submit(self, key: str, result: messages.Result) -> None:
        super().submit(key, result)
        self.handed_at.append(self.worker[0].ran)


def test_results_of_a_burst_go_over_in_groups_and_a_lone_one_at_once() -> None:
    box: list[Worker] = []
    sink = CountingSink(box)
    worker, tasks = make_worker(FakeRunner(OK), sink=sink)
    box.append(worker)
    burst = [
        pending.Observed(LAYOUT.region_key(f"r{n}"), n + 1, b'{"Name": "t"}') for n in range(5)
    ]
    tasks.observe(burst)
    thread = threading.Thread(target=worker.run)
    thread.start()
    wait_until(lambda: len(sink.records) == 5, what="the burst's results")
    assert sink.handed_at == [5] * 5, "held while more jobs waited"
    tasks.observe([pending.Observed(KEY, 10, b'{"Name": "t"}')])
    wait_until(lambda: len(sink.records) == 6, what="the lone result")
    assert sink.handed_at[-1] == 6
    tasks.close()
    thread.join(10)
