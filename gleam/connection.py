"""The one place that builds an etcd client: endpoints, TLS, auth and gRPC options.

Everything else receives a connected client (or a `Settings` to make one) and never
looks at URLs, certificates or channel options.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import pyetcd
import pyetcd.exceptions
from pyetcd import etcdrpc
from pyetcd.client import EtcdTokenCallCredentials

from gleam import protected_files

# What etcd trouble looks like from pyetcd: its own exceptions for the codes it knows,
# raw gRPC errors for the rest (unauthenticated, lease not found, ...).
ETCD_ERRORS: tuple[type[BaseException], ...] = (pyetcd.Etcd3Exception, grpc.RpcError)

# What pyetcd raises when no endpoint answers (its own classes; gRPC says UNAVAILABLE).
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (
    pyetcd.exceptions.ConnectionFailedError,
    pyetcd.exceptions.ConnectionTimeoutError,
    pyetcd.exceptions.NoServerAvailableError,
)

# A connected client: pyetcd.MultiEndpointEtcd3Client (pyetcd ships no type hints).
Client = Any

# etcd's default limit of operations (and of compares) in one transaction (--max-txn-ops).
MAX_TXN_OPS = 128

# Errors after which a write may or may not have been applied: the request may have
# reached etcd, and etcd may apply it even after the client gave up.
_UNCERTAIN_CODES = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class WriteError(pyetcd.Etcd3Exception):  # type: ignore[misc]  # pyetcd is untyped
    """A write that failed in a way pyetcd has no class for; ETCD_ERRORS catches it
    with pyetcd's own."""


def may_have_applied(exc: BaseException) -> bool:
    """Whether a write that failed with `exc` may still have been applied."""
    if isinstance(exc, pyetcd.Etcd3Exception):
        return not isinstance(exc, pyetcd.exceptions.RevisionCompactedError)
    code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    return code in _UNCERTAIN_CODES


DEFAULT_ENDPOINT = "http://127.0.0.1:2379"

# gRPC channel options. A frozen etcd (SIGSTOP, a dead host behind a live route) keeps
# a TCP connection open forever; HTTP/2 keepalive pings with a timeout notice it. etcd
# refuses pings closer than 5 s apart (its --grpc-keepalive-min-time), so 10 s it is.
# etcd also refuses pings on a connection with no open stream (its enforcement policy has
# PermitWithoutStream=false) and answers them with a too_many_pings GOAWAY, so pings are
# only sent while a call is open: the agent's watch stream always is, and that is the
# connection that must notice a frozen etcd. Reconnect backoff is capped at 1 s so that a
# restarted etcd is found again quickly.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # A full read of 10,000 manifests is several MiB; gRPC's default cap is 4 MiB.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]

# pyetcd shuns a failed endpoint for `time_retry` seconds (300 by default, long enough
# for every lease to expire). One second still lets a cluster fail over to the next
# endpoint, and a lone endpoint is tried again almost at once.
ENDPOINT_RETRY_SECONDS = 1.0

# A password file holds one password; anything this large is the wrong file.
MAX_PASSWORD_FILE_BYTES = 64 * 1024


class ConfigError(ValueError):
    """A connection setting that cannot work; the text names the flag."""


@dataclass(frozen=True)
class Address:
    secure: bool
    host: str
    port: int

    def __str__(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """How to reach etcd: validated, ready for `connect`."""

    addresses: tuple[Address, ...]
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 5.0

    @property
    def secure(self) -> bool:
        return self.addresses[0].secure

    def describe(self) -> str:
        return ",".join(str(a) for a in self.addresses)

    def clear_text_auth_warning(self) -> str | None:
        """The warning to log once at start when etcd auth goes over plain http://."""
        if self.user is None or self.secure:
            return None
        return (
            f"etcd authentication over http:// ({self.describe()}): the password, and the "
            "token etcd returns for it, cross the network in clear text; use https:// endpoints"
        )


def parse_endpoints(value: str, *, tls: bool) -> tuple[Address, ...]:
    """`http://a:2379,https://b:2379,c:2379` -> addresses; bare host:port follows `tls`."""
    out: list[Address] = []
    for raw in (value or "").split(","):
        raw = raw.strip()
        if not raw:
            continue
        parsed = urlsplit(raw if "://" in raw else f"{'https' if tls else 'http'}://{raw}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"-etcd: {raw!r} is not an endpoint like http://127.0.0.1:2379")
        if parsed.path not in ("", "/"):
            raise ConfigError(f"-etcd: {raw!r} has a path; give scheme://host:port only")
        try:
            port = parsed.port or 2379
        except ValueError:
            raise ConfigError(f"-etcd: {raw!r} has an invalid port") from None
        out.append(Address(parsed.scheme == "https", parsed.hostname, port))
    if not out:
        raise ConfigError("-etcd: no endpoint given")
    return tuple(out)


def make_settings(
    etcd: str | None,
    *,
    cacert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    user: str | None = None,
    password: str | None = None,
    password_file: str | None = None,
    timeout: float = 5.0,
) -> Settings:
    """Validate connection flags. A partial TLS or auth setting is an error, never a
    silent fall back to plain text (the original's weakness). `password_file` is read
    here (see read_password_file)."""
    if bool(cert) != bool(key):
        given, missing = ("-cert", "-key") if cert else ("-key", "-cert")
        raise ConfigError(f"{given} was given without {missing}: a client certificate needs both")
    for flag, path in (("-cacert", cacert), ("-cert", cert), ("-key", key)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{flag}: file {path!r} does not exist")
    tls_files = bool(cacert or cert)
    addresses = parse_endpoints(etcd or DEFAULT_ENDPOINT, tls=tls_files)
    secure = {a.secure for a in addresses}
    if len(secure) > 1:
        raise ConfigError("-etcd: mixes http:// and https:// endpoints; use one scheme")
    if tls_files and not addresses[0].secure:
        raise ConfigError(
            "-etcd: TLS files (-cacert/-cert/-key) were given but the endpoints are http://; "
            "use https:// endpoints"
        )
    if password and password_file:
        raise ConfigError(
            "-password and -password_file were both given; give one (-password_file keeps the "
            "password out of ps and shell history)"
        )
    if bool(user) != bool(password or password_file):
        secret = "-password_file" if password_file else "-password"
        given, missing = ("-user", "-password or -password_file") if user else (secret, "-user")
        raise ConfigError(f"{given} was given without {missing}")
    if password_file:
        password = read_password_file(password_file)
    return Settings(
        addresses=addresses,
        cacert=cacert or None,
        cert=cert or None,
        key=key or None,
        user=user or None,
        password=password or None,
        timeout=timeout,
    )


def read_password_file(path: str) -> str:
    """The password in `path` (one trailing newline dropped). As ssh does for a private
    key, the file is refused unless it is a regular file owned by this user that nobody
    else may read or write (mode 0600 or stricter; gleam/protected_files.py); raises
    ConfigError naming -password_file."""
    try:
        data = protected_files.read(
            path,
            rule=protected_files.Rule.PRIVATE,
            limit=MAX_PASSWORD_FILE_BYTES,
            what="password file",
        )
    except protected_files.Refused as exc:
        raise ConfigError(f"-password_file: {exc}") from None
    return _password_from(path, data)


def _password_from(path: str, data: bytes) -> str:
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise ConfigError(f"-password_file: {path!r} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"-password_file: {path!r} is not UTF-8 text") from None


def _credentials(settings: Settings) -> grpc.ChannelCredentials:
    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.cacert),
        private_key=read(settings.key),
        certificate_chain=read(settings.cert),
    )


def connect(settings: Settings, *, start: int = 0) -> pyetcd.MultiEndpointEtcd3Client:
    """A client over every endpoint, failing over between them, starting on endpoint
    number `start` of -etcd's list (pyetcd itself would pick one at random).

    Raises one of ETCD_ERRORS when authentication is on and that endpoint cannot be
    reached (the client authenticates as it is built).
    """
    creds = _credentials(settings) if settings.secure else None
    endpoints = [
        pyetcd.Endpoint(
            a.host,
            a.port,
            secure=a.secure,
            creds=creds,
            time_retry=ENDPOINT_RETRY_SECONDS,
            opts=CHANNEL_OPTIONS,
        )
        for a in settings.addresses
    ]
    client = pyetcd.MultiEndpointEtcd3Client(
        endpoints=endpoints, timeout=settings.timeout, failover=True
    )
    labels = list(client.endpoints)
    client._current_endpoint_label = labels[start % len(labels)]
    if settings.user is not None and settings.password is not None:
        # What pyetcd does when given a user, but on the endpoint chosen above.
        token = client.authstub.Authenticate(
            etcdrpc.AuthenticateRequest(name=settings.user, password=settings.password),
            settings.timeout,
        ).token
        client.metadata = (("token", token),)
        if settings.secure:
            # pyetcd also sends the token as call credentials, which gRPC refuses on a
            # plain-text channel ("insufficient security level": every call fails);
            # without TLS, metadata alone it is, which is all etcd needs.
            client.call_credentials = grpc.metadata_call_credentials(
                EtcdTokenCallCredentials(token)
            )
    return client


# What says an endpoint did not answer (as opposed to answering with an error, a
# permission denied say): pyetcd's classes for the gRPC codes it fails an endpoint on.
_UNREACHABLE = (
    pyetcd.exceptions.ConnectionFailedError,
    pyetcd.exceptions.ConnectionTimeoutError,
    pyetcd.exceptions.NoServerAvailableError,
)
_UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def unreachable(exc: BaseException) -> bool:
    """Did the endpoint not answer at all (down, refused, timed out)?"""
    if isinstance(exc, _UNREACHABLE):
        return True
    code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    return code in _UNREACHABLE_CODES


def connect_reachable(settings: Settings) -> pyetcd.MultiEndpointEtcd3Client:
    """`connect`, starting on each endpoint in turn until one answers a read. pyetcd
    moves past a dead endpoint only after a call to it has failed, so a one-shot command
    (gleam-reconcile --once, gleam-client) that started on a member that is down would
    fail its first call: with one member of three down, a third of the runs. Daemons
    need not: their loops retry. Raises the last endpoint's error if none answers."""
    for turn in range(len(settings.addresses) - 1):
        try:
            return _answering(connect(settings, start=turn))
        except ETCD_ERRORS as exc:
            if not unreachable(exc):
                raise
    return _answering(connect(settings, start=len(settings.addresses) - 1))


def _answering(client: pyetcd.MultiEndpointEtcd3Client) -> pyetcd.MultiEndpointEtcd3Client:
    """`client` once its endpoint has answered a read (any answer will do, a refusal
    too); closed, and the error raised, if the endpoint did not answer."""
    try:
        client.get_response("/", count_only=True)
    except ETCD_ERRORS as exc:
        if unreachable(exc):
            client.close()
            raise
    return client


def describe_error(exc: BaseException) -> str:
    """A one-line description of an etcd error for logs and CLI messages."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        return f"{getattr(code, 'name', code)}: {details}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Lease refresh ------------------------------------------------------------------------
# pyetcd's `refresh_lease` sends its one LeaseKeepAlive request and closes its side of
# the stream at once. etcd answers anyway, but etcd's grpc-proxy ends the stream as soon
# as the client closes its side, before the answer comes back ("context canceled"):
# behind a proxy every refresh failed and every lease (agent registrations, the apply
# lock) expired. Here the request side stays open until the answer has arrived.

REFRESH_TIMEOUT = 5.0


def refresh_lease(client: Client, lease_id: int) -> int:
    """Refresh a lease; its TTL now, 0 or less when etcd no longer has it. Errors are
    pyetcd's exceptions, as from any other call on `client`."""
    timeout = client.timeout or REFRESH_TIMEOUT
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


# Transactions ----------------------------------------------------------------------------
# gleam.etcdapi encodes a TxnRequest straight to its wire bytes (a 10,000-manifest apply
# sends 40,000 operations and compares: protobuf objects for them cost about twice the
# CPU). pyetcd's stub would serialize a message object, so the bytes go through a
# multicallable of our own that passes them through as they are.

_TXN_METHOD = "/etcdserverpb.KV/Txn"

# One multicallable per channel. pyetcd replaces `client.channel` when it fails over to
# another endpoint, so the cache is looked up by the channel in use at each call; weak
# keys, so that a closed client's channels are not kept alive by it.
_txn_calls: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _txn_call(channel: Any) -> Any:
    call = _txn_calls.get(channel)
    if call is None:
        # Racing threads may each build one for a new channel: harmless, the last is kept.
        call = _txn_calls[channel] = channel.unary_unary(
            _TXN_METHOD,
            request_serializer=None,  # the request is already its wire bytes
            response_deserializer=etcdrpc.TxnResponse.FromString,
            _registered_method=True,  # as pyetcd's generated stub: cheaper calls
        )
    return call


def start_txn(client: Client, request: bytes) -> Callable[[], Any]:
    """Send an encoded TxnRequest (gleam.etcdapi.encode_txn) without waiting: the
    returned function waits for the etcdrpc.TxnResponse. Errors (from either) are
    pyetcd's exceptions, and a failed endpoint is marked failed so the next call goes to
    another one, as from pyetcd's own `client.transaction`."""
    try:
        call = _txn_call(client.channel)  # NoServerAvailableError when every endpoint failed
        future = call.future(
            request, client.timeout, credentials=client.call_credentials, metadata=client.metadata
        )
    except grpc.RpcError as exc:
        client._manage_grpc_errors(exc)  # raises pyetcd's exception for it
        raise

    def response() -> Any:
        try:
            return future.result()
        except grpc.RpcError as exc:
            client._manage_grpc_errors(exc)
            raise

    return response
