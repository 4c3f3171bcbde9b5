"""Result records: building them (pure) and writing them to etcd (a retrying writer).

A record lives at `<prefix>/result/<agent>/<node|region>/<name>`, holds the outcome of the
last task the agent ran from that key, and is not bound to a lease: results outlive the
agent, and at start-up they tell it which task revisions it has already done.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from agent import pending, store
from agent.backoff import Backoff
from gleam import keys, messages

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


class ResultWriter:
    """Writes result records in the order they were submitted, retrying through etcd
    outages. A newer result for a key replaces an older one not yet written (the record
    only ever holds the last). Nothing is dropped except what etcd itself refuses."""

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
        """The writer thread: returns once closed and empty, or aborted."""
        while not self._abort.is_set():
            with self._cond:
                self._cond.wait_for(
                    lambda: bool(self._queue) or self._closing or self._abort.is_set()
                )
                if self._abort.is_set() or not self._queue:
                    return  # closing with nothing left, or aborted
                key, value = next(iter(self._queue.items()))
            try:
                self._etcd.put(key, value)
            except store.Rejected as exc:
                log.error("result %s was refused by etcd and is dropped: %s", key, exc)
                self._done(key, value)
            except store.StoreError as exc:
                level = logging.DEBUG if self._backoff.failures else logging.WARNING
                delay = self._backoff.next_delay()
                log.log(level, "cannot write result %s yet: %s; retrying in %.1fs", key, exc, delay)
                self._etcd.reset()
                self._abort.wait(delay)
            except Exception:  # noqa: BLE001 - a bug here must not stop result writing
                log.exception("writing result %s failed; retrying", key)
                self._etcd.reset()
                self._abort.wait(self._backoff.next_delay())
            else:
                if self._backoff.failures:
                    log.info("wrote result %s after %d attempts", key, self._backoff.failures + 1)
                self._backoff.reset()
                self.written += 1
                log.debug("wrote result %s", key)
                self._done(key, value)

    def _done(self, key: str, value: bytes) -> None:
        with self._cond:
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
