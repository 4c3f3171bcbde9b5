"""The apply lock's holder record, and breaking a lock whose holder is known to be gone
(and only then). Real etcd."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from gleam import keys
from gleam.embedded import EtcdServer
from reconciler import sync
from tests.support import client_for, wait_until

HERE = sync.Holder("build-7", 4242, "pid:[4026531836]", "1000")


@pytest.mark.parametrize(
    ("holder", "start_now", "gone"),
    [
        (HERE, None, True),  # no process with that pid any more
        (HERE, "2000", True),  # the pid now belongs to a later process
        (HERE, "1000", False),  # still running
        (HERE, "", False),  # /proc cannot say
        (sync.Holder("other-host", 4242, HERE.pidns, "1000"), None, False),
        (sync.Holder("build-7", 4242, "pid:[999]", "1000"), None, False),  # another container
        (sync.Holder("build-7", 4242, HERE.pidns, ""), "2000", False),  # start unknown: alive
        (sync.Holder("build-7", 4242, HERE.pidns, ""), None, True),
    ],
)
def test_a_holder_is_gone_only_when_this_host_knows_its_process_exited(
    holder: sync.Holder, start_now: str | None, gone: bool
) -> None:
    here = sync.Holder("build-7", 1, HERE.pidns, "5")
    assert sync.holder_gone(holder, here, lambda pid: start_now) is gone


def test_without_a_pid_namespace_no_holder_is_ever_judged_gone() -> None:
    here = sync.Holder("build-7", 1, "", "")
    assert not sync.holder_gone(sync.Holder("build-7", 4242), here, lambda pid: None)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"build-7-4242",  # the value older versions wrote
        b"\xff\xfe",
        b"[]",
        b'{"host": "h"}',
        b'{"host": "h", "pid": "12"}',
        b'{"host": "h", "pid": 0}',
        b'{"host": "h", "pid": true}',
        b'{"host": 5, "pid": 12}',
        b'{"host": "h", "pid": 12, "start": 9}',
        b'{"host": "h", "pid": 1e400}',
    ],
)
def test_a_lock_value_that_names_no_holder_is_never_broken(raw: bytes) -> None:
    assert sync.Holder.decode(raw) is None


def test_the_holder_record_round_trips() -> None:
    me = sync.this_process()
    assert sync.Holder.decode(me.encode()) == me
    assert me.start == sync.process_start(me.pid) != ""


def _hold(etcd: Any, layout: keys.Layout, holder: sync.Holder, *, ttl: int = 60) -> int:
    """A lock record for `holder` on a long lease, as a crashed holder leaves it."""
    lease = etcd.lease(ttl)
    etcd.put(layout.lock_key, holder.encode(), lease=lease)
    return int(lease.id)


def test_a_lock_left_by_an_exited_process_on_this_host_is_taken_at_once(
    etcd: Any, layout: keys.Layout
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = sync.this_process()
    _hold(etcd, layout, sync.Holder(me.host, dead.pid, me.pidns, "1"))
    lock = sync.Store.over(etcd, layout).lock(ttl=5)
    started = time.monotonic()
    lock.acquire(timeout=30)
    try:
        assert time.monotonic() - started < 5
        assert lock.held()
    finally:
        lock.release()


def test_a_lock_held_by_a_live_process_is_waited_for(etcd: Any, layout: keys.Layout) -> None:
    alive = subprocess.Popen(["sleep", "60"])
    try:
        me = sync.this_process()
        start = sync.process_start(alive.pid)
        assert start
        _hold(etcd, layout, sync.Holder(me.host, alive.pid, me.pidns, start))
        with pytest.raises(sync.LockTimeout, match=f"held by {me.host} pid {alive.pid}"):
            sync.Store.over(etcd, layout).lock(ttl=5).acquire(timeout=0.5)
    finally:
        alive.kill()
        alive.wait()


def test_a_lock_this_process_could_not_release_is_taken_by_its_next_pass(
    private_etcd: EtcdServer, layout: keys.Layout
) -> None:
    """A daemon's pass fails while etcd restarts, and so does its release of the lock;
    etcd brings the lease back with its full TTL. The next pass, in the same process,
    knows the lock is no longer held by any pass of its own."""
    etcd = client_for(private_etcd.endpoint)
    try:
        first = sync.Store.over(etcd, layout).lock(ttl=30)
        first.acquire(timeout=5)
        private_etcd.kill()
        first.release()  # fails (logged): etcd is down
    finally:
        etcd.close()
    private_etcd.start()
    again = client_for(private_etcd.endpoint)  # the old one gave up on the endpoint
    try:
        wait_until(lambda: again.get(layout.lock_key)[0], what="the lock after restart")
        second = sync.Store.over(again, layout).lock(ttl=30)
        started = time.monotonic()
        second.acquire(timeout=60)
        assert time.monotonic() - started < 10
        second.release()
    finally:
        again.close()


def test_a_lock_held_by_another_pass_of_this_process_is_waited_for(
    etcd: Any, layout: keys.Layout
) -> None:
    held = sync.Store.over(etcd, layout).lock(ttl=30)
    held.acquire(timeout=5)
    try:
        with pytest.raises(sync.LockTimeout):
            sync.Store.over(etcd, layout).lock(ttl=30).acquire(timeout=0.5)
    finally:
        held.release()
