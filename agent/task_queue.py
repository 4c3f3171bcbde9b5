"""The hand-over between the watch loop (which observes changes) and the worker (which
runs one job at a time): agent.pending's rules behind a lock, with a log line per note."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

from agent import pending

log = logging.getLogger("agent.queue")


class TaskQueue:
    def __init__(self, state: pending.Pending | None = None) -> None:
        self._state = state or pending.Pending()
        self._cond = threading.Condition()
        self._closed = False

    def reset(self) -> None:
        """Forget everything seen, waiting and done (etcd went back in time); a job
        running now still completes into the fresh state."""
        with self._cond:
            running, gates = self._state.running, self._state.gates
            if gates is not None:
                gates.clear()
            self._state = pending.Pending(running=running, gates=gates)

    def load_done(self, done: Mapping[str, pending.Completed]) -> None:
        with self._cond:
            self._state.load_done(done)

    def observe(self, changes: Iterable[pending.Observed]) -> list[pending.Note]:
        with self._cond:
            notes = self._state.observe_all(changes)
            if any(isinstance(n, pending.Queued | pending.Superseded) for n in notes):
                self._cond.notify_all()
        for note in notes:
            _log_note(note)
        return notes

    def take(self, *, timeout: float | None = None) -> pending.Job | None:
        """Wait for the next job; None once closed (even if jobs wait: a stopping agent
        takes no new task) or after `timeout` seconds."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or (self._state.running is None and bool(self._state.waiting)),
                timeout=timeout,
            )
            return None if self._closed else self._state.take()

    def complete(self, job: pending.Job) -> None:
        with self._cond:
            self._state.complete(job)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop handing out jobs; a waiting `take` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def undelivered(
        self, current: Mapping[str, int | None], *, read_at: int
    ) -> dict[str, int | None]:
        with self._cond:
            return self._state.undelivered(current, read_at=read_at)

    def delivered(self, key: str, revision: int | None, *, read_at: int) -> bool:
        with self._cond:
            return self._state.delivered(key, revision, read_at=read_at)

    def waiting_count(self) -> int:
        with self._cond:
            return len(self._state.waiting)


def _log_note(note: pending.Note) -> None:
    match note:
        case pending.Queued(key, revision):
            log.info("queued %s at revision %d", key, revision)
        case pending.Superseded(key, revision, by):
            log.info(
                "skipping %s at revision %d: replaced by revision %d before it ran",
                key,
                revision,
                by,
            )
        case pending.Cancelled(key, revisions, by):
            log.info(
                "skipping %s at revision(s) %s: the key was deleted at revision %d before it ran",
                key,
                ", ".join(map(str, revisions)),
                by,
            )
        case pending.Held(key, revision):
            log.info("holding %s at revision %d until its rollout admits this agent", key, revision)
        case pending.Deleted(key, revision):
            log.debug("%s is deleted or absent at revision %d: nothing to run", key, revision)
        case pending.AlreadyDone(key, revision):
            log.info("%s at revision %d was already run by this agent", key, revision)
        case pending.Duplicate(key, revision):
            log.debug("ignoring %s at revision %d: already seen", key, revision)
