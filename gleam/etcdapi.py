"""The small etcd API the reconciler's seam (and the lease session) speak: typed reads,
compares, operations and results, with two implementations of `Backend`: `Pyetcd`
over a connected pyetcd client (errors translated once, here, into `EtcdError`), and
`gleam.fake_etcd.FakeEtcd` in memory for fast tests (checked against a real etcd by
tests/test_fake_etcd.py with the same cases, so the two cannot drift apart).

Only what Gleam uses is here: equality compares on mod_revision and create_revision,
put/get/delete of single keys, prefix ranges (optionally at a past revision, keys only
or a count), and leases.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, dataclass_transform

from pyetcd import etcdrpc

from gleam import connection


class EtcdError(Exception):
    """etcd could not be reached or refused a request; the text says what."""


def pyetcd_error(exc: BaseException) -> BaseException:
    """The pyetcd (or gRPC) error an EtcdError from `Pyetcd` wraps (its cause), else
    `exc` itself. Callers that speak pyetcd need the original: what they say depends on
    its class and gRPC code (connection.describe_error, and gleam-client's "cannot reach
    etcd" for an unreachable one), and their `except connection.ETCD_ERRORS` catches it
    where it would miss an EtcdError. An EtcdError without one (gleam.fake_etcd's, or a
    malformed answer) is the error itself."""
    if isinstance(exc, EtcdError) and isinstance(exc.__cause__, connection.ETCD_ERRORS):
        return exc.__cause__
    return exc


@contextmanager
def pyetcd_errors() -> Iterator[None]:
    """Code over `Pyetcd` whose callers catch pyetcd's errors (connection.ETCD_ERRORS),
    as they did before it spoke this API (gleam.client, the rollout driver): raise
    the pyetcd error an EtcdError wraps (see pyetcd_error) instead."""
    try:
        yield
    except EtcdError as exc:
        original = pyetcd_error(exc)
        if original is exc:
            raise
        raise original from None


class KeyValue(NamedTuple):
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


class Target(enum.Enum):
    MOD = "mod"
    CREATE = "create"


_T = TypeVar("_T")


@dataclass_transform(frozen_default=True)
def _txn_value(cls: type[_T]) -> type[_T]:
    """A dataclass for the compares and operations of transactions: frozen for the type
    checker (mypy refuses any assignment to a field), a plain slotted dataclass at run
    time, which is about three times cheaper to create than a frozen one (a
    10,000-manifest apply creates 40,000). Equal and hashed by value and type, as a
    frozen dataclass: Get("k") != Delete("k")."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@_txn_value
class Compare:
    """Holds when the key's mod_revision (or create_revision) equals `revision`; 0 for
    a key that does not exist."""

    key: str
    target: Target
    revision: int


@_txn_value
class Put:
    key: str
    value: bytes
    lease: int = 0


@_txn_value
class Get:
    key: str


@_txn_value
class Delete:
    key: str


Op = Put | Get | Delete


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held; `revision` is the revision of the branch's write (0
    when it wrote nothing); `gets` has one list per Get of the branch taken, in order."""

    succeeded: bool
    revision: int
    gets: tuple[tuple[KeyValue, ...], ...]


@dataclass(frozen=True)
class Range:
    """A read of one key, or of every key under a prefix; at a past revision (0: now),
    keys without values, or only their count."""

    key: str
    prefix: bool = False
    revision: int = 0
    keys_only: bool = False
    count_only: bool = False


@dataclass(frozen=True)
class RangeResult:
    revision: int  # the store's revision the range was read at
    kvs: tuple[KeyValue, ...]
    count: int


class Backend(Protocol):
    def range(self, query: Range) -> RangeResult: ...

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult: ...

    def txn_start(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> Callable[[], TxnResult]:
        """Send a transaction without waiting for it: the returned function waits for its
        result (and raises its error). `txn` is `txn_start(...)()`."""
        ...

    # The lease calls have the names and shapes of agent/store.Store's, so that the
    # lease session (gleam/lease.py) works over either.
    def grant_lease(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL)."""
        ...

    def keep_alive(self, lease: int) -> int:
        """Refresh a lease; its TTL now, 0 or less when etcd no longer has it."""
        ...

    def revoke_lease(self, lease: int) -> None: ...


def get_one(backend: Backend, key: str) -> KeyValue | None:
    found = backend.range(Range(key))
    return found.kvs[0] if found.kvs else None


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except connection.ETCD_ERRORS as exc:
        raise EtcdError(connection.describe_error(exc)) from exc


def _txn_result(response: Any, success: Sequence[Op], failure: Sequence[Op]) -> TxnResult:
    """A TxnResponse as a TxnResult, for the branch it took."""
    succeeded = bool(response.succeeded)
    branch = success if succeeded else failure
    if len(response.responses) != len(branch):
        raise EtcdError(
            f"etcd answered {len(response.responses)} operations of a transaction "
            f"that had {len(branch)}"
        )
    # Every write of a transaction gets one revision: the transaction's, in its
    # header (the per-operation answers of a 126-put batch are not looked at; the
    # header's revision without a write is the store's, not a write's). One answer
    # per operation, in order.
    writes = any(type(op) is not Get for op in branch)
    gets = []
    for op, answer in zip(branch, response.responses, strict=True):
        if type(op) is not Get:
            continue
        # Any other answer would read as an absent key (protobuf's empty default).
        if answer.WhichOneof("response") != "response_range":
            raise EtcdError(f"etcd answered a read of {op.key!r} with something else")
        gets.append(
            tuple(
                KeyValue(kv.key, kv.value, int(kv.mod_revision), int(kv.create_revision))
                for kv in answer.response_range.kvs
            )
        )
    return TxnResult(succeeded, int(response.header.revision) if writes else 0, tuple(gets))


class Pyetcd:
    """`Backend` over a connected pyetcd client (connection.connect)."""

    def __init__(self, client: connection.Client) -> None:
        self.client = client

    def range(self, query: Range) -> RangeResult:
        options: dict[str, Any] = {"keys_only": query.keys_only, "count_only": query.count_only}
        if query.revision:
            options["revision"] = query.revision
        read = self.client.get_prefix_response if query.prefix else self.client.get_response
        # A read that got no answer is sent again, once per other endpoint: pyetcd has
        # moved to the next one when the call failed (a member down in the middle of a
        # pass need not fail it). Reads only: a write whose answer was lost may still
        # be applied, and is for its caller's guard to settle.
        tries = len(getattr(self.client, "endpoints", None) or (None,))
        while True:
            tries -= 1
            try:
                with _translated():
                    response = read(query.key, **options)
                break
            except EtcdError as exc:
                if tries <= 0 or not connection.unreachable(pyetcd_error(exc)):
                    raise
        # Raw protobuf responses, not pyetcd's per-key objects: 10,000 keys in a few
        # tens of milliseconds.
        kvs = tuple(
            KeyValue(kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in response.kvs
        )
        return RangeResult(int(response.header.revision), kvs, int(response.count))

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        return self.txn_start(compares, success, failure)()

    def txn_start(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> Callable[[], TxnResult]:
        request = encode_txn(compares, success, failure)
        with _translated():
            answer = connection.start_txn(self.client, request)

        def result() -> TxnResult:
            with _translated():
                response = answer()
            return _txn_result(response, success, failure)

        return result

    def grant_lease(self, ttl: int) -> tuple[int, int]:
        with _translated():
            lease = self.client.lease(ttl)
        return int(lease.id), int(lease.ttl)

    def keep_alive(self, lease: int) -> int:
        with _translated():
            return connection.refresh_lease(self.client, lease)  # also through grpc-proxy

    def revoke_lease(self, lease: int) -> None:
        with _translated():
            self.client.revoke_lease(lease)


# etcd's TxnRequest, encoded straight to protobuf wire bytes -------------------------------
# A 10,000-manifest apply sends 40,000 operations and compares: building etcdrpc objects
# for them and serializing those took about twice the CPU of writing the bytes here.
# tests/test_txn_encoding.py checks on arbitrary input that the bytes are exactly what
# `etcdrpc.TxnRequest(...).SerializeToString()` gives, and tests/test_fake_etcd.py runs
# every case on a real etcd through this path.
#
# The wire format: each field is a tag, (field number << 3) | wire type, then its value:
# a varint (wire type 0) or a length varint and that many bytes (wire type 2: bytes,
# strings and embedded messages). Fields go in field-number order, and fields holding
# their default (0, empty) are left out, except the members of a oneof, which are sent
# even when 0 (as protobuf's own encoder, upb, does). The field numbers are those of
# etcd's api/etcdserverpb/rpc.proto.
#
# Keys are encoded with surrogateescape: a key read from etcd that is not UTF-8 was
# decoded with it (reconciler.sync), and goes back as the very bytes etcd holds, so that
# a stray ownership record under such a name is pruned instead of failing the apply.

_VARINT, _LEN = 0, 2


def _tag(field: int, wire_type: int) -> bytes:
    return bytes((field << 3 | wire_type,))


# TxnRequest: repeated Compare compare = 1; repeated RequestOp success = 2, failure = 3.
_TXN_COMPARE = _tag(1, _LEN)
_TXN_SUCCESS = _tag(2, _LEN)
_TXN_FAILURE = _tag(3, _LEN)
# Compare: CompareResult result = 1 (always EQUAL, 0: the default, never sent);
# CompareTarget target = 2; bytes key = 3; oneof target_union { int64 version = 4;
# int64 create_revision = 5; int64 mod_revision = 6; ... }.
_COMPARE_TARGET = _tag(2, _VARINT)
_COMPARE_KEY = _tag(3, _LEN)
_COMPARE_CREATE_REVISION = _tag(5, _VARINT)
_COMPARE_MOD_REVISION = _tag(6, _VARINT)
# RequestOp: oneof request { RangeRequest request_range = 1; PutRequest request_put = 2;
# DeleteRangeRequest request_delete_range = 3; ... }.
_OP_RANGE = _tag(1, _LEN)
_OP_PUT = _tag(2, _LEN)
_OP_DELETE = _tag(3, _LEN)
# PutRequest: bytes key = 1; bytes value = 2; int64 lease = 3. RangeRequest and
# DeleteRangeRequest: bytes key = 1 (no range_end: single keys only).
_PUT_KEY = _tag(1, _LEN)
_PUT_VALUE = _tag(2, _LEN)
_PUT_LEASE = _tag(3, _VARINT)
_RANGE_KEY = _tag(1, _LEN)
_DELETE_KEY = _tag(1, _LEN)

_ONE_BYTE = tuple(bytes((n,)) for n in range(0x80))  # the varints of 0..127
_INT64 = 1 << 63


def _varint(n: int) -> bytes:
    """An int64 as a protobuf varint: 7 bits a byte, low bits first, the high bit of each
    byte but the last set. A negative number is its 64-bit two's complement (10 bytes)."""
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]  # the length of a key, and of most compares and operations
    if 0 < n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))  # the length of most values
    if not -_INT64 <= n < _INT64:
        raise ValueError(f"{n} is out of range for an int64 protobuf field")
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


# Compare's target (field 2) and the tag of the revision field it compares; result
# (field 1) is EQUAL, 0, so not sent.
_BY_MOD = (_COMPARE_TARGET + _varint(etcdrpc.Compare.MOD), _COMPARE_MOD_REVISION)
_BY_CREATE = (_COMPARE_TARGET + _varint(etcdrpc.Compare.CREATE), _COMPARE_CREATE_REVISION)
_MOD = Target.MOD  # bound once: looking up an enum's member costs more than the test


def _compare_field(c: Compare) -> bytes:
    """TxnRequest's compare field holding `c`."""
    target, revision_tag = _BY_MOD if c.target is _MOD else _BY_CREATE
    key = c.key.encode("utf-8", "surrogateescape")
    body = target + _delimited(_COMPARE_KEY, key) if key else target
    # The revision is a oneof member: sent even when 0 ("the key does not exist").
    return _delimited(_TXN_COMPARE, body + revision_tag + _varint(c.revision))


def _op_field(tag: bytes, op: Op) -> bytes:
    """TxnRequest's success or failure field (`tag`) holding a RequestOp of one Put, Get
    (a RangeRequest) or Delete (a DeleteRangeRequest); the request is a oneof member, so
    it is sent even when empty."""
    key = op.key.encode("utf-8", "surrogateescape")
    if type(op) is Put:
        # _delimited written out: this is the hottest path (half the items of an apply).
        value = op.value
        body = _PUT_KEY + _varint(len(key)) + key if key else b""
        if value:
            body += _PUT_VALUE + _varint(len(value)) + value
        if op.lease:
            body += _PUT_LEASE + _varint(op.lease)
        request = _OP_PUT + _varint(len(body)) + body
    elif type(op) is Get:
        request = _delimited(_OP_RANGE, _delimited(_RANGE_KEY, key) if key else b"")
    else:
        request = _delimited(_OP_DELETE, _delimited(_DELETE_KEY, key) if key else b"")
    return tag + _varint(len(request)) + request


def encode_txn(
    compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
) -> bytes:
    """The wire bytes of etcd's TxnRequest for these compares and operations (pure)."""
    parts = [_compare_field(c) for c in compares]
    parts += [_op_field(_TXN_SUCCESS, op) for op in success]
    parts += [_op_field(_TXN_FAILURE, op) for op in failure]
    return b"".join(parts)
