"""The Lua executor process: runs the agent's Lua tasks, one at a time, for its parent.

Started by agent.executor with one end of a socket pair and nothing else of the agent's:
no etcd client, no credentials, no gRPC (an import test keeps it so). It holds one
`lua_exec.LuaRunner`; gleam.Get/GetDir/Set/Delete become requests to the parent, which
makes the etcd call and answers; gleam.exec programs run here. See agent.frames for the
conversation.

It is a child the parent can kill at any moment: on a task's time limit, or when it
misbehaves. It dies with the parent too (PR_SET_PDEATHSIG on Linux; otherwise it exits
when the socket closes), so an agent killed with SIGKILL leaves no executor behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

from agent import frames, lua_exec, processes
from agent.lua_api import KVError

# The address-space backstop: the executor's size once started, plus room for the Lua
# cap twice over, for conversions (lua_exec.CONVERSION_ROOM) and for malloc's arenas.
ADDRESS_SPACE_ROOM = 512 * 1024 * 1024

_PR_SET_PDEATHSIG = 1


class ParentKV:
    """gleam.Get/GetDir/Set/Delete as requests to the parent (agent.lua_api.KV)."""

    def __init__(self, channel: frames.Channel, lock: threading.RLock) -> None:
        self._channel = channel
        self._lock = lock

    def get(self, key: str) -> str | None:
        value = self._ask("get", key)
        if value is not None and not isinstance(value, str):
            raise KVError("the agent answered with something other than a string")
        return value

    def get_dir(self, key: str) -> dict[str, str]:
        folder = self._ask("get_dir", key)
        if not isinstance(folder, dict):
            raise KVError("the agent answered with something other than a folder")
        return folder

    def set(self, key: str, value: str, ttl: int | None) -> None:
        self._ask("set", key, value, ttl)

    def delete(self, key: str) -> None:
        self._ask("delete", key)

    def _ask(self, op: str, *args: Any) -> Any:
        with self._lock:
            try:
                self._channel.send(["kv", op, *args])
            except ValueError as exc:
                raise KVError(f"the request is too large to pass to the agent ({exc})") from None
            reply = self._channel.receive()
        if isinstance(reply, list) and len(reply) == 2 and reply[0] in ("ok", "err"):
            if reply[0] == "err":
                raise KVError(str(reply[1]))
            return reply[1]
        raise frames.FrameError(f"an unexpected answer to a {op} request: {reply!r:.200}")


class ParentLog(logging.Handler):
    """Log records as "log" frames: the parent logs them where its own logs go."""

    def __init__(self, channel: frames.Channel, lock: threading.RLock) -> None:
        super().__init__()
        self._channel = channel
        self._lock = lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            if len(text) > frames.MAX_LOG_CHARS:
                text = (
                    text[: frames.MAX_LOG_CHARS]
                    + f"... ({len(text) - frames.MAX_LOG_CHARS} more characters)"
                )
            with self._lock:
                self._channel.send(["log", record.levelno, record.name, text])
        except frames.Closed:
            pass  # the parent has gone: so will this process
        except Exception:  # noqa: BLE001 - logging must never break a task
            self.handleError(record)


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; exit at once if the parent
    is already gone (it died before the request was made)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def address_space_now() -> int:
    """This process's virtual size in bytes (Linux); 0 when unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def serve(channel: frames.Channel, config: dict[str, Any]) -> None:
    """Run tasks until the parent closes the channel."""
    lock = threading.RLock()
    root = logging.getLogger()
    root.handlers[:] = [ParentLog(channel, lock)]
    root.setLevel(int(config["log_level"]))
    options = config["runner"]
    memory_limit = int(options["memory_limit"])
    runner = lua_exec.LuaRunner(
        kv=ParentKV(channel, lock),
        logger=logging.getLogger("agent.lua"),
        watch_files=False,  # the check before every run is enough (and watchdog is 5 MiB)
        **options,
    )
    size = address_space_now()
    if size:
        processes.cap_address_space(size + 2 * memory_limit + ADDRESS_SPACE_ROOM)
    channel.send(["ready", os.getpid()])
    while True:
        try:
            message = channel.receive()
        except frames.Closed:
            break
        if not (isinstance(message, list) and len(message) == 4 and message[0] == "run"):
            raise frames.FrameError(f"expected a run request, got {message!r:.200}")
        _, name, data, reload = message
        if reload:
            runner.reload()
        outcome = runner.run(str(name), data)
        with lock:
            try:
                channel.send(["done", outcome.ok, outcome.result, outcome.error])
            except (ValueError, TypeError, RecursionError) as exc:
                error = f"the result cannot be passed to the agent: {exc}"
                channel.send(["done", False, None, error])
    runner.close()


def main(argv: Sequence[str]) -> int:
    """`argv`: the socket's file descriptor and the parent's pid."""
    fd, parent = int(argv[0]), int(argv[1])
    # SIGHUP is the parent's business (it forwards reloads as frames); a handler rather
    # than SIG_IGN, which gleam.exec programs would inherit.
    signal.signal(signal.SIGHUP, lambda *_: None)
    die_with_parent(parent)
    channel = frames.Channel(
        socket.socket(fileno=fd), max_in=frames.MAX_FROM_PARENT, max_out=frames.MAX_TO_PARENT
    )
    init = channel.receive()
    if not (isinstance(init, list) and len(init) == 2 and init[0] == "init"):
        print(f"gleam Lua executor: expected an init frame, got {init!r:.200}", file=sys.stderr)
        return 2
    serve(channel, init[1])
    return 0
