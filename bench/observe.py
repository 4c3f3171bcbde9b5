"""Watching agents' results arrive in etcd, stamped with the time they arrived.

One prefix watch on `<prefix>/result/` feeds every expectation. An expectation is
registered before the write it waits for, so no result can slip past, and it names
each result key with the lowest task revision that counts (anything older is a
previous round's result).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bench.processes import BenchError
from gleam import keys, messages


@dataclass(frozen=True)
class Arrival:
    key: str  # the result key
    result: messages.Result
    arrived: float  # wall time (time.time()) when the watch delivered it

    @property
    def started(self) -> float:
        """The agent's wall-clock stamp of the task's start, as seconds since the epoch."""
        return datetime.fromisoformat(self.result.started).timestamp()


@dataclass
class Expectation:
    wanted: Mapping[str, int]  # result key -> lowest task revision that counts
    accept: Callable[[Arrival], bool] | None = None
    found: dict[str, Arrival] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def offer(self, arrival: Arrival) -> None:
        need = self.wanted.get(arrival.key)
        if need is None or arrival.key in self.found or arrival.result.revision < need:
            return
        if self.accept is not None and not self.accept(arrival):
            return
        self.found[arrival.key] = arrival
        if len(self.found) == len(self.wanted):
            self.done.set()


class ResultWatch:
    """Results under a layout's prefix as they are written."""

    def __init__(self, etcd: Any, layout: keys.Layout) -> None:
        self._etcd = etcd
        self._layout = layout
        self._lock = threading.Lock()
        self._active: list[Expectation] = []
        self._error: BaseException | None = None
        self._watch_id = etcd.add_watch_prefix_callback(layout.results_prefix, self._on_response)

    def _on_response(self, response: Any) -> None:
        now = time.time()
        if isinstance(response, BaseException):
            with self._lock:
                self._error = response
                for expectation in self._active:
                    expectation.error = response
                    expectation.done.set()
            return
        arrivals = []
        for event in response.events:
            value = getattr(event, "value", None)
            if not value:
                continue  # a delete
            try:
                result = messages.decode_result(value)
            except messages.MessageError:
                continue
            arrivals.append(Arrival(event.key.decode(), result, now))
        with self._lock:
            for arrival in arrivals:
                for expectation in self._active:
                    expectation.offer(arrival)

    def expect(
        self, wanted: Mapping[str, int], *, accept: Callable[[Arrival], bool] | None = None
    ) -> Expectation:
        expectation = Expectation(dict(wanted), accept)
        with self._lock:
            if self._error is not None:
                raise BenchError(f"result watch failed: {self._error!r}")
            self._active.append(expectation)
        return expectation

    def wait(
        self,
        expectation: Expectation,
        *,
        timeout: float,
        what: str,
        check: Callable[[], None] | None = None,
    ) -> dict[str, Arrival]:
        """The arrivals, once every wanted key has its result; BenchError at the deadline.
        `check` runs about once a second while waiting (e.g. to fail early when a
        process the results depend on has died)."""
        deadline = time.monotonic() + timeout
        try:
            while not expectation.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
                if check is not None:
                    check()
                if time.monotonic() >= deadline:
                    missing = sorted(set(expectation.wanted) - set(expectation.found))
                    raise BenchError(
                        f"timed out after {timeout}s waiting for {what}: "
                        f"{len(expectation.found)}/{len(expectation.wanted)} results "
                        f"(missing e.g. {missing[:3]})"
                    )
            if expectation.error is not None:
                raise BenchError(f"result watch failed: {expectation.error!r}")
            return dict(expectation.found)
        finally:
            with self._lock:
                if expectation in self._active:
                    self._active.remove(expectation)

    def close(self) -> None:
        # Best effort at the end of a run: the client is closed right after.
        with contextlib.suppress(Exception):
            self._etcd.cancel_watch(self._watch_id)


def current_revision(etcd: Any) -> int:
    """The store's revision now (from a read's response header)."""
    return int(etcd.get_response("/").header.revision)


def put_many(etcd: Any, items: Mapping[str, bytes], *, batch: int = 128) -> None:
    """Write many keys in transactions of `batch` puts (etcd's default limit is 128)."""
    pairs = list(items.items())
    for start in range(0, len(pairs), batch):
        ops = [etcd.transactions.put(k, v) for k, v in pairs[start : start + batch]]
        etcd.transaction(compare=[], success=ops, failure=[])
