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


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc has no type hints
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT), store.Rejected),
        (FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED), store.Rejected),
        (FakeRpcError(grpc.StatusCode.OUT_OF_RANGE), store.Rejected),
        (FakeRpcError(grpc.StatusCode.PERMISSION_DENIED), store.Unavailable),
        (FakeRpcError(grpc.StatusCode.UNAUTHENTICATED), store.Unavailable),
        (FakeRpcError(grpc.StatusCode.UNAVAILABLE), store.Unavailable),
        (etcd_exceptions.ConnectionFailedError(), store.Unavailable),
        (etcd_exceptions.NoServerAvailableError("none"), store.Unavailable),
        (etcd_exceptions.WatchTimedOut(), store.Unavailable),
        (etcd_exceptions.RevisionCompactedError(42), store.Compacted),
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


def test_read_keys_and_put_many_handle_more_keys_than_one_transaction_takes(
    seam: store.Store, etcd: Any, layout: keys.Layout
) -> None:
    names = [layout.region_key(f"r{i}") for i in range(connection.MAX_TXN_OPS * 2 + 5)]
    present = names[::3]
    for start in range(0, len(present), connection.MAX_TXN_OPS):
        seam.put_many(
            [(key, key.encode()) for key in present[start : start + connection.MAX_TXN_OPS]]
        )
    snapshot = seam.read_keys(names)
    assert [o.key for o in snapshot.keys] == names
    for observed in snapshot.keys:
        if observed.key in present:
            assert observed.value == observed.key.encode()
            assert 0 < observed.revision <= snapshot.revision
        else:
            assert (observed.value, observed.revision) == (None, snapshot.revision)
