"""The watch loop: keep the task queue fed with every change to this agent's task keys,
whatever etcd does.

- Start-up: read this agent's result records (what it has already done), then read every
  watched key at one revision H and hand the values to the queue; then watch each key
  from H + 1, so nothing written in between is missed.
- A broken connection: reset the client (the next one tries every endpoint), wait a
  jittered backoff, and resume each key's watch from the last revision it delivered + 1.
- A compacted revision: re-read the keys and watch from the new read's revision + 1;
  whatever changed is queued (the queue drops what was already seen or done).
- A silent stall: every `check_interval` seconds the keys' current mod_revisions are read;
  a change the watch has still not delivered one interval later means the watch is stuck,
  and it is restarted from the last revision it delivered + 1.
- etcd going back in time (restored from a backup): the same check sees a revision older
  than one already seen; the queue forgets what it saw and did, and everything is read
  again from the restored etcd.

The loop never runs Lua: it only hands changes to the queue. Watch responses arrive on
pyetcd's thread and are passed here through an inbox, so all decisions happen on one
thread.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from agent import pending, store
from agent.backoff import Backoff
from agent.task_queue import TaskQueue
from gleam import testhooks

log = logging.getLogger("agent.watch")


# A change a read showed and the watch had not delivered: (mod_revision or None when the
# key was absent, the read's revision).
Suspect = tuple[int | None, int]


class Stalled(Exception):
    """The watch did not deliver changes that a read shows."""


class Rewound(Exception):
    """etcd's revision went backwards: what the agent remembers no longer applies."""


class WatchLoop:
    def __init__(
        self,
        etcd: store.Store,
        tasks: TaskQueue,
        *,
        task_keys: Sequence[str],
        read_done: Callable[[store.Store], Mapping[str, pending.Completed]],
        before_first_read: Callable[[], object] = lambda: None,
        check_interval: float = 10.0,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._etcd = etcd
        self._tasks = tasks
        self._keys = tuple(task_keys)
        self._read_done = read_done
        self._before_first_read = before_first_read
        self._check_interval = check_interval
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._stop = threading.Event()
        self._inbox: queue.Queue[store.WatchMessage | None] = queue.Queue()
        self._generation = 0
        # Set once the start-up read has been handed to the queue (tests and logs).
        self.synced = threading.Event()
        self.restarts = 0
        self.checks = 0
        # For the watchdog, /healthz and metrics (agent/observe.py): when the loop last
        # went round, when etcd last answered it, whether its watches are up, and why
        # they were restarted.
        self.alive_at = clock()
        self.answered_at: float | None = None
        self.connected = False
        self.restart_reasons: collections.Counter[str] = collections.Counter()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)

    def run(self) -> None:
        """The loop; returns when `stop()` is called."""
        done_loaded = False
        resume: dict[str, int] | None = None  # None: (re-)read every key first
        self._before_first_read()
        while not self._stop.is_set():
            self.alive_at = self._clock()
            try:
                if not done_loaded:
                    self._tasks.load_done(self._read_done(self._etcd))
                    done_loaded = True
                if resume is None:
                    resume = self._read_all()
                self._start_watches(resume)
                self.connected, self.answered_at = True, self._clock()
                if self._backoff.failures:
                    log.info("etcd is reachable again")
                self._backoff.reset()
                self._serve(resume)
            except store.Compacted as exc:
                log.warning("watch: %s; re-reading the task keys", exc)
                resume = None
                self._restart("compacted")
            except Stalled as exc:
                log.warning("watch: %s; restarting it", exc)
                self._restart("stalled")
            except Rewound as exc:
                log.warning("%s; forgetting what was seen and re-reading everything", exc)
                self._tasks.reset()
                done_loaded = False
                resume = None
                self._restart("rewound")
            except store.StoreError as exc:
                # One warning per outage; the retries that follow are debug lines.
                level = logging.DEBUG if self._backoff.failures else logging.WARNING
                delay = self._backoff.next_delay()
                log.log(level, "etcd: %s; reconnecting in %.1fs", exc, delay)
                self._restart("etcd")
                self._stop.wait(delay)
            except Exception:  # noqa: BLE001 - a bug here must not end the agent's watch
                delay = self._backoff.next_delay()
                log.exception("watch loop failed; restarting it in %.1fs", delay)
                resume = None
                self._restart("error")
                self._stop.wait(delay)
        self._etcd.reset()
        log.info("watch stopped")

    # Steps ------------------------------------------------------------------------
    def _read_all(self) -> dict[str, int]:
        snapshot = self._etcd.read_keys(self._keys)
        log.info("read %d task key(s) at revision %d", len(self._keys), snapshot.revision)
        self._tasks.observe(snapshot.keys)
        self.synced.set()
        return {key: snapshot.revision + 1 for key in self._keys}

    def _start_watches(self, resume: Mapping[str, int]) -> None:
        self._generation += 1
        for key in self._keys:
            self._etcd.watch(
                key,
                start_revision=resume[key],
                generation=self._generation,
                deliver=self._inbox.put,
            )
        log.info(
            "watching %s",
            ", ".join(f"{key} from revision {resume[key]}" for key in self._keys),
        )

    def _restart(self, reason: str) -> None:
        """Drop the client and its watches; responses of the old ones are ignored."""
        self.restarts += 1
        self.restart_reasons[reason] += 1
        self.connected = False
        self._generation += 1
        self._etcd.reset()

    def _serve(self, resume: dict[str, int]) -> None:
        """Hand watch responses to the queue until stop; raises when the watch breaks,
        is compacted or stalls."""
        next_check = self._clock() + self._check_interval
        suspects: dict[str, Suspect] = {}
        while not self._stop.is_set():
            self.alive_at = self._clock()
            testhooks.wedge_point("watch")
            try:
                message = self._inbox.get(timeout=max(0.0, next_check - self._clock()))
            except queue.Empty:
                message = None
            if message is not None:
                if message.generation != self._generation:
                    continue  # from a watch already replaced
                if isinstance(message, store.WatchBroken):
                    raise message.error
                self.answered_at = self._clock()
                self._tasks.observe(message.changes)
                resume[message.key] = next_resume(resume[message.key], message)
            if self._clock() >= next_check:
                suspects = self._check(suspects, resume)
                next_check = self._clock() + self._check_interval

    def _check(
        self, suspects: Mapping[str, Suspect], resume: Mapping[str, int]
    ) -> dict[str, Suspect]:
        """Compare a fresh read with what the watch delivered. Changes missing now are
        suspects; suspects from the previous check still missing mean a stall."""
        snapshot = self._etcd.read_keys(self._keys)
        self.checks += 1
        self.answered_at = self._clock()
        seen_up_to = max(resume.values(), default=1) - 1
        if snapshot.revision < seen_up_to:
            raise Rewound(
                f"etcd is at revision {snapshot.revision}, behind revision {seen_up_to} "
                "that this agent has seen (restored from a backup, or a new cluster?)"
            )
        overdue = [
            f"{key} at revision {revision if revision is not None else f'{read_at} (deleted)'}"
            for key, (revision, read_at) in suspects.items()
            if not self._tasks.delivered(key, revision, read_at=read_at)
        ]
        if overdue:
            raise Stalled(
                f"the watch has not delivered {', '.join(overdue)} within {self._check_interval:g}s"
            )
        missing = self._tasks.undelivered(snapshot.current(), read_at=snapshot.revision)
        return {key: (revision, snapshot.revision) for key, revision in missing.items()}


def next_resume(current: int, batch: store.WatchBatch) -> int:
    """The revision to resume a key's watch from after `batch`: past its last change, or
    past the header of a progress notification (which promises nothing older is due)."""
    if batch.changes:
        return max(current, max(c.revision for c in batch.changes) + 1)
    return max(current, batch.header_revision + 1)
