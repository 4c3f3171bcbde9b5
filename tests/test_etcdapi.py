"""gleam.etcdapi's pieces that the fake-etcd and wire-encoding tests do not cover: the
error unwrapping (pure) and a read's failover (on a real etcd cluster)."""

from __future__ import annotations

import signal

import grpc
import pytest
from pyetcd import exceptions as pyetcd_exceptions

from gleam import connection, etcdapi, keys
from tests.etcd_cluster import EtcdCluster


class Unavailable(grpc.RpcError):
    """A raw gRPC error, as pyetcd lets through for codes it has no class for."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


def wrapped(cause: BaseException | None) -> etcdapi.EtcdError:
    """An EtcdError raised as etcdapi.Pyetcd raises it: `from` its cause."""
    try:
        raise etcdapi.EtcdError("what etcd said") from cause
    except etcdapi.EtcdError as exc:
        return exc


@pytest.mark.parametrize(
    "cause", [pyetcd_exceptions.ConnectionFailedError(), Unavailable()], ids=["pyetcd", "grpc"]
)
def test_pyetcd_error_gives_back_the_pyetcd_error_an_etcd_error_wraps(
    cause: BaseException,
) -> None:
    assert etcdapi.pyetcd_error(wrapped(cause)) is cause


@pytest.mark.parametrize(
    "exc",
    [
        wrapped(None),  # gleam.fake_etcd's, or a malformed answer: nothing to unwrap
        wrapped(ValueError("not etcd's")),  # a cause callers would not catch as etcd's
        pyetcd_exceptions.ConnectionTimeoutError(),  # already pyetcd's
        KeyError("x"),  # anything else passes as it is
    ],
    ids=["no-cause", "other-cause", "pyetcd", "other"],
)
def test_pyetcd_error_leaves_any_other_error_as_it_is(exc: BaseException) -> None:
    assert etcdapi.pyetcd_error(exc) is exc


def test_a_read_moves_past_a_member_that_died_between_two_calls(
    etcd_cluster: EtcdCluster, layout: keys.Layout
) -> None:
    leader = etcd_cluster.wait_leader(timeout=30)
    follower = next(m for m in etcd_cluster.members if m is not leader)
    start = etcd_cluster.members.index(follower)
    client = connection.connect(
        connection.make_settings(etcd_cluster.endpoints_flag, timeout=5.0), start=start
    )
    try:
        backend = etcdapi.Pyetcd(client)
        key = layout.prefix + "/x"
        backend.txn([], [etcdapi.Put(key, b"1")])  # answered by the member it started on
        follower.stop(sig=signal.SIGKILL)
        # That member now refuses connections: the read is sent on to another one.
        kv = etcdapi.get_one(backend, key)
        assert kv is not None and kv.value == b"1"
    finally:
        client.close()
