"""The Lua executor, seen from the agent: a child process that runs the tasks, supervised.

The agent (the parent) keeps registration, the watch, the queue, results and every etcd
call; each task runs in one long-lived child (agent.lua_child) that holds the Lua
runtime. `LuaExecutor.run(name, data)` is the worker's `Runner`: it sends the task, serves
the child's gleam.Get/GetDir/Set/Delete requests with the agent's own etcd client, logs
the child's log lines, and returns the outcome. Whatever the child does, `run` returns an
outcome and the next task finds a working child:

- past -task_timeout (plus a short grace for the child's own, clean, time limit) the
  child is killed with SIGKILL, with its whole session, so that gleam.exec programs go
  too; the task fails with `time limit of N s exceeded`;
- a child that dies (a signal, an abort, a Lua panic) fails the task with how it died
  (`Lua executor killed by signal 9 (SIGKILL)`, `exited with status 134`);
- a child that breaks the protocol is killed the same way;
- then a fresh child is started at once, so the next task pays no start-up cost.

The child starts in a new session (its own process group) from a small entry module that
never imports gRPC or the etcd client; it gets the agent's environment without etcd
credentials, and its configuration over the socket.
Per task the cost is one round trip of two small frames on a Unix socket pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from agent import frames
from agent.lua_api import KV, ExecutorOptions, KVError, RunOutcome
from gleam import flags
from gleam.messages import JSON

log = logging.getLogger("agent.executor")

# After the task's time limit, how long the child has to stop the script itself (the
# count hook does it within milliseconds) before it is killed.
KILL_GRACE_S = 1.0
# How long a new child may take to be ready (Python and lupa start in a fraction of a
# second; a loaded machine is slower).
START_TIMEOUT_S = 30.0
# How long a child that closed its socket gets to exit before it is killed.
EXIT_WAIT_S = 2.0
# The child's stderr (a Lua panic, a Python traceback) is logged line by line, each cut
# here, and at most MAX_STDERR_LINES lines per child (a script can write to io.stderr).
MAX_STDERR_LINE = 4096
MAX_STDERR_LINES = 200

# Started as `python -P -c BOOT PACKAGE_ROOT FD PARENT_PID`: -P and the explicit path, so
# that neither the working directory (the scripts' too) nor PYTHONPATH picks the module.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from agent import lua_child; sys.exit(lua_child.main(sys.argv[2:]))"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class ExecutorError(RuntimeError):
    """The executor process could not be started; the text says why."""


def describe_exit(returncode: int) -> str:
    """How a child ended, for a task's error: from `Popen.returncode`."""
    if returncode < 0:
        try:
            name = f" ({signal.Signals(-returncode).name})"
        except ValueError:
            name = ""
        return f"Lua executor killed by signal {-returncode}{name}"
    return f"Lua executor exited with status {returncode}"


# The credential flags' variables: the agent drops them from its environment once parsed
# (gleam.flags.drop_credentials); the executor's is built without them all the same.
_CREDENTIALS = frozenset(f.env for f in flags.CONNECTION_FLAGS if f.credential)


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment without etcd credentials (GLEAM_PASSWORD, GLEAM_USER,
    key and certificate paths...): scripts and their programs never see them. Other
    variables, a script's own settings (GLEAM_SYNC_DIR) among them, pass."""
    return {name: value for name, value in environ.items() if name not in _CREDENTIALS}


def session_members(session: int) -> list[int]:
    """Pids of the processes in `session` (Linux /proc; empty elsewhere)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = text[text.rfind(b")") + 2 :].split()
        if len(fields) > 3 and fields[3] == str(session).encode():
            members.append(int(entry))
    return members


class _Child:
    """One executor process and its end of the channel."""

    def __init__(self, proc: subprocess.Popen[bytes], channel: frames.Channel) -> None:
        self.proc = proc
        self.channel = channel
        self.ready = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class LuaExecutor:
    """Runs tasks in a supervised child process (the worker's `Runner`)."""

    def __init__(
        self,
        options: ExecutorOptions,
        *,
        kv: KV,
        logger: logging.Logger | None = None,
        kill_grace: float = KILL_GRACE_S,
    ) -> None:
        self._kv = kv
        self._time_limit = float(options.time_limit)
        self._memory_limit = int(options.memory_limit)
        self._kill_grace = kill_grace
        lua_log = logger or logging.getLogger("agent.lua")
        # The child's init frame; it sends only the log lines the parent would keep.
        self._config = {
            "runner": {**asdict(options), "script_dir": str(options.script_dir)},
            "log_level": lua_log.getEffectiveLevel(),
        }
        self._child: _Child | None = None
        self._reloads = 0
        self._reloads_sent = 0
        self._lock = threading.Lock()  # run() and close() may come from different threads
        self.restarts = 0  # children started after the first (-metrics)
        self._spawned = False

    # Public face ---------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running child's pid."""
        child = self._child
        return child.pid if child is not None else None

    def start(self) -> None:
        """Start the child and wait until it is ready; ExecutorError if it cannot start."""
        with self._lock:
            child = self._spawn()
            error = self._await_ready(child)
            if error is not None:
                raise ExecutorError(error)

    def run(self, name: str, data: JSON) -> RunOutcome:
        """Run function `name` with `data` in the child; never raises."""
        started = time.perf_counter()
        with self._lock:
            ok, result, error = self._run(name, data)
        duration_ms = (time.perf_counter() - started) * 1000.0
        return RunOutcome(ok=ok, result=result, error=error, duration_ms=duration_ms)

    def reload(self) -> None:
        """Drop the child's compiled scripts before its next task (safe from any thread)."""
        self._reloads += 1

    def close(self) -> None:
        """Stop the child: it exits when its socket closes; killed if it does not."""
        with self._lock:
            child, self._child = self._child, None
            if child is not None:
                child.channel.close()
                try:
                    child.proc.wait(timeout=EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    self._kill(
                        child, why=f"still running {EXIT_WAIT_S:g} s after it was told to stop"
                    )

    # Running a task ------------------------------------------------------------------

    def _run(self, name: str, data: JSON) -> tuple[bool, JSON, str | None]:
        reloads = self._reloads  # SIGHUPs so far; the child hears of new ones
        try:
            frame = frames.encode(["run", name, data, reloads != self._reloads_sent])
        except (ValueError, TypeError, RecursionError) as exc:
            return False, None, f"the task's data cannot be passed to the Lua executor: {exc}"
        try:
            child = self._child or self._spawn()
        except OSError as exc:
            return False, None, f"cannot start the Lua executor: {exc}"
        error = self._await_ready(child)
        if error is not None:
            return False, None, error
        self._reloads_sent = reloads
        deadline = time.monotonic() + self._time_limit + self._kill_grace
        try:
            child.channel.send_frame(frame, deadline=deadline)
            while True:
                message = child.channel.receive(deadline=deadline)
                done = self._handle(child, message, deadline)
                if done is not None:
                    return done
        except TimeoutError:
            self._kill(child, why=f"still running {name} after its time limit")
            self._respawn()
            how = "the Lua executor did not stop the script and was killed"
            return False, None, f"time limit of {self._time_limit:g} s exceeded ({how})"
        except frames.ChannelError as exc:
            how = self._ended(child, exc)
            self._respawn()
            return False, None, how

    def _respawn(self) -> None:
        """A fresh child for the next task, started now so that it is ready by then."""
        try:
            self._spawn()
        except OSError as exc:
            log.error("cannot start a new Lua executor (the next task tries again): %s", exc)

    def _handle(
        self, child: _Child, message: Any, deadline: float
    ) -> tuple[bool, JSON, str | None] | None:
        """One message from the child during a task; the outcome once it is "done"."""
        kind = message[0] if isinstance(message, list) and message else None
        if kind == "done" and len(message) == 4:
            _, ok, result, error = message
            if isinstance(ok, bool) and (error is None or isinstance(error, str)):
                return ok, None if not ok else result, error
        elif kind == "log" and len(message) == 4:
            self._log_line(message[1], message[2], message[3])
            return None
        elif kind == "kv":
            reply = self._serve_kv(message[1:])
            if reply is not None:
                child.channel.send_frame(reply, deadline=deadline)
                return None
        raise frames.FrameError(f"an unexpected message: {message!r:.200}")

    def _serve_kv(self, request: list[Any]) -> bytes | None:
        """The answer frame to a gleam.Get/GetDir/Set/Delete request; None if malformed."""
        match request:
            case ["get", str(key)]:
                call: Any = lambda: self._kv.get(key)  # noqa: E731
            case ["get_dir", str(key)]:
                call = lambda: self._kv.get_dir(key)  # noqa: E731
            case ["set", str(key), str(value), None | int() as ttl] if not isinstance(ttl, bool):
                call = lambda: self._kv.set(key, value, ttl)  # noqa: E731
            case ["delete", str(key)]:
                call = lambda: self._kv.delete(key)  # noqa: E731
            case _:
                return None
        try:
            reply = frames.encode(["ok", call()])
        except KVError as exc:
            return frames.encode(["err", str(exc)])
        except Exception as exc:  # noqa: BLE001 - any failure is the script's error value
            return frames.encode(["err", f"{type(exc).__name__}: {exc}"])
        if len(reply) > self._memory_limit:
            # It could never fit in the Lua state: refused here, before the child tries.
            return frames.encode(
                ["err", f"{len(reply)} bytes, more than the Lua memory limit of "
                 f"{self._memory_limit / (1024 * 1024):g} MiB"]
            )  # fmt: skip
        return reply

    def _log_line(self, level: Any, name: Any, text: Any) -> None:
        if not isinstance(level, int) or isinstance(level, bool):
            level = logging.WARNING
        level = min(max(level, logging.DEBUG), logging.CRITICAL)
        # Only the agent's own loggers: a log line must not pose as another component.
        logger = name if isinstance(name, str) and name.startswith("agent.") else "agent.lua"
        logging.getLogger(logger).log(level, "%s", str(text)[: frames.MAX_LOG_CHARS + 100])

    # The child's life ----------------------------------------------------------------

    def _spawn(self) -> _Child:
        """Start a child (it gets ready in the background) and make it the current one."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _BOOT, _PACKAGE_ROOT,
                 str(child_end.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(child_end.fileno(),),
                env=child_environment(os.environ),
                start_new_session=True,
            )  # fmt: skip
        except OSError:
            parent_end.close()
            raise
        finally:
            child_end.close()
        channel = frames.Channel(
            parent_end, max_in=frames.MAX_TO_PARENT, max_out=frames.MAX_FROM_PARENT
        )
        child = _Child(proc, channel)
        assert proc.stderr is not None
        threading.Thread(
            target=_pump_stderr, args=(proc.stderr, proc.pid), name="gleam-executor-stderr",
            daemon=True,
        ).start()  # fmt: skip
        if self._child is not None or self._spawned:
            self.restarts += 1
        self._spawned = True
        self._child = child
        log.info("Lua executor started (pid %d)", proc.pid)
        with contextlib.suppress(frames.ChannelError, TimeoutError):
            # A dead or stuck child shows in _await_ready.
            channel.send(["init", self._config], deadline=time.monotonic() + START_TIMEOUT_S)
        return child

    def _await_ready(self, child: _Child) -> str | None:
        """Wait for a new child's "ready"; None when ready, else why it is not (and the
        child is gone, so the next task starts another)."""
        if child.ready:
            return None
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            message = child.channel.receive(deadline=deadline)
            while isinstance(message, list) and len(message) == 4 and message[0] == "log":
                self._log_line(message[1], message[2], message[3])
                message = child.channel.receive(deadline=deadline)
        except TimeoutError:
            self._kill(child, why=f"not ready after {START_TIMEOUT_S:g} s")
            self._child = None
            return f"the Lua executor did not start within {START_TIMEOUT_S:g} s"
        except frames.ChannelError as exc:
            how = self._ended(child, exc)
            self._child = None
            return f"the Lua executor could not start: {how}"
        if not (isinstance(message, list) and message[:1] == ["ready"]):
            self._kill(child, why="it broke the protocol at start-up")
            self._child = None
            return "the Lua executor could not start: it sent an unexpected message"
        child.ready = True
        log.debug("Lua executor (pid %d) is ready", child.pid)
        return None

    def _ended(self, child: _Child, exc: frames.ChannelError) -> str:
        """The child closed its socket or broke the protocol: make sure it is gone, and
        say how it ended."""
        if isinstance(exc, frames.Closed):
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=EXIT_WAIT_S)
        if child.proc.poll() is None:
            self._kill(child, why=str(exc))
            how = f"the Lua executor broke the protocol ({exc}) and was killed"
        else:
            self._kill(child, why="")  # its session may hold programs it started
            how = describe_exit(child.proc.returncode)
        log.error("%s", how)
        return how

    def _kill(self, child: _Child, *, why: str) -> None:
        """SIGKILL the child and every process in its session (gleam.exec programs and
        what they started), then reap it."""
        if why:
            log.warning("killing the Lua executor (pid %d): %s", child.pid, why)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        for _ in range(2):  # a second pass for anything forked meanwhile
            for pid in session_members(child.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        child.proc.wait()
        child.channel.close()
        if self._child is child:
            self._child = None


def _pump_stderr(stream: IO[bytes], pid: int) -> None:
    """Log what the child writes to its stderr (a Lua panic, a traceback) until it exits."""
    logged = 0
    with stream:
        while raw := stream.readline(MAX_STDERR_LINE):
            line = raw.decode("utf-8", "replace").rstrip()
            if not line or logged > MAX_STDERR_LINES:
                continue  # read on, so that the child never blocks on a full pipe
            logged += 1
            if logged > MAX_STDERR_LINES:
                line = f"more than {MAX_STDERR_LINES} lines on standard error; the rest is dropped"
            log.warning("Lua executor (pid %d): %s", pid, line)
