"""Every etcd call the reconciler makes: reading what etcd holds, applying a plan in
guarded transactions, the applied record, and the apply lock.

Writes go in transactions of at most 128 operations and well under etcd's 1.5 MiB
request limit. Every key a transaction touches is guarded by comparing its mod_revision
with the one seen when planning (0 for a key that must not exist yet), and, while the
apply lock is held, the lock key's create_revision too, so a reconciler that lost its
lock cannot write. A failed guard writes nothing: the caller re-reads those keys and
plans again. Batches are independent, so they are sent a few at a time in parallel (etcd
commits concurrent proposals together, which saves most of the disk syncs).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gleam import keys, leases, messages, testhooks
from gleam import render as gleam_render
from reconciler import diff, state

log = logging.getLogger("gleam.reconcile")

Etcd = Any  # pyetcd.MultiEndpointEtcd3Client; pyetcd ships no type hints.

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_TXN_BYTES = 1024 * 1024 + 256 * 1024  # below etcd's 1.5 MiB --max-request-bytes
OP_OVERHEAD = 64  # protobuf framing per operation and compare, generously
PARALLEL_TXNS = 4


TASK_KINDS = frozenset(k.value for k in keys.Kind)


class SyncError(Exception):
    """etcd refused or could not do what the reconciler needed; the text says what."""


class LockTimeout(SyncError):
    pass


class LockLost(SyncError):
    pass


@dataclass(frozen=True)
class Observed:
    """What etcd holds for the keys in scope."""

    actual: dict[str, diff.Actual]
    owned: dict[str, int]


# Reading ----------------------------------------------------------------------------


def read_record(etcd: Etcd, layout: keys.Layout) -> tuple[state.Record | None, int]:
    """The applied record and its mod_revision (None, 0 when there is none)."""
    value, meta = etcd.get(layout.applied_key)
    if value is None:
        return None, 0
    return state.decode(value), int(meta.mod_revision)


def read_all(etcd: Etcd, layout: keys.Layout) -> Observed:
    """Every task key and ownership record under the prefix, at one revision: the first
    range read fixes the revision and the others read at it. Raw protobuf responses
    (not pyetcd's per-key objects) keep 10,000 keys to a few tens of milliseconds.

    Keys are not validated here: the plan only looks at desired and owned keys, and
    both are valid names by construction; a stray key just never matches."""
    node_prefix = layout.tasks_prefix(keys.Kind.NODE)
    first = etcd.get_prefix_response(node_prefix)
    revision = int(first.header.revision)
    region = etcd.get_prefix_response(layout.tasks_prefix(keys.Kind.REGION), revision=revision)
    owned_head = layout.owned_prefix
    records = etcd.get_prefix_response(owned_head, revision=revision, keys_only=True)
    actual: dict[str, diff.Actual] = {}
    for response in (first, region):
        for kv in response.kvs:
            actual[kv.key.decode("utf-8", "surrogateescape")] = diff.Actual(
                kv.value, kv.mod_revision
            )
    tasks_head = layout.prefix + "/"
    skip = len(owned_head)
    owned: dict[str, int] = {}
    for kv in records.kvs:
        rest = kv.key[skip:].decode("utf-8", "surrogateescape")
        kind, _, name = rest.partition("/")
        # A stray record (written by hand) must never name a key outside node/ or
        # region/, such as an agent's registration, for --prune to delete.
        if kind in TASK_KINDS and name and "/" not in name:
            owned[tasks_head + rest] = kv.mod_revision
    return Observed(actual=actual, owned=owned)


def read_keys(etcd: Etcd, layout: keys.Layout, task_keys: Iterable[str]) -> Observed:
    """The named task keys and their ownership records (a few transactions of gets)."""
    t = etcd.transactions
    wanted = sorted(set(task_keys))
    actual: dict[str, diff.Actual] = {}
    owned: dict[str, int] = {}
    step = MAX_TXN_OPS // 2
    for start in range(0, len(wanted), step):
        chunk = wanted[start : start + step]
        ops = []
        for key in chunk:
            ops += [t.get(key), t.get(layout.owned_key(key))]
        _ok, responses = etcd.transaction(compare=[], success=ops, failure=[])
        for index, key in enumerate(chunk):
            for value, meta in responses[2 * index]:
                actual[key] = diff.Actual(value, int(meta.mod_revision))
            for _value, meta in responses[2 * index + 1]:
                owned[key] = int(meta.mod_revision)
    return Observed(actual=actual, owned=owned)


def count_owned(etcd: Etcd, layout: keys.Layout) -> int:
    response = etcd.get_prefix_response(layout.owned_prefix, count_only=True)
    return int(response.count)


# Writing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """The outcome of sending a plan's changes: those committed, the revision each
    written task key got, and those whose guard failed (nothing of theirs written)."""

    done: tuple[diff.Change, ...]
    revisions: dict[str, int]
    conflicts: tuple[diff.Change, ...]


def _cost(change: diff.Change) -> tuple[int, int]:
    """(operations, bytes) a change adds to a transaction; two compares each."""
    ops = {
        diff.Action.CREATE: 2,
        diff.Action.UPDATE: 2,
        diff.Action.ADOPT: 1,
        diff.Action.DELETE: 2,
        diff.Action.FORGET: 1,
    }[change.action]
    size = 2 * (2 * len(change.key) + 20 + OP_OVERHEAD) + len(change.new or b"")
    return ops, size


def batches(changes: Sequence[diff.Change], *, reserved: int = 1) -> list[list[diff.Change]]:
    """Split changes into transactions of at most MAX_TXN_OPS operations and compares
    (keeping `reserved` of each for the lock and the record) and MAX_TXN_BYTES."""
    out: list[list[diff.Change]] = []
    current: list[diff.Change] = []
    ops = compares = size = 0
    limit = MAX_TXN_OPS - reserved
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


def _txn_parts(
    etcd: Etcd, layout: keys.Layout, change: diff.Change, origin: bytes
) -> tuple[list[Any], list[Any]]:
    t = etcd.transactions
    owned = layout.owned_key(change.key)
    compares = [t.mod(change.key) == change.mod_revision, t.mod(owned) == change.owned_revision]
    ops: list[Any] = []
    action = change.action
    if action in diff.WRITES:
        # The ownership record is rewritten with each write so that it names the commit
        # the value came from.
        ops += [t.put(change.key, change.new), t.put(owned, origin)]
    elif action is diff.Action.ADOPT:
        ops.append(t.put(owned, origin))
    elif action is diff.Action.DELETE:
        ops += [t.delete(change.key), t.delete(owned)]
    else:  # FORGET
        ops.append(t.delete(owned))
    return compares, ops


def apply_changes(
    etcd: Etcd,
    layout: keys.Layout,
    changes: Sequence[diff.Change],
    *,
    fence: Lock | None = None,
    parallel: int = PARALLEL_TXNS,
    origin: bytes = b"",
) -> Written:
    """Send the changes in guarded transactions; see the module docstring."""

    def send(numbered: tuple[int, list[diff.Change]]) -> tuple[list[diff.Change], bool, int]:
        index, batch = numbered
        if index:
            # Tests stop a reconciler here, between two committed transactions.
            testhooks.wedge_point("apply")
        compares: list[Any] = [fence.compare()] if fence is not None else []
        ops: list[Any] = []
        for change in batch:
            c, o = _txn_parts(etcd, layout, change, origin)
            compares += c
            ops += o
        ok, responses = etcd.transaction(compare=compares, success=ops, failure=[])
        revision = 0
        if ok:
            for response in responses:
                if response.HasField("response_put"):
                    revision = int(response.response_put.header.revision)
                    break
                if response.HasField("response_delete_range"):
                    revision = int(response.response_delete_range.header.revision)
                    break
        return batch, bool(ok), revision

    done: list[diff.Change] = []
    conflicts: list[diff.Change] = []
    revisions: dict[str, int] = {}
    groups = list(enumerate(batches(changes)))
    if len(groups) <= 1 or parallel <= 1:
        results = [send(g) for g in groups]
    else:
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="gleam-txn") as pool:
            # The first transaction alone, then the rest in parallel: a reconciler that
            # is stopped or fails early has written one batch, not `parallel` of them.
            results = [send(groups[0]), *pool.map(send, groups[1:])]
    for batch, ok, revision in results:
        if ok:
            done += batch
            for change in batch:
                if change.action in diff.WRITES:
                    revisions[change.key] = revision
        else:
            conflicts += batch
    if conflicts and fence is not None and not fence.held():
        raise LockLost(
            f"lost the apply lock {fence.key} (lease expired?); "
            f"{len(done)} change(s) were applied before that"
        )
    return Written(done=tuple(done), revisions=revisions, conflicts=tuple(conflicts))


def write_record(
    etcd: Etcd,
    layout: keys.Layout,
    record: state.Record,
    *,
    seen_revision: int,
    fence: Lock | None = None,
) -> bool:
    """Write the applied record if nobody else wrote it since we read it."""
    t = etcd.transactions
    key = layout.applied_key
    compares = [t.mod(key) == seen_revision]
    if fence is not None:
        compares.append(fence.compare())
    ok, _ = etcd.transaction(compare=compares, success=[t.put(key, record.encode())], failure=[])
    return bool(ok)


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
    and applies, bound to a lease so a crashed holder frees it after `ttl` seconds.
    Created with a compare on create_revision == 0: at most one holder at a time.

    Its value names the holder (`Holder`). A lock whose holder is known to be gone
    (same host, process exited) is deleted at once instead of waiting out its lease,
    with a compare on its mod_revision so that only that very record is deleted. Even a
    wrong guess could not let two reconcilers write: every write also compares the
    lock's create_revision, so a holder whose lock was deleted can write nothing more."""

    def __init__(
        self,
        etcd: Etcd,
        layout: keys.Layout,
        *,
        ttl: int = 15,
        holder: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        start_of: Callable[[int], str | None] = process_start,
    ) -> None:
        self.etcd = etcd
        self.key = state.lock_key(layout)
        self.ttl = ttl
        self.me = this_process()
        # `holder` (tests) names an opaque holder that is never judged gone.
        self.value = holder.encode("utf-8") if holder is not None else self.me.encode()
        self.revision = 0
        self._lease: Any = None
        self._keepalive: threading.Thread | None = None
        self._stop_keepalive = threading.Event()
        self._clock = clock
        self._sleep = sleep
        self._start_of = start_of

    def acquire(
        self, *, timeout: float, poll: float = 0.1, cancel: threading.Event | None = None
    ) -> None:
        """Take the lock, waiting up to `timeout` seconds (or until `cancel` is set);
        LockTimeout names the holder."""
        t = self.etcd.transactions
        deadline = self._clock() + timeout
        self._lease = self.etcd.lease(self.ttl)
        who = "someone"
        waiting_logged = False
        while True:
            # Under the guard, so that no other pass of this process sees our new lock
            # before it is in _HELD (it would take it for one left by an earlier pass).
            with _HELD_GUARD:
                ok, responses = self.etcd.transaction(
                    compare=[t.create(self.key) == 0],
                    success=[t.put(self.key, self.value, lease=self._lease)],
                    failure=[t.get(self.key)],
                )
                if ok:
                    self.revision = int(responses[0].response_put.header.revision)
                    _HELD.add((self.key, self.revision))
            if ok:
                self._start_keepalive()
                return
            if responses and responses[0]:
                raw, meta = responses[0][0]
                holder = Holder.decode(raw)
                who = str(holder) if holder else (raw.decode("utf-8", "replace") or "someone")
                # Anyone who can write to etcd picks this value: one short printable line.
                who = gleam_render.printable(who if len(who) <= 100 else who[:97] + "...")
                if holder is not None and self._break_if_gone(holder, meta):
                    continue
            if not waiting_logged:
                log.info("apply lock %s is held by %s; waiting up to %gs", self.key, who, timeout)
                waiting_logged = True
            if self._clock() >= deadline or (cancel is not None and cancel.is_set()):
                self._revoke()
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

    def _break_if_gone(self, holder: Holder, meta: Any) -> bool:
        """Delete a lock left by a process that is known to have exited, or by an
        earlier pass of this process; True if it was deleted (try again at once)."""
        create = int(meta.create_revision)
        with _HELD_GUARD:
            left_by_us = holder == self.me and (self.key, create) not in _HELD
        if not left_by_us and not holder_gone(holder, self.me, self._start_of):
            return False
        t = self.etcd.transactions
        ok, _ = self.etcd.transaction(
            compare=[t.mod(self.key) == int(meta.mod_revision)],
            success=[t.delete(self.key)],
            failure=[],
        )
        if ok:
            why = "an earlier pass of this process" if left_by_us else "a process that has exited"
            log.warning(
                "broke the apply lock %s left by %s (%s) instead of waiting for its lease",
                self.key,
                holder,
                why,
            )
        return True

    def compare(self) -> Any:
        """A transaction compare that holds only while this lock is ours."""
        return self.etcd.transactions.create(self.key) == self.revision

    def held(self) -> bool:
        _value, meta = self.etcd.get(self.key)
        return meta is not None and int(meta.create_revision) == self.revision

    def _start_keepalive(self) -> None:
        """Refresh the lease every ttl/3 seconds while held, so a long apply keeps the
        lock; if the refresh fails for longer than the TTL the lock is lost and the
        fencing compare stops every further write."""
        self._stop_keepalive = threading.Event()
        lease, stop = self._lease, self._stop_keepalive

        def loop() -> None:
            while not stop.wait(self.ttl / 3):
                try:
                    leases.refresh(self.etcd, lease.id)
                except Exception as exc:  # noqa: BLE001 - keep trying until released
                    log.warning("could not refresh the apply lock's lease: %s", exc)

        self._keepalive = threading.Thread(target=loop, name="gleam-lock-keepalive", daemon=True)
        self._keepalive.start()

    def release(self) -> None:
        """Delete the key if it is still ours, and revoke the lease (best effort: the
        lease's expiry frees the lock anyway, and the next pass of this process, or on
        this host once this process has exited, breaks it at once)."""
        if self._keepalive is not None:
            self._stop_keepalive.set()
            self._keepalive.join(timeout=5)
            self._keepalive = None
        if self.revision:
            with _HELD_GUARD:
                _HELD.discard((self.key, self.revision))
            t = self.etcd.transactions
            try:
                self.etcd.transaction(
                    compare=[t.create(self.key) == self.revision],
                    success=[t.delete(self.key)],
                    failure=[],
                )
            except Exception as exc:  # noqa: BLE001 - never mask the pass's own error
                log.warning("could not release the apply lock (its lease will): %s", exc)
            self.revision = 0
        self._revoke()

    def _revoke(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            try:
                self.etcd.revoke_lease(lease.id)
            except Exception as exc:  # noqa: BLE001 - best effort; the TTL frees it
                log.debug("could not revoke lock lease: %s", exc)
