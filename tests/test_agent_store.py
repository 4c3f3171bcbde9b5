"""agent.store, the agent's seam to etcd: error translation (pure) and its reads, leases
and watches against a real etcd."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from pyetcd import exceptions as etcd_exceptions

from agent import store
from agent.pending import Observed
from gleam import connection, keys
from gleam.embedded import EtcdServer, free_port
from tests.support import wait_until


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc has no type hints
    def __init__(self, code: grpc.StatusCode, details: str = "details") -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT), store.Rejected),
        (FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED), store.Rejected),
        (FakeRpcError(grpc.StatusCode.OUT_OF_RANGE), store.Rejected),
        # Issue 12: a denied request is not retried forever (agent/preflight.py)
        (FakeRpcError(grpc.StatusCode.PERMISSION_DENIED), store.Denied),
        (FakeRpcError(grpc.StatusCode.UNAUTHENTICATED), store.Unavailable),
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE), store.Unavailable),
        (etcd_exceptions.ConnectionFailedError(), store.Unavailable),
        (etcd_exceptions.NoServerAvailableError("none"), store.Unavailable),
        (etcd_exceptions.WatchTimedOut(), store.Unavailable),
        (etcd_exceptions.RevisionCompactedError(42), store.Compacted),
        (FakeRpcError(grpc.StatusCode.NOT_FOUND, "requested lease not found"), store.LeaseNotFound),
        (FakeRpcError(grpc.StatusCode.NOT_FOUND), store.Unavailable),
    ],
)
def test_errors_are_translated_to_retry_or_not(error: BaseException, kind: type) -> None:
    translated = store.translate(error)
    assert type(translated) is kind
    if isinstance(translated, store.Compacted):
        assert translated.compacted_revision == 42


@pytest.fixture
def seam(etcd_server: EtcdServer) -> Iterator[store.Store]:
    etcd = store.Store(connection.make_settings(etcd_server.endpoint))
    yield etcd
    etcd.close()


def test_read_keys_gives_one_revision_for_present_and_absent_keys(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    a, b = layout.node_key("a"), layout.region_key("b")
    written = int(etcd.put(a, b"value").header.revision)
    snapshot = seam.read_keys([a, b])
    assert snapshot.revision >= written
    assert snapshot.keys == (Observed(a, written, b"value"), Observed(b, snapshot.revision, None))
    assert snapshot.current() == {a: written, b: None}


def test_keep_alive_says_when_a_lease_is_gone(seam: store.Store, etcd: Any) -> None:
    lease_id, granted = seam.grant_lease(5)
    assert granted == 5
    assert seam.keep_alive(lease_id) > 0
    seam.revoke_lease(lease_id)
    assert seam.keep_alive(lease_id) <= 0


def test_watch_delivers_changes_and_deletes_and_refuses_a_compacted_start(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    key = layout.node_key("w")
    inbox: queue.Queue[store.WatchMessage] = queue.Queue()
    start = int(etcd.put(key, b"1").header.revision)
    seam.watch(key, start_revision=start, generation=7, deliver=inbox.put)
    deleted = int(etcd.delete(key, return_response=True).header.revision)
    changes: list[Observed] = []
    while len(changes) < 2:
        message = inbox.get(timeout=10)
        assert isinstance(message, store.WatchBatch) and message.generation == 7
        changes.extend(message.changes)
    assert changes == [Observed(key, start, b"1"), Observed(key, deleted, None)]

    compacted = int(etcd.put(layout.node_key("other"), b"x").header.revision)
    etcd.compact(compacted)
    # etcd answers a compacted start either at creation or right after it, by cancelling
    # the watch; the seam turns both into Compacted.
    late: queue.Queue[store.WatchMessage] = queue.Queue()
    try:
        seam.watch(key, start_revision=start, generation=8, deliver=late.put)
    except store.Compacted as exc:
        assert exc.compacted_revision == compacted
    else:
        message = late.get(timeout=10)
        assert isinstance(message, store.WatchBroken) and message.generation == 8
        assert isinstance(message.error, store.Compacted)
        assert message.error.compacted_revision == compacted


def test_an_unreachable_etcd_is_unavailable() -> None:
    dead = store.Store(connection.make_settings(f"http://127.0.0.1:{free_port()}", timeout=1.0))
    with pytest.raises(store.Unavailable):
        dead.read_keys(["/x"])
    dead.close()


def test_read_keys_and_put_guarded_handle_more_keys_than_one_transaction_takes(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    names = [layout.region_key(f"r{i}") for i in range(connection.MAX_TXN_OPS * 2 + 5)]
    present = names[::3]
    for start in range(0, len(present), connection.MAX_TXN_OPS):
        chunk = present[start : start + connection.MAX_TXN_OPS]
        assert seam.put_guarded([store.Guarded(key, key.encode(), 0) for key in chunk]).ok
    snapshot = seam.read_keys(names)
    assert [o.key for o in snapshot.keys] == names
    for observed in snapshot.keys:
        if observed.key in present:
            assert observed.value == observed.key.encode()
            assert 0 < observed.revision <= snapshot.revision
        else:
            assert (observed.value, observed.revision) == (None, snapshot.revision)


def test_put_guarded_writes_all_or_nothing_and_says_what_changed(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    a, b = layout.node_key("a"), layout.node_key("b")
    first = seam.put_guarded([store.Guarded(a, b"1", 0), store.Guarded(b, b"1", 0)])
    assert first.ok and first.revision == int(etcd.get(a)[1].mod_revision)
    assert int(etcd.get(b)[1].mod_revision) == first.revision
    # Someone else writes b: a batch still guarded by b's old revision writes nothing.
    other = int(etcd.put(b, b"theirs").header.revision)
    stale = seam.put_guarded(
        [store.Guarded(a, b"2", first.revision), store.Guarded(b, b"2", first.revision)]
    )
    assert not stale.ok
    assert stale.current == {a: first.revision, b: other}
    assert (etcd.get(a)[0], etcd.get(b)[0]) == (b"1", b"theirs")
    # "Must not exist" (0) fails on a key that exists, and reads 0 for one that does not.
    gone = layout.node_key("gone")
    refused = seam.put_guarded([store.Guarded(a, b"3", 0), store.Guarded(gone, b"3", 0)])
    assert (refused.ok, refused.current) == (False, {a: first.revision, gone: 0})
    assert seam.read_records([a, gone]) == {a: (b"1", first.revision), gone: (None, 0)}


def test_a_replayed_guarded_write_fails_once_the_key_moved_on(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    """What a late write is: the same request, applied after a newer write."""
    key = layout.node_key("late")
    late = [store.Guarded(key, b"old run", 0)]
    newer = seam.put_guarded([store.Guarded(key, b"newer run", 0)])
    assert newer.ok
    assert not seam.put_guarded(late).ok
    assert etcd.get(key)[0] == b"newer run"


def test_a_put_bound_to_a_revoked_lease_fails_and_writes_nothing(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    """The registration's second guard: a late put whose lease is gone is refused by
    etcd even when its compare holds, so it cannot bring a dead agent's record back."""
    key = layout.info_key("gone")
    lease_id, _ttl = seam.grant_lease(30)
    seam.revoke_lease(lease_id)
    with pytest.raises(store.LeaseNotFound):
        seam.put_guarded([store.Guarded(key, b"late", 0, lease_id)])
    assert etcd.get(key)[0] is None
    with pytest.raises(store.LeaseNotFound):
        seam.put_guarded([store.Guarded(key, b"late", 0, 0x7FFF_FFFF_FFFF)])  # never granted


def test_put_guarded_takes_one_to_max_txn_ops_keys(seam: store.Store) -> None:
    with pytest.raises(ValueError, match="put_guarded"):
        seam.put_guarded([])
    too_many = [store.Guarded(f"/k{i}", b"", 0) for i in range(connection.MAX_TXN_OPS + 1)]
    with pytest.raises(ValueError, match="put_guarded"):
        seam.put_guarded(too_many)


def test_a_put_bound_to_an_expired_lease_fails_too(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    key = layout.info_key("expired")
    lease_id, _ttl = seam.grant_lease(1)  # etcd may round a short TTL up to its minimum
    wait_until(lambda: etcd.get_lease_info(lease_id).TTL < 0, what="the lease to expire")
    with pytest.raises(store.LeaseNotFound):
        seam.put_guarded([store.Guarded(key, b"late", 0, lease_id)])
    assert etcd.get(key)[0] is None


def test_a_scripts_first_call_skips_a_dead_endpoint(
    etcd_server: EtcdServer, layout: keys.Layout
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = connection.make_settings(f"{dead},{etcd_server.endpoint}", timeout=2.0)
    kv = store.EtcdKV(store.LazyClient(settings))
    # The first client starts on the dead endpoint: the call moves on, the script never
    # sees the failure.
    kv.set(layout.prefix + "/kv", "v", None)
    assert kv.get(layout.prefix + "/kv") == "v"
    # With no endpoint answering, the error does reach the script, after one try each.
    nobody = connection.make_settings(f"{dead},http://127.0.0.1:{free_port()}", timeout=2.0)
    with pytest.raises(store.KVError, match="UNAVAILABLE|ConnectionFailed|Unavailable"):
        store.EtcdKV(store.LazyClient(nobody)).get("/x")
