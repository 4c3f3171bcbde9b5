"""A TCP proxy in front of one etcd member that can play "the network still carries a
dead client's request": when a client's side closes (the process was SIGKILLed), the
connection to etcd stays open, so a request already sent is still read and applied by
etcd later, exactly as a request already inside etcd would be.

It reads the HTTP/2 frames it passes along (gRPC is HTTP/2), so a test can tell which
request (stream) carried how many bytes, and when etcd answered it."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_DATA = 0x0
FRAME_HEADERS = 0x1
FRAME_RST_STREAM = 0x3
FLAG_END_STREAM = 0x1


@dataclass
class Frames:
    """An HTTP/2 frame reader for one direction of one connection."""

    skip: int = 0  # bytes of the client preface still to skip
    buffer: bytearray = field(default_factory=bytearray)
    data: dict[int, int] = field(default_factory=dict)  # stream -> DATA payload bytes
    ended: set[int] = field(default_factory=set)  # streams this side ended
    reset: set[int] = field(default_factory=set)  # streams this side cancelled

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        if self.skip:
            cut = min(self.skip, len(self.buffer))
            del self.buffer[:cut]
            self.skip -= cut
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[0:3], "big")
            if len(self.buffer) < 9 + length:
                return
            kind, flags = self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            if kind == FRAME_DATA:
                self.data[stream] = self.data.get(stream, 0) + length
            if kind in (FRAME_DATA, FRAME_HEADERS) and flags & FLAG_END_STREAM:
                self.ended.add(stream)
            if kind == FRAME_RST_STREAM:
                self.reset.add(stream)
            del self.buffer[: 9 + length]


class Link:
    """One proxied connection: a client socket and the upstream one."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.sent = Frames(skip=len(PREFACE))  # client -> etcd
        self.answered = Frames()  # etcd -> client
        self.client_gone = False
        self.lock = threading.Lock()

    def requests_over(self, size: int) -> set[int]:
        """Streams on which the client sent more than `size` bytes of data."""
        with self.lock:
            return {s for s, n in self.sent.data.items() if n > size}

    def answered_streams(self) -> set[int]:
        with self.lock:
            return set(self.answered.ended) | set(self.answered.reset)

    def cancelled_streams(self) -> set[int]:
        """Streams the client cancelled (so etcd may have dropped the request)."""
        with self.lock:
            return set(self.sent.reset)


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.links: list[Link] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            link = Link(client, upstream)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self.links.append(link)
            threading.Thread(target=self._forward, args=(link,), daemon=True).start()
            threading.Thread(target=self._backward, args=(link,), daemon=True).start()

    def _forward(self, link: Link) -> None:
        """Client -> etcd. When the client goes, etcd's side is left open on purpose."""
        while True:
            chunk = _recv(link.client)
            if not chunk:
                link.client_gone = True
                return
            with link.lock:
                link.sent.feed(chunk)
            try:
                link.upstream.sendall(chunk)
            except OSError:
                return

    def _backward(self, link: Link) -> None:
        """etcd -> client, dropped once the client is gone (but still read and parsed)."""
        while True:
            chunk = _recv(link.upstream)
            if not chunk:
                _close(link.client)
                return
            with link.lock:
                link.answered.feed(chunk)
            if not link.client_gone:
                try:
                    link.client.sendall(chunk)
                except OSError:
                    link.client_gone = True

    def sever_clients(self) -> None:
        """Cut every client off (as if its process died), leaving etcd's sides open."""
        with self._lock:
            links = list(self.links)
        for link in links:
            link.client_gone = True
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_RDWR)

    def requests_over(self, size: int) -> list[tuple[Link, int]]:
        """(link, stream) of every request that carried more than `size` bytes."""
        with self._lock:
            links = list(self.links)
        return [(link, stream) for link in links for stream in sorted(link.requests_over(size))]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = list(self.links)
        _close(self._listener)
        for link in links:
            _close(link.client)
            _close(link.upstream)


def _recv(sock: socket.socket) -> bytes:
    """The next bytes; b"" once the connection is closed or broken."""
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
