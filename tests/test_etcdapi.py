"""gleam.etcdapi's pure pieces that the fake-etcd and wire-encoding tests do not cover."""

from __future__ import annotations

import grpc
import pytest
from pyetcd import exceptions as pyetcd_exceptions

from gleam import etcdapi


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
