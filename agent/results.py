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
from datetime import UTC, datetime

from agent import pending, store
from agent.backoff import Backoff
from gleam import connection, keys, messages

log = logging.getLogger("agent.results")

# Error texts are cut here: a Lua error can carry a huge string, and the record must fit.
MAX_ERROR_CHARS = 8 * 1024


def rfc3339(timestamp: float) -> str:
    """A Unix time as RFC 3339 UTC with milliseconds: `2026-11-28T22:50:01.123Z`."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


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
        started=rfc3339(started),
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


class ResultWriter:
    """Writes result records in the order they were submitted, as many as are queued in
    one transaction, retrying through etcd outages. A newer result for a key replaces an
    older one not yet written (the record only ever holds the last). Nothing is dropped
    except what etcd itself refuses."""

    def __init__(self, etcd: store.Store, *, backoff: Backoff | None = None) -> None:
        self._etcd = etcd
        self._backoff = backoff or Backoff()
        self._queue: OrderedDict[str, bytes] = OrderedDict()
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._closing = False
        self.written = 0

    def submit(self, key: str, result: messages.Result) -> None:
        with self._cond:
            self._queue.pop(key, None)
            self._queue[key] = result.encode()
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
                batch = next_batch(self._queue.items())
            try:
                self._write(batch)
            except store.StoreError as exc:
                level = logging.DEBUG if self._backoff.failures else logging.WARNING
                delay = self._backoff.next_delay()
                what = f"result {batch[0][0]}" if len(batch) == 1 else f"{len(batch)} results"
                log.log(level, "cannot write %s yet: %s; retrying in %.1fs", what, exc, delay)
                self._etcd.reset()
                self._abort.wait(delay)
            except Exception:  # noqa: BLE001 - a bug here must not stop result writing
                log.exception("writing %d result(s) failed; retrying", len(batch))
                self._etcd.reset()
                self._abort.wait(self._backoff.next_delay())
            else:
                if self._backoff.failures:
                    log.info("results written again after %d attempts", self._backoff.failures + 1)
                self._backoff.reset()

    def _write(self, batch: Sequence[tuple[str, bytes]]) -> None:
        """Write a batch; a batch etcd refuses as a whole is written one by one, so that
        only a result etcd refuses on its own is dropped."""
        try:
            if len(batch) == 1:
                self._etcd.put(*batch[0])
            else:
                self._etcd.put_many(batch)
        except store.Rejected as exc:
            if len(batch) > 1:
                for item in batch:
                    self._write([item])
                return
            log.error("result %s was refused by etcd and is dropped: %s", batch[0][0], exc)
        else:
            self.written += len(batch)
            for key, _value in batch:
                log.debug("wrote result %s", key)
        self._done(batch)

    def _done(self, batch: Sequence[tuple[str, bytes]]) -> None:
        with self._cond:
            for key, value in batch:
                # A newer result submitted meanwhile stays queued.
                if self._queue.get(key) == value:
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
