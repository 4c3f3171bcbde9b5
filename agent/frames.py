"""Length-prefixed JSON frames: how the agent and its Lua executor process talk.

A frame is a 4-byte big-endian length and that many bytes of JSON (ASCII only: lone
surrogates and other odd text survive as escapes). Each side reads with its own cap on
the length, so a confused or hostile peer cannot make the other allocate without bound.

The conversation (agent.executor is the parent, agent.lua_child the child):

    parent -> child   ["init", {...}]                      once, first
    child -> parent   ["ready", pid]
    parent -> child   ["run", name, data, reload]          one per task
    child -> parent   ["log", level, logger, text]         any number, no answer
    child -> parent   ["kv", op, key, ...]                 gleam.Get/GetDir/Set/Delete
    parent -> child   ["ok", value] or ["err", text]       the answer to "kv"
    child -> parent   ["done", ok, result, error]          the task's outcome

One task is one round trip ("run" then "done") unless the script calls etcd.
This module does no logging and imports nothing beyond the standard library: the
executor process imports it.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

# What the parent accepts from the executor in one frame, and what the executor sends at
# most (a gleam.Set value beyond it is refused there; etcd refuses 1.5 MiB by default).
MAX_TO_PARENT = 8 * 1024 * 1024
# The parent's frames carry task data (at most 1 MiB) and gleam.GetDir folders, which
# the parent keeps within the memory limit; this only guards against a broken parent.
MAX_FROM_PARENT = 1024 * 1024 * 1024
# Log lines are cut here before they cross (a script may log a huge string).
MAX_LOG_CHARS = 64 * 1024

_HEADER = struct.Struct(">I")
# Made once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_RECV_BYTES = 256 * 1024


class ChannelError(Exception):
    """The peer is gone or broke the protocol."""


class Closed(ChannelError):
    """The peer closed its end (it exited, or was killed)."""


class FrameError(ChannelError):
    """A frame over the size limit, or not JSON."""


def encode(message: Any) -> bytes:
    """One frame. Raises ValueError, TypeError or RecursionError for a value JSON cannot
    carry (a 5,000-digit integer, a set, nesting too deep for the encoder)."""
    body = _ENCODER.encode(message).encode("ascii")
    return _HEADER.pack(len(body)) + body


class Channel:
    """Frames over a connected stream socket. Not thread-safe: one reader, one writer."""

    def __init__(self, sock: socket.socket, *, max_in: int, max_out: int) -> None:
        self._sock = sock
        self._max_in = max_in
        self._max_out = max_out
        self._buffer = bytearray()
        # One receive area for the channel's life: a fresh 256 KiB buffer per recv() would
        # be an mmap and munmap per message.
        self._area = bytearray(_RECV_BYTES)
        self._view = memoryview(self._area)

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, message: Any, *, deadline: float | None = None) -> None:
        """Send one message; ValueError if it cannot be encoded or is over the limit."""
        self.send_frame(encode(message), deadline=deadline)

    def send_frame(self, frame: bytes, *, deadline: float | None = None) -> None:
        """Send one encoded frame; TimeoutError if the peer has not taken it all by
        `deadline` (time.monotonic()), Closed if it has gone."""
        if len(frame) - _HEADER.size > self._max_out:
            raise ValueError(
                f"{len(frame) - _HEADER.size} bytes, over the {self._max_out}-byte limit"
            )
        self._set_timeout(deadline)
        try:
            self._sock.sendall(frame)
        except TimeoutError:
            raise
        except OSError as exc:
            raise Closed(f"cannot send: {exc.strerror or exc}") from None

    def _set_timeout(self, deadline: float | None) -> None:
        if deadline is None:
            self._sock.settimeout(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        # A day at most per wait: socket timeouts must fit a C timeval, and
        # -task_timeout may be any number.
        self._sock.settimeout(min(remaining, 86400.0))

    def receive(self, *, deadline: float | None = None) -> Any:
        """The next message. Raises TimeoutError at `deadline` (time.monotonic()), Closed
        when the peer has gone, FrameError for a frame that breaks the rules."""
        while True:
            message = self._pop()
            if message is not _NOTHING:
                return message
            self._set_timeout(deadline)
            try:
                size = self._sock.recv_into(self._area)
            except TimeoutError:
                continue  # the deadline, checked above, says whether it is over
            except OSError as exc:
                raise Closed(f"cannot receive: {exc.strerror or exc}") from None
            if not size:
                raise Closed("the other end closed the connection")
            self._buffer += self._view[:size]

    def _pop(self) -> Any:
        if len(self._buffer) < _HEADER.size:
            return _NOTHING
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > self._max_in:
            raise FrameError(f"a frame of {size} bytes, over the {self._max_in}-byte limit")
        end = _HEADER.size + size
        if len(self._buffer) < end:
            return _NOTHING
        body = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise FrameError(f"a frame that is not JSON: {exc}") from None

    def close(self) -> None:
        self._sock.close()


_NOTHING: Any = object()
