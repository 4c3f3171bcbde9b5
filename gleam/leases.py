"""Refreshing an etcd lease so that it works both directly and through `etcd grpc-proxy`.

pyetcd's `refresh_lease` sends its one LeaseKeepAlive request and closes its side of the
stream at once. etcd answers anyway, but etcd's grpc-proxy ends the stream as soon as
the client closes its side, before the answer comes back ("context canceled"): behind a
proxy every refresh failed and every lease (agent registrations, the apply lock)
expired. Here the request side stays open until the answer has arrived.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
from pyetcd import etcdrpc

DEFAULT_TIMEOUT = 5.0


def refresh(client: Any, lease_id: int) -> int:
    """Refresh a lease; its TTL now, 0 or less when etcd no longer has it. Errors are
    pyetcd's exceptions, as from any other call on `client` (a pyetcd client)."""
    timeout = client.timeout or DEFAULT_TIMEOUT
    answered = threading.Event()

    def requests() -> Iterator[Any]:
        yield etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
        answered.wait(timeout)  # gRPC reads this in its own thread: holds the stream open

    call = client.leasestub.LeaseKeepAlive(
        requests(), timeout, credentials=client.call_credentials, metadata=client.metadata
    )
    try:
        for response in call:
            return int(response.TTL)
        return 0
    except grpc.RpcError as exc:
        client._manage_grpc_errors(exc)  # raises pyetcd's exception for it
        raise
    finally:
        answered.set()
        call.cancel()
