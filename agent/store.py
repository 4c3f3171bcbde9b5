"""The agent's one seam to etcd: every etcd call the agent makes is in this file.

Each of the agent's loops (watch, registration, result writer) owns a Store, and so its
own client and gRPC channels: a loop that resets its connection after a failure does not
disturb the others. Errors come out as two typed exceptions, never as pyetcd's or gRPC's:
`Unavailable` (worth retrying after `reset()`) and `Rejected` (etcd refused the request
itself; retrying cannot help; `LeaseNotFound` is one: a write bound to a lease that is
gone). A compacted watch start gives `Compacted`.

There is no blind put: every write is `put_guarded`, a transaction that compares each
key's mod_revision, so that a request etcd applies late cannot overwrite a newer write.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from pyetcd import etcdrpc
from pyetcd import events as etcd_events
from pyetcd import exceptions as etcd_exceptions

from agent.lua_api import KVError, dir_prefix
from agent.pending import Observed
from gleam import access, connection

log = logging.getLogger("agent.store")


class Connector(Protocol):
    """How a Store gets a client: connection.connect's shape."""

    def __call__(self, settings: connection.Settings, *, start: int = 0) -> connection.Client: ...


class StoreError(Exception):
    """etcd trouble, described in one line."""


class Unavailable(StoreError):
    """etcd could not be reached or did not answer in time; retry later."""


class Rejected(StoreError):
    """etcd answered and refused the request (too large, not permitted); do not retry."""


class LeaseNotFound(Rejected):
    """A write bound to a lease etcd no longer has (revoked, or expired): it was refused."""


class Denied(Rejected):
    """etcd's roles do not let this agent's user make the request: logged naming the key
    and the user, not retried (an operator fixes the role; agent/preflight.py)."""


class Compacted(StoreError):
    """A watch asked for a revision etcd has already compacted away."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"revision compacted (etcd keeps revisions from {compacted_revision})")
        self.compacted_revision = compacted_revision


# Records read per request by `read_records`: a result may be up to 1 MiB, so a few at a
# time keep each response small.
RECORDS_PER_READ = 8

# gRPC codes that mean the request itself is at fault (too large, malformed, a revision
# that is gone), so a retry would fail the same way. PERMISSION_DENIED becomes Denied, a
# Rejected too: a denied write is dropped with an error naming the key and the user, while
# the watch (which retries any StoreError) keeps trying its reads until the role is fixed.
_REJECTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


def translate(exc: BaseException, *, user: str = "") -> StoreError:
    """pyetcd/gRPC errors -> Compacted, Denied, Rejected or Unavailable."""
    if isinstance(exc, etcd_exceptions.RevisionCompactedError):
        return Compacted(int(exc.compacted_revision))
    text = connection.describe_error(exc)
    rpc = isinstance(exc, grpc.RpcError)
    if rpc and _code(exc) is grpc.StatusCode.PERMISSION_DENIED:
        return Denied(f"permission denied for etcd user {user or '(unknown)'}")
    if rpc and _code(exc) is grpc.StatusCode.NOT_FOUND and "lease not found" in text:
        return LeaseNotFound(text)
    if rpc and _code(exc) in _REJECTED_CODES:
        return Rejected(text)
    return Unavailable(text)


@dataclass(frozen=True)
class KeysAtRevision:
    """Task keys read at one revision: each key's state (value None when absent)."""

    revision: int
    keys: tuple[Observed, ...]

    def current(self) -> dict[str, int | None]:
        """key -> mod_revision, None when absent."""
        return {o.key: (o.revision if o.value is not None else None) for o in self.keys}


@dataclass(frozen=True)
class _FromWatch:
    generation: int  # which watch of the key (a restarted watch gets the next number)
    key: str


@dataclass(frozen=True)
class WatchBatch(_FromWatch):
    """Changes a watch delivered for one key; no changes for a progress notification."""

    changes: tuple[Observed, ...]
    header_revision: int


@dataclass(frozen=True)
class WatchBroken(_FromWatch):
    """A watch ended: the connection broke, or etcd cancelled it."""

    error: StoreError


WatchMessage = WatchBatch | WatchBroken


@dataclass(frozen=True)
class Guarded:
    """One guarded write: put `value` at `key` only if the key's mod_revision is still
    `mod_revision` (0: only if the key does not exist), bound to `lease` when not 0."""

    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class TxnOutcome:
    """A guarded transaction's answer: on success the write's revision (the new
    mod_revision of every key written); on failure each key's mod_revision now (0 for a
    key that does not exist), from the same transaction, and nothing was written."""

    ok: bool
    revision: int
    current: dict[str, int]


class Store:
    def __init__(
        self, settings: connection.Settings, *, connector: Connector = connection.connect
    ) -> None:
        self._settings = settings
        self._connector = connector
        self.user = access.identity(settings)
        self._client: connection.Client | None = None
        self._lock = threading.Lock()
        self._connects = 0

    # Connection --------------------------------------------------------------
    def _get(self) -> connection.Client:
        with self._lock:
            if self._client is None:
                turn, self._connects = self._connects, self._connects + 1
                try:
                    # Each new client starts on the next endpoint in turn, the first one
                    # first, so that reconnecting after failures tries every endpoint
                    # (and authenticates on it) rather than maybe the same dead one again.
                    client = self._connector(self._settings, start=turn)
                except connection.ETCD_ERRORS as exc:
                    raise translate(exc) from None
                self._client = client
            return self._client

    def reset(self) -> None:
        """Drop the client (and every watch on it); the next call connects afresh,
        trying every endpoint."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - closing a broken client may fail
                log.debug("closing etcd client: %s", exc)

    close = reset

    def _call(self, what: Callable[[connection.Client], Any]) -> Any:
        client = self._get()
        try:
            return what(client)
        except connection.ETCD_ERRORS as exc:
            raise translate(exc, user=self.user) from None

    # Key-value: no blind put here; every write is `put_guarded` ------------
    def read_keys(self, keys: Sequence[str]) -> KeysAtRevision:
        """Read `keys` at one revision (the first read's), so that together they are a
        consistent picture that a watch from `revision + 1` continues exactly. One
        transaction per connection.MAX_TXN_OPS keys (an agent may watch many regions)."""

        def read(client: connection.Client) -> KeysAtRevision:
            revision = 0
            seen: list[Observed] = []
            for start in range(0, len(keys), connection.MAX_TXN_OPS):
                chunk = keys[start : start + connection.MAX_TXN_OPS]
                # pyetcd's transaction() drops the response header, whose revision is the
                # point of this read, so the request is made on its KV stub directly.
                request = etcdrpc.TxnRequest(
                    success=[
                        etcdrpc.RequestOp(
                            request_range=etcdrpc.RangeRequest(
                                key=key.encode("utf-8"), revision=revision
                            )
                        )
                        for key in chunk
                    ]
                )
                response = client.kvstub.Txn(
                    request,
                    client.timeout,
                    credentials=client.call_credentials,
                    metadata=client.metadata,
                )
                if not revision:
                    revision = int(response.header.revision)
                for key, op in zip(chunk, response.responses, strict=True):
                    kvs = op.response_range.kvs
                    if kvs:
                        seen.append(Observed(key, int(kvs[0].mod_revision), bytes(kvs[0].value)))
                    else:
                        seen.append(Observed(key, revision, None))
            return KeysAtRevision(revision, tuple(seen))

        result: KeysAtRevision = self._call(read)
        return result

    def read_prefix(self, prefix: str) -> dict[str, bytes]:
        def read(client: connection.Client) -> dict[str, bytes]:
            return {
                meta.key.decode("utf-8", "replace"): bytes(value)
                for value, meta in client.get_prefix(prefix)
            }

        result: dict[str, bytes] = self._call(read)
        return result

    def get(self, key: str) -> bytes | None:
        value, _meta = self._call(lambda c: c.get(key))
        return None if value is None else bytes(value)

    def read_records(self, keys: Sequence[str]) -> dict[str, tuple[bytes | None, int]]:
        """key -> (value or None, mod_revision or 0), a few keys per request: the values
        may be large (a result record may be 1 MiB)."""
        found: dict[str, tuple[bytes | None, int]] = {}
        for start in range(0, len(keys), RECORDS_PER_READ):
            for seen in self.read_keys(keys[start : start + RECORDS_PER_READ]).keys:
                found[seen.key] = (seen.value, seen.revision if seen.value is not None else 0)
        return found

    def put_guarded(self, items: Sequence[Guarded]) -> TxnOutcome:
        """Write every item in one transaction if every key's mod_revision is still the
        one given, or nothing at all. A request etcd applies late (after our client gave
        up on it, or after our process died) then fails its compare instead of
        overwriting what was written since: see the README, "When etcd misbehaves"."""
        if not items or len(items) > connection.MAX_TXN_OPS:
            raise ValueError(f"put_guarded takes 1 to {connection.MAX_TXN_OPS} keys")
        encoded = [item.key.encode("utf-8") for item in items]
        request = etcdrpc.TxnRequest(
            compare=[
                etcdrpc.Compare(
                    result=etcdrpc.Compare.EQUAL,
                    target=etcdrpc.Compare.MOD,
                    key=key,
                    mod_revision=item.mod_revision,
                )
                for key, item in zip(encoded, items, strict=True)
            ],
            success=[
                etcdrpc.RequestOp(
                    request_put=etcdrpc.PutRequest(key=key, value=item.value, lease=item.lease)
                )
                for key, item in zip(encoded, items, strict=True)
            ],
            # Keys only: what changed is all the caller needs to learn (values may be large).
            failure=[
                etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key, keys_only=True))
                for key in encoded
            ],
        )

        def send(client: connection.Client) -> TxnOutcome:
            # Made on the KV stub: the response header's revision is the write's revision.
            response = client.kvstub.Txn(
                request,
                client.timeout,
                credentials=client.call_credentials,
                metadata=client.metadata,
            )
            revision = int(response.header.revision)
            if response.succeeded:
                return TxnOutcome(True, revision, {})
            current = {}
            for item, op in zip(items, response.responses, strict=True):
                kvs = op.response_range.kvs
                current[item.key] = int(kvs[0].mod_revision) if kvs else 0
            return TxnOutcome(False, revision, current)

        outcome: TxnOutcome = self._call(send)
        return outcome

    # Leases ------------------------------------------------------------------
    def grant_lease(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL)."""
        lease = self._call(lambda c: c.lease(ttl))
        return int(lease.id), int(lease.ttl)

    def keep_alive(self, lease_id: int) -> int:
        """Refresh a lease; its TTL now, 0 or less when etcd no longer has it."""

        def refresh(client: connection.Client) -> int:
            return connection.refresh_lease(client, lease_id)  # also through grpc-proxy

        try:
            result: int = self._call(refresh)
        except Rejected:
            return 0
        except Unavailable as exc:
            # etcd answers a refresh of an unknown lease with NOT_FOUND on some versions.
            if "NOT_FOUND" in str(exc) or "lease not found" in str(exc):
                return 0
            raise
        return result

    def revoke_lease(self, lease_id: int) -> None:
        self._call(lambda c: c.revoke_lease(lease_id))

    # Watches -----------------------------------------------------------------
    def watch(
        self,
        key: str,
        *,
        start_revision: int,
        generation: int,
        deliver: Callable[[WatchMessage], None],
    ) -> None:
        """Watch one key from `start_revision`; every response goes to `deliver` (called
        on pyetcd's thread, so it should only hand the message over). Raises Compacted
        when `start_revision` is gone, Unavailable when the watch cannot be created."""

        def callback(response: Any) -> None:
            if response is None:
                deliver(WatchBroken(generation, key, Unavailable("watch stream ended")))
            elif isinstance(response, BaseException):
                deliver(WatchBroken(generation, key, translate(response)))
            else:
                changes = tuple(
                    Observed(
                        key,
                        int(event.mod_revision),
                        None if isinstance(event, etcd_events.DeleteEvent) else bytes(event.value),
                    )
                    for event in response.events
                )
                deliver(WatchBatch(generation, key, changes, int(response.header.revision)))

        self._call(
            lambda c: c.add_watch_callback(
                key, callback, start_revision=start_revision, progress_notify=True
            )
        )


class EtcdKV:
    """The scripts' etcd calls (gleam.Get/GetDir/Set/Delete, `agent.lua_api.KV`) over a
    pyetcd client: ttl becomes a lease, GetDir reads `key/`, Delete removes the key and
    everything under `key/` (an etcd v2 directory, as the original had). Every failure
    is a `KVError` whose text the script gets as its error value.

    The agent runs it in its own process, for the Lua executor process's requests."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def get(self, key: str) -> str | None:
        with _kv_errors():
            value, _ = self._client.get(key)
        return None if value is None else bytes(value).decode("utf-8", errors="replace")

    def get_dir(self, key: str) -> dict[str, str]:
        with _kv_errors():
            prefix = dir_prefix(key)
            return {
                bytes(meta.key).decode("utf-8", errors="replace"): bytes(value).decode(
                    "utf-8", errors="replace"
                )
                for value, meta in self._client.get_prefix(prefix)
            }

    def set(self, key: str, value: str, ttl: int | None) -> None:
        with _kv_errors():
            lease = self._client.lease(ttl) if ttl else None
            self._client.put(key, value, lease=lease)

    def delete(self, key: str) -> None:
        with _kv_errors():
            prefix = dir_prefix(key)
            self._client.delete(key)
            self._client.delete_prefix(prefix)


@contextlib.contextmanager
def _kv_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure is the script's error value
        raise KVError(connection.describe_error(exc)) from None


class LazyClient:
    """A pyetcd client made on first use, for the Lua scripts' etcd calls (through
    `EtcdKV`): with etcd auth, making a client needs etcd up, and the agent must start
    even when it is not. An error reaches the script as an error string, but not one a
    live endpoint could have spared it: a call to an endpoint that does not answer (or a
    client that could not authenticate on it) is tried again on a fresh client that
    starts on the next endpoint, once per endpoint (pyetcd alone would move on only for
    the script's next call). An expired auth token (etcd drops idle ones) gets one retry
    on a fresh, re-authenticated client."""

    def __init__(self, settings: connection.Settings) -> None:
        self._store = Store(settings)
        self._endpoints = len(settings.addresses)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tries = self._endpoints
            reauthenticated = False
            while True:
                try:
                    return getattr(self._store._get(), name)(*args, **kwargs)
                except (grpc.RpcError, *connection.ETCD_ERRORS, Unavailable) as exc:
                    expired = _code(exc) is grpc.StatusCode.UNAUTHENTICATED
                    silent = isinstance(exc, Unavailable) or connection.unreachable(exc)
                    if expired and not reauthenticated:
                        reauthenticated = True
                    elif silent and tries > 1:
                        tries -= 1
                    else:
                        raise
                    self._store.reset()

        return call

    def close(self) -> None:
        self._store.reset()


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        code: grpc.StatusCode | None = exc.code()
    except Exception:  # noqa: BLE001 - not every RpcError carries a code
        return None
    return code
