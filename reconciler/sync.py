"""The reconciler's one door to etcd: `Store` holds every etcd call the reconciler makes
(reading what etcd holds, applying a plan in guarded transactions, the applied record,
the apply lock) over an `etcdapi.Backend`: a real etcd through pyetcd, or
`gleam.fake_etcd.FakeEtcd` in tests. etcd errors come out as `EtcdFailed`.

Writes go in transactions of at most 128 operations and well under etcd's 1.5 MiB
request limit. Every key a transaction touches is guarded by comparing its mod_revision
with the one seen when planning (0 for a key that must not exist yet), and, while the
apply lock is held, the lock key's create_revision too, so a reconciler that lost its
lock cannot write. A failed guard writes nothing: the caller re-reads those keys and
plans again. Batches are independent, so several are in flight at once (etcd commits
concurrent proposals together, which saves most of the disk syncs), sent without
waiting from this one thread (gRPC's futures), which builds the next while etcd works.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from gleam import client_render, connection, etcdapi, keys, lease, messages, testhooks
from gleam.etcdapi import Compare, Delete, Get, Op, Put, Range, Target, TxnResult
from reconciler import diff, records

log = logging.getLogger("gleam.reconcile")

MAX_TXN_BYTES = 1024 * 1024 + 256 * 1024  # below etcd's 1.5 MiB --max-request-bytes
OP_OVERHEAD = 64  # protobuf framing per operation and compare, generously
PARALLEL_TXNS = 8


TASK_KINDS = frozenset(k.value for k in keys.Kind)


class SyncError(Exception):
    """etcd refused or could not do what the reconciler needed; the text says what."""


class EtcdFailed(SyncError):
    """etcd could not be reached or refused a request (the text is etcd's error)."""


class LockTimeout(SyncError):
    pass


class LockLost(SyncError):
    pass


P = ParamSpec("P")
R = TypeVar("R")


def _translated(method: Callable[P, R]) -> Callable[P, R]:
    """The one place etcd's errors become the reconciler's."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except etcdapi.EtcdError as exc:
            raise EtcdFailed(str(exc)) from exc

    return call


@dataclass(frozen=True)
class EtcdState:
    """What etcd holds for the keys in scope."""

    actual: dict[str, diff.Actual]
    owned: dict[str, int]

    def within(self, scope: frozenset[str]) -> EtcdState:
        return EtcdState(
            actual={k: v for k, v in self.actual.items() if k in scope},
            owned={k: v for k, v in self.owned.items() if k in scope},
        )


@dataclass(frozen=True)
class Written:
    """The outcome of sending a plan's changes: those committed, the revision each
    written task key got, and those whose guard failed (nothing of theirs written)."""

    done: tuple[diff.Change, ...]
    revisions: dict[str, int]
    conflicts: tuple[diff.Change, ...]


# Operations a change adds to a transaction, besides its two compares. Looked up, not
# built per call: 10,000 changes are costed in every full apply.
_OPS = {
    diff.Action.CREATE: 2,
    diff.Action.UPDATE: 2,
    diff.Action.ADOPT: 1,
    diff.Action.DELETE: 2,
    diff.Action.FORGET: 1,
}


def _cost(change: diff.Change) -> tuple[int, int]:
    """(operations, bytes) a change adds to a transaction; two compares each."""
    size = 2 * (2 * len(change.key) + 20 + OP_OVERHEAD) + len(change.new or b"")
    return _OPS[change.action], size


def batches(changes: Sequence[diff.Change], *, reserved: int = 1) -> list[list[diff.Change]]:
    """Split changes into transactions of at most MAX_TXN_OPS operations and compares
    (keeping `reserved` of each for the lock and the record) and MAX_TXN_BYTES."""
    out: list[list[diff.Change]] = []
    current: list[diff.Change] = []
    ops = compares = size = 0
    limit = connection.MAX_TXN_OPS - reserved
    for change in changes:
        c_ops, c_size = _cost(change)
        if current and (
            ops + c_ops > limit or compares + 2 > limit or size + c_size > MAX_TXN_BYTES - 4096
        ):
            out.append(current)
            current, ops, compares, size = [], 0, 0, 0
        current.append(change)
        ops += c_ops
        compares += 2
        size += c_size
    if current:
        out.append(current)
    return out


# Enum members bound once: an attribute lookup on an enum class costs more than the
# dataclass each change builds.
_MOD = Target.MOD
_ADOPT = diff.Action.ADOPT
_DELETE = diff.Action.DELETE


def txn_parts(
    layout: keys.Layout, changes: Iterable[diff.Change], origin: bytes
) -> tuple[list[Compare], list[Op]]:
    """The compares and operations of a batch of changes (pure): each change compares its
    key's and its ownership record's mod_revision with those it was planned with."""
    compares: list[Compare] = []
    ops: list[Op] = []
    compare, op = compares.append, ops.append
    for change in changes:
        key = change.key
        owned = layout.owned_key(key)
        compare(Compare(key, _MOD, change.mod_revision))
        compare(Compare(owned, _MOD, change.owned_revision))
        action = change.action
        if action in diff.WRITES:
            # The ownership record is rewritten with each write so that it names the
            # commit the value came from.
            op(Put(key, change.new or b""))
            op(Put(owned, origin))
        elif action is _ADOPT:
            op(Put(owned, origin))
        elif action is _DELETE:
            op(Delete(key))
            op(Delete(owned))
        else:  # FORGET
            op(Delete(owned))
    return compares, ops


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Store:
    """Every etcd call of a pass, for one key layout."""

    def __init__(self, backend: etcdapi.Backend, layout: keys.Layout) -> None:
        self.backend = backend
        self.layout = layout

    @classmethod
    def over(cls, client: connection.Client, layout: keys.Layout) -> Store:
        """A store over a connected pyetcd client."""
        return cls(etcdapi.Pyetcd(client), layout)

    # Reading ----------------------------------------------------------------------

    @_translated
    def read_record(self) -> tuple[records.Record | None, int]:
        """The applied record and its mod_revision (None, 0 when there is none)."""
        found = etcdapi.get_one(self.backend, self.layout.applied_key)
        if found is None:
            return None, 0
        return records.decode(found.value), found.mod_revision

    @_translated
    def read_all(self) -> EtcdState:
        """Every task key and ownership record under the prefix, at one revision: the
        first range read fixes the revision and the others read at it.

        Keys are not validated here: the plan only looks at desired and owned keys, and
        both are valid names by construction; a stray key just never matches."""
        layout = self.layout
        first = self.backend.range(Range(layout.tasks_prefix(keys.Kind.NODE), prefix=True))
        revision = first.revision
        region = self.backend.range(
            Range(layout.tasks_prefix(keys.Kind.REGION), prefix=True, revision=revision)
        )
        owned_head = layout.owned_prefix
        records = self.backend.range(
            Range(owned_head, prefix=True, revision=revision, keys_only=True)
        )
        actual = {
            _text(kv.key): diff.Actual(kv.value, kv.mod_revision)
            for response in (first, region)
            for kv in response.kvs
        }
        tasks_head = layout.prefix + "/"
        skip = len(owned_head)
        owned: dict[str, int] = {}
        for kv in records.kvs:
            rest = _text(kv.key[skip:])
            kind, _, name = rest.partition("/")
            # A stray record (written by hand) must never name a key outside node/ or
            # region/, such as an agent's registration, for --prune to delete.
            if kind in TASK_KINDS and name and "/" not in name:
                owned[tasks_head + rest] = kv.mod_revision
        return EtcdState(actual=actual, owned=owned)

    @_translated
    def read_keys(self, task_keys: Iterable[str]) -> EtcdState:
        """The named task keys and their ownership records (a few transactions of gets)."""
        wanted = sorted(set(task_keys))
        actual: dict[str, diff.Actual] = {}
        owned: dict[str, int] = {}
        step = connection.MAX_TXN_OPS // 2
        for start in range(0, len(wanted), step):
            chunk = wanted[start : start + step]
            ops: list[Op] = []
            for key in chunk:
                ops += [Get(key), Get(self.layout.owned_key(key))]
            gets = self.backend.txn([], ops).gets
            for index, key in enumerate(chunk):
                for kv in gets[2 * index]:
                    actual[key] = diff.Actual(kv.value, kv.mod_revision)
                for kv in gets[2 * index + 1]:
                    owned[key] = kv.mod_revision
        return EtcdState(actual=actual, owned=owned)

    @_translated
    def current_revision(self) -> int:
        """etcd's revision now (one count-only read)."""
        return self.backend.range(Range(self.layout.meta_prefix, True, count_only=True)).revision

    @_translated
    def count_owned(self) -> int:
        owned = Range(self.layout.owned_prefix, prefix=True, count_only=True)
        return self.backend.range(owned).count

    # Writing ----------------------------------------------------------------------

    @_translated
    def apply_changes(
        self,
        changes: Sequence[diff.Change],
        *,
        fence: Lock | None = None,
        parallel: int = PARALLEL_TXNS,
        origin: bytes = b"",
    ) -> Written:
        """Send the changes in guarded transactions; see the module docstring."""
        results: list[tuple[list[diff.Change], TxnResult]] = []
        in_flight: deque[tuple[list[diff.Change], Callable[[], TxnResult]]] = deque()
        for index, batch in enumerate(batches(changes)):
            if index:
                # Tests stop a reconciler here, between two committed transactions.
                testhooks.wedge_point("apply")
            compares, ops = txn_parts(self.layout, batch, origin)
            if fence is not None:
                compares.insert(0, fence.compare())
            in_flight.append((batch, self.backend.txn_start(compares, ops)))
            # The first transaction alone, then up to `parallel` at a time: a reconciler
            # that is stopped or fails early has written one batch, not `parallel` of them.
            while in_flight and (index == 0 or len(in_flight) >= parallel):
                sent, result = in_flight.popleft()
                results.append((sent, result()))
        while in_flight:
            sent, result = in_flight.popleft()
            results.append((sent, result()))
        done: list[diff.Change] = []
        conflicts: list[diff.Change] = []
        revisions: dict[str, int] = {}
        for batch, outcome in results:
            if outcome.succeeded:
                done += batch
                for change in batch:
                    if change.action in diff.WRITES:
                        revisions[change.key] = outcome.revision
            else:
                conflicts += batch
        if conflicts and fence is not None and not fence.held():
            raise LockLost(
                f"lost the apply lock {fence.key} (lease expired?); "
                f"{len(done)} change(s) were applied before that"
            )
        return Written(done=tuple(done), revisions=revisions, conflicts=tuple(conflicts))

    @_translated
    def write_record(
        self, record: records.Record, *, seen_revision: int, fence: Lock | None = None
    ) -> bool:
        """Write the applied record if nobody else wrote it since we read it."""
        key = self.layout.applied_key
        compares = [Compare(key, Target.MOD, seen_revision)]
        if fence is not None:
            compares.append(fence.compare())
        return self.backend.txn(compares, [Put(key, record.encode())]).succeeded

    def lock(self, *, ttl: int = 15, holder: str | None = None) -> Lock:
        return Lock(self, ttl=ttl, holder=holder)


# The apply lock -------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds the apply lock: the lock key's value. `pidns` (the pid namespace) and
    `start` (the process's start time, in clock ticks since boot) tell a dead holder
    from a live one on the same host, and from a later process that got the same pid;
    both are "" where the system does not say (not Linux)."""

    host: str
    pid: int
    pidns: str = ""
    start: str = ""

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}"

    def encode(self) -> bytes:
        body = {"host": self.host, "pid": self.pid, "pidns": self.pidns, "start": self.start}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes) -> Holder | None:
        """The holder a lock value names; None for any other value (written by an older
        version, or by hand): such a lock is only ever freed by its lease."""
        try:
            body = messages.load_json(raw, what="the lock's value")
            host, pid = body["host"], body["pid"]
            pidns, start = body.get("pidns", ""), body.get("start", "")
        except (messages.MessageError, TypeError, KeyError, AttributeError):
            return None
        if not (isinstance(host, str) and type(pid) is int and pid > 0):
            return None
        if not (isinstance(pidns, str) and isinstance(start, str)):
            return None
        return cls(host, pid, pidns, start)


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (field 22 of /proc/<pid>/stat), "" where /proc
    cannot say, None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count after the last ")".
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def this_process() -> Holder:
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return Holder(socket.gethostname(), os.getpid(), pidns, process_start(os.getpid()) or "")


def holder_gone(holder: Holder, here: Holder, start_of: Callable[[int], str | None]) -> bool:
    """True only when the holder is known to have exited: it ran on this host, in this
    pid namespace, and no process with its pid is there now (or one that started at
    another time: the pid was reused). Any doubt (another host, another container, a
    system without /proc) is False, and the lock is left to its lease."""
    if not here.pidns or (holder.host, holder.pidns) != (here.host, here.pidns):
        return False
    start = start_of(holder.pid)
    return start is None or (bool(start) and bool(holder.start) and start != holder.start)


# (lock key, create_revision) of the locks this process holds now. A lock record that
# names this very process but is not among them was left by an earlier pass of this
# process (a daemon whose release failed while etcd restarted): it can be broken too.
# Module state because the record names the process, not a Lock object.
_HELD: set[tuple[str, int]] = set()
_HELD_GUARD = threading.Lock()


class Lock:
    """`<prefix>/meta/lock`, held by one reconciler (CI job or daemon) while it plans
    and applies, bound to a lease (a lease session) so a crashed holder frees it after
    `ttl` seconds. Created with a compare on create_revision == 0: at most one holder at
    a time.

    Its value names the holder (`Holder`). A lock whose holder is known to be gone
    (same host, process exited) is deleted at once instead of waiting out its lease,
    with a compare on its mod_revision so that only that very record is deleted. Even a
    wrong guess could not let two reconcilers write: every write also compares the
    lock's create_revision, so a holder whose lock was deleted can write nothing more."""

    def __init__(
        self,
        store: Store,
        *,
        ttl: int = 15,
        holder: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        start_of: Callable[[int], str | None] = process_start,
    ) -> None:
        self.backend = store.backend
        self.key = store.layout.lock_key
        self.ttl = ttl
        self.me = this_process()
        # `holder` (tests) names an opaque holder that is never judged gone.
        self.value = holder.encode("utf-8") if holder is not None else self.me.encode()
        self.revision = 0
        self._session = lease.LeaseSession(self.backend, ttl=ttl, name="apply-lock")
        self._clock = clock
        self._sleep = sleep
        self._start_of = start_of

    @_translated
    def acquire(
        self, *, timeout: float, poll: float = 0.1, cancel: threading.Event | None = None
    ) -> None:
        """Take the lock, waiting up to `timeout` seconds (or until `cancel` is set);
        LockTimeout names the holder. While held, the lease session refreshes the lease
        so a long apply keeps the lock; if the refresh fails for longer than the TTL the
        lock is lost and the fencing compare stops every further write."""
        lease_id = self._session.open()
        try:
            self._take(lease_id, timeout=timeout, poll=poll, cancel=cancel)
        except BaseException:
            self._session.close()  # its keep-alive too: nothing is bound to the lease
            raise

    def _take(
        self, lease_id: int, *, timeout: float, poll: float, cancel: threading.Event | None
    ) -> None:
        deadline = self._clock() + timeout
        who = "someone"
        waiting_logged = False
        while True:
            # Under the guard, so that no other pass of this process sees our new lock
            # before it is in _HELD (it would take it for one left by an earlier pass).
            with _HELD_GUARD:
                result = self.backend.txn(
                    [Compare(self.key, Target.CREATE, 0)],
                    [Put(self.key, self.value, lease=lease_id)],
                    [Get(self.key)],
                )
                if result.succeeded:
                    self.revision = result.revision
                    _HELD.add((self.key, self.revision))
                    return
            if result.gets and result.gets[0]:
                found = result.gets[0][0]
                holder = Holder.decode(found.value)
                who = str(holder) if holder else (found.value.decode("utf-8", "replace") or who)
                # Anyone who can write to etcd picks this value: one short printable line.
                who = client_render.printable(who if len(who) <= 100 else who[:97] + "...")
                if holder is not None and self._break_if_gone(holder, found):
                    continue
            if not waiting_logged:
                log.info("apply lock %s is held by %s; waiting up to %gs", self.key, who, timeout)
                waiting_logged = True
            if self._clock() >= deadline or (cancel is not None and cancel.is_set()):
                reason = (
                    "stopping"
                    if cancel is not None and cancel.is_set()
                    else (f"gave up after {timeout:g}s")
                )
                raise LockTimeout(f"{self.key} is held by {who}; {reason}")
            if cancel is not None:
                cancel.wait(poll)
            else:
                self._sleep(poll)

    def _break_if_gone(self, holder: Holder, found: etcdapi.KeyValue) -> bool:
        """Delete a lock left by a process that is known to have exited, or by an
        earlier pass of this process; True if it was deleted (try again at once)."""
        with _HELD_GUARD:
            left_by_us = holder == self.me and (self.key, found.create_revision) not in _HELD
        if not left_by_us and not holder_gone(holder, self.me, self._start_of):
            return False
        deleted = self.backend.txn(
            [Compare(self.key, Target.MOD, found.mod_revision)], [Delete(self.key)]
        )
        if deleted.succeeded:
            why = "an earlier pass of this process" if left_by_us else "a process that has exited"
            log.warning(
                "broke the apply lock %s left by %s (%s) instead of waiting for its lease",
                self.key,
                holder,
                why,
            )
        return True

    @property
    def lease_id(self) -> int:
        """The lease the lock is bound to (0 when not held)."""
        return self._session.id

    def compare(self) -> Compare:
        """A transaction compare that holds only while this lock is ours."""
        return Compare(self.key, Target.CREATE, self.revision)

    def held(self) -> bool:
        found = etcdapi.get_one(self.backend, self.key)
        return found is not None and found.create_revision == self.revision

    def release(self) -> None:
        """Delete the key if it is still ours, and revoke the lease (best effort: the
        lease's expiry frees the lock anyway, and the next pass of this process, or on
        this host once this process has exited, breaks it at once)."""
        if self.revision:
            with _HELD_GUARD:
                _HELD.discard((self.key, self.revision))
            try:
                self.backend.txn([self.compare()], [Delete(self.key)])
            except etcdapi.EtcdError as exc:
                log.warning("could not release the apply lock (its lease will): %s", exc)
            self.revision = 0
        self._session.close()
