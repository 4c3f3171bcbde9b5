"""The worker: takes one job at a time from the queue, runs it through the Lua runner and
hands the result record to the writer. The only thread that calls the runner.

Nothing a task holds may stop this thread: every failure, of the message, the runner or
this code, becomes a failed result. Before a job runs it is recorded as started
(agent.inflight), so that a job that crashes the whole agent is not run a third time."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from agent import inflight, lua_api, pending, results, trust
from agent.task_queue import TaskQueue
from gleam import keys, logformat, messages, testhooks

log = logging.getLogger("agent.worker")

# While more jobs wait, results go to the writer in groups of at most this many, held
# at most this long (see Worker.run).
RESULT_GROUP = 128
RESULT_GROUP_SECONDS = 0.02


class Runner(Protocol):
    def run(self, name: str, data: messages.JSON) -> lua_api.RunOutcome: ...


class ResultSink(Protocol):
    def submit(self, key: str, result: messages.Result) -> None: ...


def raw_name(value: bytes) -> str | None:
    """The "Name" of a message that failed to decode, when there is a string one, so that
    the failed result still says what was asked for."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError, MemoryError):
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("Name"), str):
        # A lone surrogate ("\ud800") is not text and would make the failed result
        # itself impossible to encode: it is kept escaped.
        name: str = parsed["Name"][:256].encode("utf-8", "backslashreplace").decode("utf-8")
        return name
    return None


class Worker:
    def __init__(
        self,
        tasks: TaskQueue,
        runner: Runner,
        sink: ResultSink,
        *,
        agent_id: str,
        layout: keys.Layout,
        started: inflight.StartedTasks | None = None,
        gate: trust.Gate | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tasks = tasks
        self._started = started if started is not None else inflight.StartedTasks()
        self._runner = runner
        self._sink = sink
        self._agent_id = agent_id
        self._gate = gate
        self._layout = layout
        self._wall_clock = wall_clock
        self._clock = clock
        self.ran = 0
        # When the job in hand was taken (None: idle), for the watchdog (agent/observe.py).
        self.busy_since: float | None = None

    def run(self) -> None:
        """Run jobs until the queue is closed; the job in hand is always finished.

        While more jobs wait, results are handed to the writer in groups (at most
        RESULT_GROUP, or RESULT_GROUP_SECONDS old): each task now waits on the executor
        process, and a writer woken for every single result writes one transaction per
        task, which costs more than the task. A lone task's result goes at once."""
        held: list[tuple[str, messages.Result]] = []
        held_since = 0.0
        try:
            while True:
                job = self._tasks.take()
                if job is None:
                    log.info("worker stopped")
                    return
                self.busy_since = self._clock()
                try:
                    testhooks.wedge_point("worker")
                    # Every line logged while the job runs (the script's too) names it.
                    with logformat.context(key=job.key, revision=job.revision):
                        record = self.execute(job)
                    target = self._layout.parse_task_key(job.key)
                    if target is not None:
                        if not held:
                            held_since = self._clock()
                        held.append((self._layout.result_key(self._agent_id, target), record))
                except Exception:  # noqa: BLE001 - the next job must still run
                    log.exception("%s at revision %d: its result was lost", job.key, job.revision)
                finally:
                    self.busy_since = None
                    self._tasks.complete(job)
                    self.ran += 1
                if held and (
                    len(held) >= RESULT_GROUP
                    or self._clock() - held_since >= RESULT_GROUP_SECONDS
                    or not self._tasks.waiting_count()
                ):
                    self._hand_over(held)
        finally:
            self._hand_over(held)

    def _hand_over(self, held: list[tuple[str, messages.Result]]) -> None:
        for key, record in held:
            try:
                self._sink.submit(key, record)
            except Exception:  # noqa: BLE001 - the other results must still go
                log.exception("the result %s was lost", key)
        held.clear()

    def execute(self, job: pending.Job) -> messages.Result:
        """Run one job; any failure, of the message, the script or the runner, is a failed
        result."""
        started = self._wall_clock()
        t0 = self._clock()
        runs = self._started.begin(job.key, job.revision)
        try:
            if runs > inflight.MAX_RUNS:
                log.error(
                    "%s at revision %d was interrupted twice by the agent stopping: not "
                    "running it again",
                    job.key,
                    job.revision,
                )
                error = inflight.INTERRUPTED_TWICE
                return self._failed(job, raw_name(job.value), error, started, t0)
            return self._execute(job, started, t0)
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill the worker
            log.exception("%s at revision %d: running it failed", job.key, job.revision)
            error = f"internal error: {exc!r}"
            return self._failed(job, raw_name(job.value), error, started, t0)
        finally:
            self._started.end(job.key)

    def _execute(self, job: pending.Job, started: float, t0: float) -> messages.Result:
        if job.skipped:
            log.info(
                "%s at revision %d replaces revision(s) %s, which were skipped",
                job.key,
                job.revision,
                ", ".join(map(str, job.skipped)),
            )
        try:
            task, message = messages.decode_task_message(job.value)
        except Exception as exc:  # noqa: BLE001 - MessageError, or any value the decoder chokes on
            log.error("%s at revision %d: bad task message: %s", job.key, job.revision, exc)
            return self._failed(job, raw_name(job.value), f"bad task message: {exc}", started, t0)
        logformat.add_to_context(function=task.name)
        if self._gate is not None and (refusal := self._gate.refusal(job, message)) is not None:
            log.error("%s at revision %d not run: %s", job.key, job.revision, refusal)
            return self._failed(job, task.name, refusal, started, t0)
        log.info("running %s from %s at revision %d", task.name, job.key, job.revision)
        try:
            outcome = self._runner.run(task.name, task.data)
        except Exception as exc:  # noqa: BLE001 - the runner promises not to raise; be sure
            log.exception("%s from %s: the runner failed", task.name, job.key)
            return self._failed(job, task.name, f"internal error: {exc!r}", started, t0)
        if outcome.ok:
            log.info(
                "%s from %s at revision %d succeeded in %.0f ms",
                task.name,
                job.key,
                job.revision,
                outcome.duration_ms,
                extra={"duration_ms": outcome.duration_ms},
            )
        else:
            log.warning(
                "%s from %s at revision %d failed: %s",
                task.name,
                job.key,
                job.revision,
                outcome.error,
                extra={"duration_ms": outcome.duration_ms},
            )
        return results.build_result(
            agent_id=self._agent_id,
            job=job,
            name=task.name,
            ok=bool(outcome.ok),
            result=outcome.result,
            error=outcome.error,
            started=started,
            duration_ms=float(outcome.duration_ms),
        )

    def _failed(
        self, job: pending.Job, name: str | None, error: str, started: float, t0: float
    ) -> messages.Result:
        """The record of a task that failed before (or around) its run: no result."""
        took = (self._clock() - t0) * 1000
        return results.build_result(
            agent_id=self._agent_id,
            job=job,
            name=name,
            ok=False,
            result=None,
            error=error,
            started=started,
            duration_ms=took,
        )
