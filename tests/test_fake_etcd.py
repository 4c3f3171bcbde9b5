"""The in-memory etcd (gleam/fake_etcd.py) and a real etcd behind etcdapi.Pyetcd answer
the same cases the same way, so that tests of the pass on the fake stay true of etcd."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gleam import etcdapi, keys
from gleam.etcdapi import Compare, Delete, Get, Put, Range, Target
from gleam.fake_etcd import FakeEtcd


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["fake", "real"])
def backend(request: pytest.FixtureRequest) -> Iterator[etcdapi.Backend]:
    if request.param == "fake":
        yield FakeEtcd(clock=Clock())
    else:
        yield etcdapi.Pyetcd(request.getfixturevalue("etcd"))


def put(backend: etcdapi.Backend, key: str, value: bytes) -> int:
    return backend.txn([], [Put(key, value)]).revision


def one(backend: etcdapi.Backend, key: str) -> etcdapi.KeyValue | None:
    return etcdapi.get_one(backend, key)


def test_writes_bump_the_revision_and_keep_the_create_revision(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    key = layout.prefix + "/a"
    first = put(backend, key, b"1")
    assert first > 0 and backend.range(Range(key)).revision == first
    kv = one(backend, key)
    assert kv is not None and (kv.value, kv.mod_revision, kv.create_revision) == (
        b"1",
        first,
        first,
    )
    second = put(backend, key, b"2")
    assert second == first + 1
    kv = one(backend, key)
    assert kv is not None and (kv.mod_revision, kv.create_revision) == (second, first)


def test_a_read_only_transaction_does_not_bump_the_revision(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    key = layout.prefix + "/a"
    written = put(backend, key, b"1")
    result = backend.txn([], [Get(key), Get(layout.prefix + "/missing")])
    assert result.succeeded and result.revision == 0
    assert [[kv.value for kv in got] for got in result.gets] == [[b"1"], []]
    assert backend.range(Range(key)).revision == written


def test_a_stale_mod_revision_fails_the_guard_writes_nothing_and_runs_failure(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    key, other = layout.prefix + "/a", layout.prefix + "/b"
    seen = put(backend, key, b"1")
    put(backend, key, b"2")
    result = backend.txn([Compare(key, Target.MOD, seen)], [Put(other, b"x")], [Get(key)])
    assert not result.succeeded and result.revision == 0
    assert [kv.value for kv in result.gets[0]] == [b"2"]
    assert one(backend, other) is None
    current = one(backend, key)
    assert current is not None
    ok = backend.txn([Compare(key, Target.MOD, current.mod_revision)], [Put(other, b"x")])
    assert ok.succeeded and ok.revision == current.mod_revision + 1


def test_revision_zero_means_absent_for_mod_and_create(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    key = layout.prefix + "/a"
    for target in Target:
        assert backend.txn([Compare(key, target, 0)], []).succeeded
    created = put(backend, key, b"1")
    put(backend, key, b"2")
    assert not backend.txn([Compare(key, Target.CREATE, 0)], []).succeeded
    assert backend.txn([Compare(key, Target.CREATE, created)], []).succeeded
    backend.txn([], [Delete(key)])
    assert backend.txn([Compare(key, Target.MOD, 0)], []).succeeded
    # Created again: a new create_revision (what fences a lock held before).
    again = put(backend, key, b"3")
    assert not backend.txn([Compare(key, Target.CREATE, created)], []).succeeded
    assert backend.txn([Compare(key, Target.CREATE, again)], []).succeeded


def test_prefix_reads_are_sorted_and_can_be_keys_only_or_a_count(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    head = layout.prefix + "/dir/"
    for name in ("b", "a", "c"):
        put(backend, head + name, name.encode())
    put(backend, layout.prefix + "/dirt", b"not under dir/")
    got = backend.range(Range(head, prefix=True))
    assert [(kv.key, kv.value) for kv in got.kvs] == [
        (f"{head}{n}".encode(), n.encode()) for n in "abc"
    ]
    assert got.count == 3
    assert [kv.value for kv in backend.range(Range(head, prefix=True, keys_only=True)).kvs] == [
        b""
    ] * 3
    counted = backend.range(Range(head, prefix=True, count_only=True))
    assert (counted.kvs, counted.count) == ((), 3)


def test_a_read_at_a_past_revision_sees_the_past(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    head = layout.prefix + "/"
    put(backend, head + "a", b"old")
    then = put(backend, head + "b", b"b")
    put(backend, head + "a", b"new")
    backend.txn([], [Delete(head + "b")])
    past = backend.range(Range(head, prefix=True, revision=then))
    assert [(kv.key, kv.value) for kv in past.kvs] == [
        ((head + "a").encode(), b"old"),
        ((head + "b").encode(), b"b"),
    ]
    assert [kv.value for kv in backend.range(Range(head, prefix=True)).kvs] == [b"new"]


def test_a_revoked_lease_takes_its_keys_and_cannot_be_kept_alive(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    key = layout.prefix + "/leased"
    lease, granted = backend.grant_lease(30)
    assert granted == 30
    assert backend.keep_alive(lease) > 0
    written = backend.txn([], [Put(key, b"mine", lease=lease)]).revision
    backend.revoke_lease(lease)
    assert one(backend, key) is None
    assert backend.range(Range(key)).revision == written + 1  # the deletion is a revision
    assert backend.keep_alive(lease) <= 0


def test_a_put_with_an_unknown_lease_is_an_error(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    with pytest.raises(etcdapi.EtcdError, match="lease not found"):
        backend.txn([], [Put(layout.prefix + "/x", b"", lease=0x7FFF_0000_0001)])
    # The whole transaction is refused: a put before the bad one is not applied either.
    before = put(backend, layout.prefix + "/before", b"1")
    with pytest.raises(etcdapi.EtcdError, match="lease not found"):
        backend.txn(
            [],
            [
                Put(layout.prefix + "/y", b"1"),
                Put(layout.prefix + "/x", b"", lease=0x7FFF_0000_0001),
            ],
        )
    assert backend.range(Range(layout.prefix, True)).revision == before
    put(backend, layout.prefix + "/after", b"1")  # the next write's revision shows no "y"
    assert one(backend, layout.prefix + "/y") is None


def test_transactions_in_flight_are_each_all_or_nothing_and_an_error_comes_when_waited_for(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    """Two guarded creates of one key in flight at once (etcd may apply them in either
    order): exactly one is written; an error is raised by the wait, not the send."""
    key = layout.prefix + "/flight"
    one_way = backend.txn_start([Compare(key, Target.MOD, 0)], [Put(key, b"1")])
    other = backend.txn_start([Compare(key, Target.MOD, 0)], [Put(key, b"2")])
    bad = backend.txn_start([], [Put(key + "-x", b"", lease=0x7FFF_0000_0001)])
    answers = {b"1": one_way(), b"2": other()}
    won = [value for value, answer in answers.items() if answer.succeeded]
    assert len(won) == 1
    with pytest.raises(etcdapi.EtcdError, match="lease not found"):
        bad()
    found = one(backend, key)
    assert found is not None and found.value == won[0]
    assert found.mod_revision == answers[won[0]].revision


# The fake alone: its TTLs run on the injected clock.


def test_an_expired_lease_deletes_its_keys_at_a_new_revision(layout: keys.Layout) -> None:
    clock = Clock()
    fake: Any = FakeEtcd(clock=clock)
    lease, _ = fake.grant_lease(10)
    written = fake.txn([], [Put("/k", b"v", lease=lease)]).revision
    clock.now += 9
    assert fake.keep_alive(lease) == 10  # refreshed: another 10 s from now
    clock.now += 9.5
    assert one(fake, "/k") is not None
    clock.now += 1
    assert one(fake, "/k") is None
    assert fake.range(Range("/k")).revision == written + 1
    assert fake.keep_alive(lease) <= 0


def test_deleting_an_absent_key_changes_nothing_and_bumps_no_revision(
    backend: etcdapi.Backend, layout: keys.Layout
) -> None:
    key = layout.prefix + "/absent"
    before = put(backend, layout.prefix + "/other", b"x")
    result = backend.txn([], [Delete(key)])
    assert result.succeeded
    assert backend.range(Range(layout.prefix, True)).revision == before
    # A delete that removes something does take a revision, as a write.
    assert backend.txn([], [Delete(layout.prefix + "/other")]).revision == before + 1
