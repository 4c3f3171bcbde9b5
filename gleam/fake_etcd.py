"""An in-memory etcd for fast tests of the code behind `etcdapi.Backend`: one store
revision bumped by every write transaction, each key's mod_revision and
create_revision, reads at past revisions, compares in transactions, and leases whose
TTL runs on an injected clock (expired leases delete their keys, as etcd does).

tests/test_fake_etcd.py runs the same cases against this and a real etcd. Thread-safe
through one lock around each call (the lease session refreshes from its own thread).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gleam.etcdapi import (
    Compare,
    Delete,
    EtcdError,
    Get,
    KeyValue,
    Op,
    Put,
    Range,
    RangeResult,
    Target,
    TxnResult,
)


@dataclass(frozen=True)
class _Version:
    revision: int  # the revision that wrote (or deleted) it
    kv: KeyValue | None  # None: deleted
    lease: int


@dataclass
class _Lease:
    ttl: int
    expires: float
    keys: set[str]


class FakeEtcd:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.revision = 1  # a new etcd starts at revision 1
        self._history: dict[str, list[_Version]] = {}
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(0x1000)
        self._clock = clock
        self._lock = threading.Lock()
        self.fail: Callable[[str], None] | None = None  # a test hook: raise to fail a call

    # etcdapi.Backend ----------------------------------------------------------------

    def range(self, query: Range) -> RangeResult:
        key, prefix, revision = query.key, query.prefix, query.revision
        with self._lock:
            self._enter("range")
            if revision > self.revision:
                raise EtcdError("OUT_OF_RANGE: etcdserver: mvcc: required revision is a future")
            at = revision or self.revision
            names = sorted(k for k in self._history if (k.startswith(key) if prefix else k == key))
            found = [kv for kv in (self._at(name, at) for name in names) if kv is not None]
            if query.keys_only:
                found = [kv._replace(value=b"") for kv in found]
            return RangeResult(self.revision, () if query.count_only else tuple(found), len(found))

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        with self._lock:
            self._enter("txn")
            ok = all(self._holds(c) for c in compares)
            ops = success if ok else failure
            writes = any(not isinstance(op, Get) for op in ops)
            # etcd refuses the whole transaction for an unknown lease: check before
            # changing anything.
            if any(isinstance(op, Put) and op.lease and op.lease not in self._leases for op in ops):
                raise EtcdError("NOT_FOUND: etcdserver: requested lease not found")
            revision = self.revision + 1
            changed = False
            gets: list[tuple[KeyValue, ...]] = []
            for op in ops:
                if isinstance(op, Get):
                    kv = self._at(op.key, self.revision)
                    gets.append((kv,) if kv is not None else ())
                elif isinstance(op, Put):
                    self._write(op.key, op.value, revision, lease=op.lease)
                    changed = True
                else:
                    changed = self._delete(op.key, revision) or changed
            # As etcd: a transaction takes a revision only if it changed something (a
            # delete of an absent key does not); its answer then carries the store's.
            if changed:
                self.revision = revision
            return TxnResult(ok, self.revision if writes else 0, tuple(gets))

    def txn_start(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> Callable[[], TxnResult]:
        """The transaction done at once; its result (or error) when waited for, as a
        transaction in flight gives it."""
        try:
            result = self.txn(compares, success, failure)
        except EtcdError as exc:
            error = exc

            def failed() -> TxnResult:
                raise error

            return failed
        return lambda: result

    def grant_lease(self, ttl: int) -> tuple[int, int]:
        with self._lock:
            self._enter("grant_lease")
            lease = next(self._ids)
            self._leases[lease] = _Lease(ttl, self._clock() + ttl, set())
            return lease, ttl

    def keep_alive(self, lease: int) -> int:
        with self._lock:
            self._enter("keep_alive")
            found = self._leases.get(lease)
            if found is None:
                return -1  # etcd answers TTL -1 for a lease it no longer has
            found.expires = self._clock() + found.ttl
            return found.ttl

    def revoke_lease(self, lease: int) -> None:
        with self._lock:
            self._enter("revoke_lease")
            if lease not in self._leases:
                raise EtcdError("NOT_FOUND: etcdserver: requested lease not found")
            self._end_lease(lease)

    # Helpers for tests ---------------------------------------------------------------

    def put(self, key: str, value: bytes) -> int:
        """A blind put (as a person with etcdctl would do); returns its revision."""
        return self.txn([], [Put(key, value)]).revision

    def delete(self, key: str) -> int:
        return self.txn([], [Delete(key)]).revision

    def values(self, prefix: str) -> dict[str, bytes]:
        return {kv.key.decode(): kv.value for kv in self.range(Range(prefix, True)).kvs}

    # Inside --------------------------------------------------------------------------

    def _enter(self, call: str) -> None:
        if self.fail is not None:
            self.fail(call)
        now = self._clock()
        for lease in [i for i, found in self._leases.items() if found.expires <= now]:
            self._end_lease(lease)

    def _end_lease(self, lease: int) -> None:
        found = self._leases.pop(lease)
        live = [k for k in sorted(found.keys) if self._lease_of(k) == lease]
        if live:
            self.revision += 1
            for key in live:
                self._delete(key, self.revision)

    def _lease_of(self, key: str) -> int:
        versions = self._history.get(key)
        return versions[-1].lease if versions and versions[-1].kv is not None else 0

    def _at(self, key: str, revision: int) -> KeyValue | None:
        versions = self._history.get(key)
        if not versions:
            return None
        index = bisect.bisect_right([v.revision for v in versions], revision)
        return versions[index - 1].kv if index else None

    def _holds(self, compare: Compare) -> bool:
        kv = self._at(compare.key, self.revision)
        if kv is None:
            return compare.revision == 0
        seen = kv.mod_revision if compare.target is Target.MOD else kv.create_revision
        return seen == compare.revision

    def _write(self, key: str, value: bytes, revision: int, *, lease: int) -> None:
        current = self._at(key, self.revision)
        created = current.create_revision if current is not None else revision
        kv = KeyValue(key.encode(), value, revision, created)
        self._history.setdefault(key, []).append(_Version(revision, kv, lease))
        if lease:
            self._leases[lease].keys.add(key)

    def _delete(self, key: str, revision: int) -> bool:
        """Whether there was a key to delete."""
        if self._at(key, self.revision) is None:
            return False
        self._history[key].append(_Version(revision, None, 0))
        return True
