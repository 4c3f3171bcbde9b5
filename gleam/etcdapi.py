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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pyetcd import etcdrpc

from gleam import connection


class EtcdError(Exception):
    """etcd could not be reached or refused a request; the text says what."""


class KeyValue(NamedTuple):
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


class Target(enum.Enum):
    MOD = "mod"
    CREATE = "create"


@dataclass(frozen=True)
class Compare:
    """Holds when the key's mod_revision (or create_revision) equals `revision`; 0 for
    a key that does not exist."""

    key: str
    target: Target
    revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Get:
    key: str


@dataclass(frozen=True)
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


class Pyetcd:
    """`Backend` over a connected pyetcd client (connection.connect)."""

    def __init__(self, client: connection.Client) -> None:
        self.client = client

    def range(self, query: Range) -> RangeResult:
        options: dict[str, Any] = {"keys_only": query.keys_only, "count_only": query.count_only}
        if query.revision:
            options["revision"] = query.revision
        with _translated():
            if query.prefix:
                response = self.client.get_prefix_response(query.key, **options)
            else:
                response = self.client.get_response(query.key, **options)
        # Raw protobuf responses, not pyetcd's per-key objects: 10,000 keys in a few
        # tens of milliseconds.
        kvs = tuple(
            KeyValue(kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in response.kvs
        )
        return RangeResult(int(response.header.revision), kvs, int(response.count))

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        request = etcdrpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_request_op(op) for op in success],
            failure=[_request_op(op) for op in failure],
        )
        with _translated():
            response = connection.send_txn(self.client, request)
        revision = 0
        gets: list[tuple[KeyValue, ...]] = []
        for answer in response.responses:
            kind = answer.WhichOneof("response")
            if kind == "response_range":
                gets.append(
                    tuple(
                        KeyValue(kv.key, kv.value, int(kv.mod_revision), int(kv.create_revision))
                        for kv in answer.response_range.kvs
                    )
                )
            elif not revision and kind == "response_put":
                revision = int(answer.response_put.header.revision)
            elif not revision and kind == "response_delete_range":
                revision = int(answer.response_delete_range.header.revision)
        return TxnResult(bool(response.succeeded), revision, tuple(gets))

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


# etcd's protobuf messages, built directly: the same bytes as pyetcd's `transaction`
# builds from its per-operation objects, at about half the CPU (tests/test_fake_etcd.py
# runs every case on a real etcd through this path).
_EQUAL = etcdrpc.Compare.EQUAL


def _compare(c: Compare) -> Any:
    key = c.key.encode("utf-8")
    if c.target is Target.MOD:
        return etcdrpc.Compare(
            key=key, result=_EQUAL, target=etcdrpc.Compare.MOD, mod_revision=c.revision
        )
    return etcdrpc.Compare(
        key=key, result=_EQUAL, target=etcdrpc.Compare.CREATE, create_revision=c.revision
    )


def _request_op(op: Op) -> Any:
    key = op.key.encode("utf-8")
    if isinstance(op, Put):
        return etcdrpc.RequestOp(
            request_put=etcdrpc.PutRequest(key=key, value=op.value, lease=op.lease)
        )
    if isinstance(op, Get):
        return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key))
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))
