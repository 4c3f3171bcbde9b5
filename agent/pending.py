"""Which task runs next: the agent's queue of pending task values. Pure: no I/O, no clock,
no threads (agent.task_queue puts a lock around it).

The rules, from the agent's contract:
- one task at a time, oldest revision first;
- a key that changes again before its task ran keeps only its newest value; the revisions
  it replaced are remembered and reported in the result's `skipped`;
- a delete runs nothing (and cancels a value of that key still waiting);
- a value this agent has already completed (its result record's `revision` is at least
  the value's, or lists it in `skipped`) does not run again;
- the same change seen twice (a watch resumed from an older revision, a re-read after a
  compaction) is noticed and ignored;
- a staged region task (its message has `Rollout`) is held until its region's gate
  record admits this agent for its revision (agent.holding); gate records come through
  the same watch as task keys.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from agent import holding


@dataclass(frozen=True)
class Observed:
    """A task key's state at a revision, as a watch event or a read saw it.

    `value` None means the key was deleted (or is absent from a read made at `revision`)."""

    key: str
    revision: int
    value: bytes | None


@dataclass(frozen=True)
class Job:
    """One task value to run, and the older revisions of the same key it replaced."""

    key: str
    revision: int
    value: bytes
    skipped: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completed:
    """What this agent has done for a key: the revision it ran last and those it skipped."""

    revision: int
    skipped: frozenset[int] = frozenset()

    def covers(self, revision: int) -> bool:
        return revision <= self.revision or revision in self.skipped


# What happened to an observation; the daemon logs these. ---------------------------------


@dataclass(frozen=True)
class _KeyAt:
    """A note about one value of one key (subclasses inherit the dataclass methods;
    equality also compares the class)."""

    key: str
    revision: int


class Queued(_KeyAt):
    """The value waits to run."""


@dataclass(frozen=True)
class Superseded(_KeyAt):
    """A waiting value was replaced by a newer one of the same key before it ran."""

    by: int


@dataclass(frozen=True)
class Cancelled:
    """A waiting value (and those it had replaced) was deleted before it ran."""

    key: str
    revisions: tuple[int, ...]
    by: int


class AlreadyDone(_KeyAt):
    """This revision is covered by a result already recorded."""


class Deleted(_KeyAt):
    """The key was deleted while nothing of it waited."""


class Duplicate(_KeyAt):
    """A change older than (or the same as) one already seen for that key."""


@dataclass(frozen=True)
class Held:
    """A staged task waiting for its rollout gate to admit this agent."""

    key: str
    revision: int


Note = Queued | Superseded | Cancelled | AlreadyDone | Deleted | Duplicate | Held


@dataclass(frozen=True)
class KeyState:
    """The newest state of a key that reached the queue."""

    revision: int
    present: bool


@dataclass
class Pending:
    """The pending values, what has been seen and what has been done."""

    done: dict[str, Completed] = field(default_factory=dict)
    seen: dict[str, KeyState] = field(default_factory=dict)
    waiting: dict[str, Job] = field(default_factory=dict)
    running: Job | None = None
    # (revision, key) of every job put in `waiting`, a heap: `take` finds the oldest in
    # O(log n) rather than scanning thousands of waiting keys for every job. Entries whose
    # job has since been replaced or cancelled are skipped when they come up.
    _order: list[tuple[int, str]] = field(default_factory=list, repr=False)
    # Rollout holds: None for an agent that watches no gate records (tests, old callers).
    gates: holding.Gates | None = None
    held: dict[str, Job] = field(default_factory=dict)

    def load_done(self, done: Mapping[str, Completed]) -> None:
        """Merge completions read from this agent's result records."""
        for key, completed in done.items():
            self.done[key] = merge_completed(self.done.get(key), completed)

    def observe(self, observed: Observed) -> list[Note]:
        """Take one observed change; return what became of it."""
        key, revision = observed.key, observed.revision
        before = self.seen.get(key)
        if before is not None and revision <= before.revision:
            return [Duplicate(key, revision)]
        self.seen[key] = KeyState(revision, observed.value is not None)
        if self.gates is not None and self.gates.is_gate(key):
            return self._release(self.gates.observe(key, observed.value))
        if observed.value is not None and (done := self.done.get(key)) and done.covers(revision):
            return [AlreadyDone(key, revision)]
        waiting = self.waiting.pop(key, None) or self.held.pop(key, None)
        if observed.value is None:
            if waiting is None:
                return [Deleted(key, revision)]
            return [Cancelled(key, (*waiting.skipped, waiting.revision), by=revision)]
        skipped = () if waiting is None else (*waiting.skipped, waiting.revision)
        job = Job(key, revision, observed.value, skipped=skipped)
        if self.gates is not None and self.gates.holds(key, revision, observed.value):
            self.held[key] = job
            return [Held(key, revision)]
        self.waiting[key] = job
        heapq.heappush(self._order, (revision, key))
        if waiting is None:
            return [Queued(key, revision)]
        return [Superseded(key, waiting.revision, by=revision)]

    def _release(self, task_key: str | None) -> list[Note]:
        """A gate record changed: its task, if held and now admitted, is queued."""
        job = self.held.get(task_key) if task_key is not None else None
        if job is None or self.gates is None:
            return []
        if self.gates.holds(job.key, job.revision, job.value):
            return []
        del self.held[job.key]
        self.waiting[job.key] = job
        heapq.heappush(self._order, (job.revision, job.key))
        return [Queued(job.key, job.revision)]

    def observe_all(self, changes: Iterable[Observed]) -> list[Note]:
        """Observe several changes in revision order (a read's keys come in any order)."""
        notes: list[Note] = []
        for change in sorted(changes, key=lambda c: c.revision):
            notes.extend(self.observe(change))
        return notes

    def take(self) -> Job | None:
        """The waiting job with the oldest revision, now running; None if nothing waits
        or a job is still running (one at a time)."""
        if self.running is not None or not self.waiting:
            return None
        if len(self._order) > 4 * len(self.waiting) + 64:
            self._reorder()  # mostly stale entries (keys replaced over and over)
        while True:
            if not self._order:
                self._reorder()  # `waiting` was filled some other way
            revision, key = heapq.heappop(self._order)
            job = self.waiting.get(key)
            if job is not None and job.revision == revision:
                break
        del self.waiting[job.key]
        self.running = job
        return job

    def _reorder(self) -> None:
        self._order = [(j.revision, j.key) for j in self.waiting.values()]
        heapq.heapify(self._order)

    def complete(self, job: Job) -> None:
        """The running job finished (whatever its outcome): it counts as done."""
        if self.running is not None and self.running.key == job.key:
            self.running = None
        self.done[job.key] = merge_completed(
            self.done.get(job.key), Completed(job.revision, frozenset(job.skipped))
        )

    def undelivered(
        self, current: Mapping[str, int | None], *, read_at: int
    ) -> dict[str, int | None]:
        """Keys whose state in a read made at revision `read_at` (`current`: key ->
        mod_revision, None when absent) is newer than anything that reached the queue:
        changes a watch has not delivered (yet)."""
        missing: dict[str, int | None] = {}
        for key, revision in current.items():
            if not self.delivered(key, revision, read_at=read_at):
                missing[key] = revision
        return missing

    def delivered(self, key: str, revision: int | None, *, read_at: int) -> bool:
        """Has the queue seen `key` at `revision` or later? For a key absent from the
        read (`revision` None): has it seen the key deleted, or changed after the read?"""
        state = self.seen.get(key)
        if revision is None:
            return state is None or not state.present or state.revision > read_at
        return state is not None and state.revision >= revision


def merge_completed(old: Completed | None, new: Completed) -> Completed:
    if old is None:
        return new
    if new.revision >= old.revision:
        return Completed(new.revision, new.skipped | old.skipped)
    return Completed(old.revision, old.skipped | new.skipped)
