"""The worker: takes one job at a time from the queue, runs it through the Lua runner and
hands the result record to the writer. The only thread that calls the runner."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent import pending, results
from agent.task_queue import TaskQueue
from gleam import keys, logformat, messages, testhooks

log = logging.getLogger("agent.worker")


class Outcome(Protocol):
    """What `agent.lua_exec.Outcome` offers."""

    @property
    def ok(self) -> bool: ...
    @property
    def result(self) -> Any: ...
    @property
    def error(self) -> str | None: ...
    @property
    def duration_ms(self) -> float: ...


class Runner(Protocol):
    def run(self, name: str, data: messages.JSON) -> Outcome: ...


class ResultSink(Protocol):
    def submit(self, key: str, result: messages.Result) -> None: ...


def raw_name(value: bytes) -> str | None:
    """The "Name" of a message that failed to decode, when there is a string one, so that
    the failed result still says what was asked for."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("Name"), str):
        name: str = parsed["Name"][:256]
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
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tasks = tasks
        self._runner = runner
        self._sink = sink
        self._agent_id = agent_id
        self._layout = layout
        self._wall_clock = wall_clock
        self._clock = clock
        self.ran = 0
        # When the job in hand was taken (None: idle), for the watchdog (agent/observe.py).
        self.busy_since: float | None = None

    def run(self) -> None:
        """Run jobs until the queue is closed; the job in hand is always finished."""
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
                    self._sink.submit(self._layout.result_key(self._agent_id, target), record)
            finally:
                self.busy_since = None
                self._tasks.complete(job)
                self.ran += 1

    def execute(self, job: pending.Job) -> messages.Result:
        """Run one job; any failure, of the message or of the script, is a failed result."""
        started = self._wall_clock()
        t0 = self._clock()
        if job.skipped:
            log.info(
                "%s at revision %d replaces revision(s) %s, which were skipped",
                job.key,
                job.revision,
                ", ".join(map(str, job.skipped)),
            )
        try:
            task = messages.decode_task(job.value)
        except messages.MessageError as exc:
            log.error("%s at revision %d: bad task message: %s", job.key, job.revision, exc)
            return self._record(
                job, raw_name(job.value), False, None, f"bad task message: {exc}", started, t0
            )
        logformat.add_to_context(function=task.name)
        log.info("running %s from %s at revision %d", task.name, job.key, job.revision)
        try:
            outcome = self._runner.run(task.name, task.data)
        except Exception as exc:  # noqa: BLE001 - the runner promises not to raise; be sure
            log.exception("%s from %s: the runner failed", task.name, job.key)
            return self._record(
                job, task.name, False, None, f"internal error: {exc!r}", started, t0
            )
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

    def _record(
        self,
        job: pending.Job,
        name: str | None,
        ok: bool,
        result: messages.JSON,
        error: str | None,
        started: float,
        t0: float,
    ) -> messages.Result:
        return results.build_result(
            agent_id=self._agent_id,
            job=job,
            name=name,
            ok=ok,
            result=result,
            error=error,
            started=started,
            duration_ms=(self._clock() - t0) * 1000,
        )
