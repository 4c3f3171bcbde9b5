"""Result records: building them (pure) and writing them to etcd (a retrying writer).

A record lives at `<prefix>/result/<agent>/<node|region>/<name>`, holds the outcome of the
last task the agent ran from that key, and is not bound to a lease: results outlive the
agent, and at start-up they tell it which task revisions it has already done.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent import pending, store
from agent.backoff import Backoff
from gleam import connection, keys, messages

log = logging.getLogger("agent.results")

# Error texts are cut here: a Lua error can carry a huge string, and the record must fit.
MAX_ERROR_CHARS = 8 * 1024


def clip_error(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_ERROR_CHARS:
        return text
    return text[:MAX_ERROR_CHARS] + f"... ({len(text) - MAX_ERROR_CHARS} more characters)"


def build_result(
    *,
    agent_id: str,
    job: pending.Job,
    name: str | None,
    ok: bool,
    result: messages.JSON,
    error: str | None,
    started: float,
    duration_ms: float,
) -> messages.Result:
    """The record for one run. A result too large for etcd is replaced by an error, so
    that every run leaves a record."""
    record = messages.Result(
        agent=agent_id,
        key=job.key,
        revision=job.revision,
        name=name,
        ok=ok,
        result=result,
        error=clip_error(error),
        started=messages.rfc3339(started),
        duration_ms=round(duration_ms, 3),
        skipped=sorted(job.skipped),
    )
    try:
        size = len(record.encode())
    except (TypeError, ValueError) as exc:  # not JSON-serialisable (a runner bug)
        return _replace_result(record, f"the result could not be encoded as JSON: {exc}")
    if size > messages.MAX_MESSAGE_BYTES:
        return _replace_result(
            record,
            f"the result is {size} bytes, over the {messages.MAX_MESSAGE_BYTES}-byte limit",
        )
    return record


def _replace_result(record: messages.Result, why: str) -> messages.Result:
    return messages.Result(
        agent=record.agent,
        key=record.key,
        revision=record.revision,
        name=record.name,
        ok=False,
        result=None,
        error=why,
        started=record.started,
        duration_ms=record.duration_ms,
        skipped=record.skipped,
    )


def completions(
    records: Mapping[str, bytes], *, layout: keys.Layout, agent_id: str
) -> dict[str, pending.Completed]:
    """Task key -> what this agent has completed there, from its result records.
    A record that cannot be decoded counts as nothing done (the task runs again)."""
    done: dict[str, pending.Completed] = {}
    for key, raw in records.items():
        parsed = layout.parse_result_key(key)
        if parsed is None or parsed[0] != agent_id:
            continue
        try:
            record = messages.decode_result(raw)
        except messages.MessageError:
            continue
        done[layout.task_key(parsed[1])] = pending.Completed(
            record.revision, frozenset(record.skipped)
        )
    return done


def read_completions(
    etcd: store.Store, *, layout: keys.Layout, agent_id: str
) -> dict[str, pending.Completed]:
    return completions(
        etcd.read_prefix(layout.agent_results_prefix(agent_id)), layout=layout, agent_id=agent_id
    )


# A batch stays well under etcd's request limit (1.5 MiB by default) and its operation
# limit; a single result may be up to messages.MAX_MESSAGE_BYTES on its own.
BATCH_MAX_RESULTS = connection.MAX_TXN_OPS
BATCH_MAX_BYTES = 1024 * 1024


def next_batch(
    queued: Iterable[tuple[str, bytes]],
    *,
    max_results: int = BATCH_MAX_RESULTS,
    max_bytes: int = BATCH_MAX_BYTES,
) -> list[tuple[str, bytes]]:
    """The oldest queued results that fit in one write: at least one, then as many as
    the limits allow, in order."""
    batch: list[tuple[str, bytes]] = []
    size = 0
    for key, value in queued:
        cost = len(key) + len(value)
        if batch and (len(batch) >= max_results or size + cost > max_bytes):
            break
        batch.append((key, value))
        size += cost
    return batch


def supersedes(own_revision: int, stored: bytes | None) -> bool:
    """After a failed compare: may a result for `own_revision` replace the record now
    stored? Only a missing record, one that cannot be decoded, or one for an older task
    revision; never one for the same revision (our own earlier write, landed after all)
    or a newer one (a later run's, which a late write must not undo)."""
    if stored is None:
        return True
    try:
        record = messages.decode_result(stored)
    except messages.MessageError:
        return True
    return record.revision < own_revision


@dataclass(frozen=True)
class Queued:
    """A result waiting to be written: its task revision and its encoded record."""

    revision: int
    value: bytes


# How often one batch is sent again after failed compares before it waits for the next
# round (a record that keeps changing under us is another agent with our id).
CONFLICT_ROUNDS = 3


class ResultWriter:
    """Writes result records in the order they were submitted, as many as are queued in
    one transaction, retrying through etcd outages. A newer result for a key replaces an
    older one not yet written (the record only ever holds the last). Nothing is dropped
    except what etcd itself refuses, and a result superseded by a newer record.

    Every write is guarded by the record's mod_revision as this writer last saw it: from
    its own last write's response, from a failed compare, or "absent" for a key it has
    not written yet. A write of ours that etcd applies late (a dead process's, or one
    this process gave up on) then fails its compare instead of overwriting a newer
    record; and a failed compare of ours is settled by reading the record and writing
    again only over an older task revision (see `supersedes`)."""

    def __init__(self, etcd: store.Store, *, backoff: Backoff | None = None) -> None:
        self._etcd = etcd
        self._backoff = backoff or Backoff()
        self._queue: OrderedDict[str, Queued] = OrderedDict()
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._closing = False
        # key -> the record's mod_revision as last seen; only the writer thread uses it.
        self._seen: dict[str, int] = {}
        self.written = 0
        self.superseded = 0

    def submit(self, key: str, result: messages.Result) -> None:
        with self._cond:
            self._queue.pop(key, None)
            self._queue[key] = Queued(result.revision, result.encode())
            self._cond.notify_all()

    def pending(self) -> Sequence[str]:
        with self._cond:
            return list(self._queue)

    def run(self) -> None:
        """The writer thread: returns once closed and empty, or aborted. Everything
        queued is written together, in one transaction per batch (see `next_batch`)."""
        while not self._abort.is_set():
            with self._cond:
                self._cond.wait_for(
                    lambda: bool(self._queue) or self._closing or self._abort.is_set()
                )
                if self._abort.is_set() or not self._queue:
                    return  # closing with nothing left, or aborted
                batch = next_batch((key, q.value) for key, q in self._queue.items())
                items = [(key, self._queue[key]) for key, _value in batch]
            try:
                self._write(items)
            except store.StoreError as exc:
                level = logging.DEBUG if self._backoff.failures else logging.WARNING
                delay = self._backoff.next_delay()
                what = f"result {items[0][0]}" if len(items) == 1 else f"{len(items)} results"
                log.log(level, "cannot write %s yet: %s; retrying in %.1fs", what, exc, delay)
                self._etcd.reset()
                self._abort.wait(delay)
            except Exception:  # noqa: BLE001 - a bug here must not stop result writing
                log.exception("writing %d result(s) failed; retrying", len(items))
                self._etcd.reset()
                self._abort.wait(self._backoff.next_delay())
            else:
                if self._backoff.failures:
                    log.info("results written again after %d attempts", self._backoff.failures + 1)
                self._backoff.reset()

    def _write(self, batch: Sequence[tuple[str, Queued]], *, rounds: int = CONFLICT_ROUNDS) -> None:
        """Write a batch in one guarded transaction. A batch etcd refuses as a whole is
        written one by one, so that only a result etcd refuses on its own is dropped; a
        batch whose compare failed is settled (see `_settle`) and what is left is sent
        again, one by one after a second failure."""
        try:
            outcome = self._etcd.put_guarded(
                [store.Guarded(key, q.value, self._seen.get(key, 0)) for key, q in batch]
            )
        except store.Rejected as exc:
            if len(batch) > 1:
                for item in batch:
                    self._write([item])
                return
            log.error("result %s was refused by etcd and is dropped: %s", batch[0][0], exc)
            self._done(batch)
            return
        if outcome.ok:
            for key, _q in batch:
                self._seen[key] = outcome.revision
                log.debug("wrote result %s", key)
            self.written += len(batch)
            self._done(batch)
            return
        left = self._settle(batch, outcome.current)
        if not left:
            return
        if rounds <= 1:
            raise store.Unavailable(f"result {left[0][0]} keeps changing while it is written")
        if len(left) > 1 and rounds < CONFLICT_ROUNDS:
            for item in left:
                self._write([item], rounds=rounds - 1)
        else:
            self._write(left, rounds=rounds - 1)

    def _settle(
        self, batch: Sequence[tuple[str, Queued]], current: Mapping[str, int]
    ) -> list[tuple[str, Queued]]:
        """After a failed compare: read the records that changed since we last saw them,
        drop our results they supersede, and return what is still to be written (now
        guarded by the mod_revisions just read)."""
        changed = [key for key, _q in batch if current.get(key, 0) != self._seen.get(key, 0)]
        stored = self._etcd.read_records(changed)
        left = []
        for key, queued in batch:
            if key in stored:
                value, mod_revision = stored[key]
                self._seen[key] = mod_revision
                if not supersedes(queued.revision, value):
                    self._drop_superseded(key, queued, value)
                    continue
            left.append((key, queued))
        return left

    def _drop_superseded(self, key: str, queued: Queued, stored: bytes | None) -> None:
        assert stored is not None  # supersedes() is true for a missing record
        held = messages.decode_result(stored).revision
        if held == queued.revision:
            log.debug("result %s for revision %d is already written", key, held)
        else:
            log.warning(
                "result %s for revision %d not written: the record already holds the newer "
                "revision %d",
                key,
                queued.revision,
                held,
            )
        self.superseded += 1
        self._done([(key, queued)])

    def _done(self, batch: Sequence[tuple[str, Queued]]) -> None:
        with self._cond:
            for key, queued in batch:
                # A newer result submitted meanwhile stays queued.
                if self._queue.get(key) == queued:
                    del self._queue[key]
            self._cond.notify_all()

    def close(self, *, timeout: float) -> list[str]:
        """Let the writer finish what is queued within `timeout` seconds, then stop it.
        Returns the keys whose results could not be written."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue, timeout=timeout)
            self._abort.set()
            self._cond.notify_all()
            left = list(self._queue)
        for key in left:
            log.error("result %s could not be written before shutdown", key)
        return left
