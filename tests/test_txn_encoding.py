"""etcdapi.encode_txn writes etcd's TxnRequest straight to protobuf wire bytes: exactly the
bytes protobuf's own encoder gives for the same request on any input, and a wrong field
number in the encoder is caught. A real etcd takes the bytes through
connection.start_txn: guards, revisions, gets, and endpoint failover."""

from __future__ import annotations

import dataclasses
import re
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyetcd import etcdrpc

from gleam import connection, etcdapi, keys
from gleam.embedded import EtcdServer, free_port
from gleam.etcdapi import Compare, Delete, Get, Op, Put, Range, Target
from reconciler import diff, sync

# The reference: the request built from etcd's protobuf classes by field *name*, as
# gleam.etcdapi did before it wrote the bytes itself.


def reference_bytes(
    module: Any, compares: Sequence[Any], success: Sequence[Any], failure: Sequence[Any]
) -> bytes:
    def key(value: Any) -> bytes:
        return bytes(value.key.encode("utf-8", "surrogateescape"))

    def compare(c: Any) -> Any:
        if c.target is module.Target.MOD:
            return etcdrpc.Compare(
                key=key(c), result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.MOD,
                mod_revision=c.revision,
            )  # fmt: skip
        return etcdrpc.Compare(
            key=key(c), result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.CREATE,
            create_revision=c.revision,
        )  # fmt: skip

    def request_op(op: Any) -> Any:
        if type(op) is module.Put:
            put = etcdrpc.PutRequest(key=key(op), value=op.value, lease=op.lease)
            return etcdrpc.RequestOp(request_put=put)
        if type(op) is module.Get:
            return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key(op)))
        return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key(op)))

    request = etcdrpc.TxnRequest(
        compare=[compare(c) for c in compares],
        success=[request_op(op) for op in success],
        failure=[request_op(op) for op in failure],
    )
    return bytes(request.SerializeToString())


def encodes_as_protobuf(
    module: Any, compares: Sequence[Any], success: Sequence[Any], failure: Sequence[Any]
) -> bool:
    """Whether `module.encode_txn` gives protobuf's bytes for this request."""
    encoded = module.encode_txn(compares, success, failure)
    return bool(encoded == reference_bytes(module, compares, success, failure))


# Arbitrary requests ------------------------------------------------------------------

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Where a varint gains a byte, and the ends of int64 (negative: 10 bytes).
VARINT_EDGES = [
    0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28, 2**35, 2**56 - 1, 2**56,
    2**63 - 1, -1, -128, INT64_MIN,
]  # fmt: skip
MAX_VALUE = 2 * 1024 * 1024
# Value lengths where the length's varint gains a byte, up to 2 MiB.
LENGTH_EDGES = [0, 1, 127, 128, 129, 16383, 16384, 2**21 - 1, MAX_VALUE]

revisions = st.sampled_from([n for n in VARINT_EDGES if n >= 0]) | st.integers(0, INT64_MAX)
leases = st.sampled_from(VARINT_EDGES) | st.integers(INT64_MIN, INT64_MAX)
names = st.text(max_size=40) | st.sampled_from(["", "/gleam/node/web-1", "/g/\udcff\udc80"])
# Large values are a repeated pattern: Hypothesis draws no megabytes of random bytes.
large_values = st.builds(
    lambda length, pattern: (pattern * (length // len(pattern) + 1))[:length],
    st.sampled_from(LENGTH_EDGES) | st.integers(0, MAX_VALUE),
    st.binary(min_size=1, max_size=8),
)
values = st.binary(max_size=300) | large_values
compares = st.builds(Compare, names, st.sampled_from(Target), revisions)
ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(Put, names, values, leases),
    st.builds(Put, names, st.just(b"")),
    st.builds(Get, names),
    st.builds(Delete, names),
)

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(
    compares=st.lists(compares, max_size=6),
    success=st.lists(ops, max_size=6),
    failure=st.lists(ops, max_size=6),
)
def test_the_encoder_gives_protobufs_bytes_for_any_request(
    compares: list[Compare], success: list[Op], failure: list[Op]
) -> None:
    assert encodes_as_protobuf(etcdapi, compares, success, failure)


@pytest.mark.parametrize("n", VARINT_EDGES)
def test_every_int64_edge_encodes_as_protobuf_does(n: int) -> None:
    success = [Put("/k", b"v", lease=n)]
    assert encodes_as_protobuf(etcdapi, [Compare("/k", Target.MOD, n)], success, [])


def test_an_empty_request_is_empty_bytes() -> None:
    assert etcdapi.encode_txn([], []) == b"" == reference_bytes(etcdapi, [], [], [])


@pytest.mark.parametrize("n", [2**63, -(2**63) - 1, 2**64])
def test_a_number_beyond_int64_is_refused_as_protobuf_refuses_it(n: int) -> None:
    with pytest.raises(ValueError, match="int64"):
        etcdapi.encode_txn([], [Put("/k", b"v", lease=n)])
    with pytest.raises(ValueError):
        reference_bytes(etcdapi, [], [Put("/k", b"v", lease=n)], [])


# The check can fail: every field number in the encoder, changed, is caught -----------

SOURCE = Path(etcdapi.__file__).read_text(encoding="utf-8")
FIELD_TAGS = list(re.finditer(r"^(_[A-Z_]+) = _tag\((\d+), (_LEN|_VARINT)\)$", SOURCE, re.M))


def mutant(monkeypatch: pytest.MonkeyPatch, source: str) -> Any:
    """gleam.etcdapi built from `source` as a module of its own."""
    module = types.ModuleType("gleam.etcdapi_mutant")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look it up
    exec(compile(source, "etcdapi_mutant.py", "exec"), module.__dict__)
    return module


def every_field(module: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """A request that holds every field the encoder writes, built from `module`'s types."""
    compares = [
        module.Compare("/g/a", module.Target.MOD, 300),
        module.Compare("/g/b", module.Target.CREATE, 0),
    ]
    success = [module.Put("/g/a", b"value", lease=7), module.Get("/g/b"), module.Delete("/g/c")]
    failure = [module.Get("/g/a"), module.Put("/g/d", b"x")]
    return compares, success, failure


def test_the_source_has_the_field_tags_the_mutation_test_changes() -> None:
    assert len(FIELD_TAGS) == 15
    assert {m.group(1) for m in FIELD_TAGS} >= {"_TXN_SUCCESS", "_COMPARE_KEY", "_PUT_LEASE"}


# Each field tag moved to the field number before and after it (there is no field 0).
MUTATIONS = [
    (m, number)
    for m in FIELD_TAGS
    for number in (int(m.group(2)) - 1, int(m.group(2)) + 1)
    if number >= 1
]


@pytest.mark.parametrize(
    ("tag", "number"), MUTATIONS, ids=[f"{m.group(1)}={n}" for m, n in MUTATIONS]
)
def test_a_wrong_field_number_fails_the_check(
    monkeypatch: pytest.MonkeyPatch, tag: re.Match[str], number: int
) -> None:
    wrong = f"{tag.group(1)} = _tag({number}, {tag.group(3)})"
    module = mutant(monkeypatch, SOURCE[: tag.start()] + wrong + SOURCE[tag.end() :])
    assert not encodes_as_protobuf(module, *every_field(module))
    # ... while the unchanged source, built the same way, passes it.
    same = mutant(monkeypatch, SOURCE)
    assert encodes_as_protobuf(same, *every_field(same))


def test_the_op_types_are_equal_only_within_one_type_and_hashable() -> None:
    # Slotted, not frozen, at run time (cheaper to build); equal only within one type.
    assert Get("/k") != Delete("/k") and Get("/k") == Get("/k")
    assert hash(Put("/k", b"v")) == hash(Put("/k", b"v"))
    assert not hasattr(Put("/k", b"v"), "__dict__")
    assert [f.name for f in dataclasses.fields(Put)] == ["key", "value", "lease"]


# A real etcd, through connection.start_txn --------------------------------------------


def test_a_guarded_transaction_on_etcd_writes_all_or_nothing(
    etcd: Any, layout: keys.Layout
) -> None:
    backend = etcdapi.Pyetcd(etcd)
    names = [f"{layout.prefix}/node/host-{i}-ü" for i in range(60)]
    big = bytes(range(256)) * 4096  # 1 MiB, a three-byte length
    seen = backend.txn([], [Put(names[0], b"first")]).revision

    stale = [Compare(names[0], Target.MOD, seen - 1)]
    writes: list[Op] = [Put(name, big if i == 1 else b"v") for i, name in enumerate(names)]
    failed = backend.txn(stale, writes, [Get(names[0]), Get(names[1])])
    assert not failed.succeeded and failed.revision == 0
    assert [[kv.value for kv in got] for got in failed.gets] == [[b"first"], []]
    after = backend.range(Range(layout.prefix, prefix=True))
    assert after.revision == seen and [kv.key for kv in after.kvs] == [names[0].encode()]

    guards = [Compare(names[0], Target.MOD, seen), Compare(names[1], Target.CREATE, 0)]
    done = backend.txn(guards, [*writes, Get(names[1])], [Get(names[0])])
    assert done.succeeded and done.revision == seen + 1
    assert [kv.value for kv in done.gets[0]] == [big]
    stored = backend.range(Range(layout.prefix, prefix=True))
    assert len(stored.kvs) == len(names) and stored.revision == done.revision
    assert {kv.mod_revision for kv in stored.kvs} == {done.revision}
    # Sent by our multicallable on the client's channel, not by pyetcd's stub.
    assert etcd.channel in connection._txn_calls


def test_a_plan_applies_on_etcd_with_the_revision_each_key_got(
    etcd: Any, layout: keys.Layout
) -> None:
    store = sync.Store.over(etcd, layout)
    changes = [
        diff.Change(diff.Action.CREATE, layout.node_key(f"web-{i:04d}"), new=b"x" * (i % 300))
        for i in range(400)
    ]
    written = store.apply_changes(changes, origin=b"commit-1")
    assert not written.conflicts and len(written.done) == len(changes)
    assert len(set(written.revisions.values())) == len(sync.batches(changes)) > 1
    state = store.read_all()
    for change in changes:
        assert state.actual[change.key].value == change.new
        assert state.actual[change.key].mod_revision == written.revisions[change.key]
        assert state.owned[change.key] == written.revisions[change.key]
    # Planned against the state before: every guard fails, nothing is written.
    again = store.apply_changes(changes, origin=b"commit-2")
    assert not again.done and len(again.conflicts) == len(changes)
    assert store.read_all() == state


def test_a_stray_record_whose_name_is_not_utf8_is_pruned(etcd: Any, layout: keys.Layout) -> None:
    raw = f"{layout.owned_prefix}node/web-\xff".encode("latin-1")
    etcd.put(raw, b"by hand")
    store = sync.Store.over(etcd, layout)
    state = store.read_all()
    plan = diff.plan({}, state.actual, state.owned, prune=True)
    assert [c.action for c in plan.changes] == [diff.Action.FORGET]
    written = store.apply_changes(plan.changes)
    assert written.done == plan.changes
    assert etcd.get(raw)[0] is None


def test_a_failed_over_client_sends_transactions_to_the_live_endpoint(
    etcd_server: EtcdServer, layout: keys.Layout
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings_ = connection.make_settings(f"http://{dead},{etcd_server.endpoint}", timeout=2.0)
    client = connection.connect(settings_, start=0)  # on the dead one
    try:
        assert client.endpoint_in_use.netloc == dead
        backend = etcdapi.Pyetcd(client)
        key = layout.prefix + "/failover"
        guarded = ([Compare(key, Target.CREATE, 0)], [Put(key, b"ok")])
        with pytest.raises(etcdapi.EtcdError, match="ConnectionFailedError"):
            backend.txn(*guarded)
        # pyetcd shuns the failed endpoint for a second; on a slow machine the dead one may
        # be tried again after that, and fail again: again until a deadline.
        deadline = time.monotonic() + 20
        while True:
            try:
                result = backend.txn(*guarded)
                break
            except etcdapi.EtcdError:
                if time.monotonic() > deadline:
                    pytest.fail("the transaction never reached the live endpoint")
        assert result.succeeded and result.revision > 0
        assert client.endpoint_in_use.netloc != dead
        assert client.channel in connection._txn_calls  # the live channel's own
        assert etcdapi.get_one(backend, key) is not None
    finally:
        client.close()


def _response(succeeded: bool, revision: int, *answers: Any) -> Any:
    return etcdrpc.TxnResponse(
        succeeded=succeeded, header=etcdrpc.ResponseHeader(revision=revision), responses=answers
    )


def test_an_answer_that_does_not_fit_the_transaction_is_refused() -> None:
    """etcd's answer is read against what was sent: one answer per operation, a read
    answered by a read (any other would read as an absent key)."""
    get, put = Get("/k"), Put("/k", b"v")
    kv = etcdrpc.kv_pb2.KeyValue(key=b"/k", value=b"v", mod_revision=7, create_revision=5)
    read = etcdrpc.ResponseOp(response_range=etcdrpc.RangeResponse(kvs=[kv]))
    wrote = etcdrpc.ResponseOp(response_put=etcdrpc.PutResponse())
    fine = etcdapi._txn_result(_response(True, 9, wrote, read), [put, get], [])
    assert fine == etcdapi.TxnResult(True, 9, ((etcdapi.KeyValue(b"/k", b"v", 7, 5),),))
    with pytest.raises(etcdapi.EtcdError, match="answered 1 operations of a transaction"):
        etcdapi._txn_result(_response(True, 9, wrote), [put, get], [])
    with pytest.raises(etcdapi.EtcdError, match="answered a read of '/k' with something"):
        etcdapi._txn_result(_response(True, 9, wrote, wrote), [put, get], [])
    assert etcdapi._txn_result(_response(False, 9), [put], []) == etcdapi.TxnResult(False, 0, ())
