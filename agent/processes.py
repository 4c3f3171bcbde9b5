"""Running programs for scripts (`gleam.exec`): no shell, a timeout, capped output.

This is the one module of the agent that starts programs for scripts. A program runs in
a process group of its own, so that a timeout kills it and everything it started, but
stays in the session of the process that started it: in the agent that is the Lua
executor's session, which the agent kills whole when it kills the executor. Its output is
read with a selector and capped, so a chatty program cannot exhaust the agent's memory.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

# Per stream: results go into etcd (512 KiB at most), so more output is never useful.
MAX_OUTPUT_BYTES = 1024 * 1024

# After the program itself exits, children it left behind may keep the pipes open;
# read for this long at most before returning without waiting for them.
_EXIT_GRACE_S = 0.2
_POLL_S = 0.25

# The address-space limit programs get (the one this process had before `cap_address_space`
# lowered its own), and a lock so that two threads starting programs agree on it.
_programs_address_space: int | None = None
_spawn_lock = threading.Lock()


def cap_address_space(limit: int) -> None:
    """Lower this process's soft RLIMIT_AS to `limit` bytes (a backstop behind the Lua
    allocator's cap). Programs started by `run_program` still get the limit the process
    had before: a memory cap meant for the Lua executor must not break `systemctl`."""
    global _programs_address_space
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        return  # already as low
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    _programs_address_space = soft


@contextlib.contextmanager
def _programs_limits() -> Iterator[None]:
    """While a program is started: the address-space limit it should inherit."""
    with _spawn_lock:
        lowered = _programs_address_space
        if lowered is None:
            yield
            return
        own, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (lowered, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (own, hard))


@dataclass(frozen=True)
class Completed:
    """What happened to one program run.

    `exit_code` is the program's exit status, or None when it did not exit by itself:
    it could not start, timed out, or died from a signal; `error` then says which.
    """

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    error: str | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def run_program(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    max_output: int = MAX_OUTPUT_BYTES,
) -> Completed:
    """Run `argv` (argv[0] looked up in PATH), without a shell, for at most `timeout` s.

    Raises ValueError for an unusable argv; every failure of the program itself (not
    found, not executable, timeout, signal) is reported in the returned Completed.
    """
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise ValueError("argv must be a non-empty list of strings")
    if any("\0" in arg for arg in argv):
        raise ValueError("argv must not contain NUL characters")
    deadline = time.monotonic() + max(0.0, timeout)
    try:
        with _programs_limits():
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                process_group=0,
            )
    except (OSError, subprocess.SubprocessError) as exc:
        return Completed(None, b"", b"", error=f"cannot run {argv[0]!r}: {exc}")
    with proc:
        out, err, truncated, timed_out = _pump(proc, stdin, deadline, max_output)
        if not timed_out:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        if timed_out:
            _kill_group(proc)
            return Completed(
                None, out, err, error=f"timed out after {timeout:g} s", truncated=truncated
            )
    code = proc.returncode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return Completed(None, out, err, error=f"killed by {name}", truncated=truncated)
    return Completed(code, out, err, truncated=truncated)


def _pump(
    proc: subprocess.Popen[bytes], stdin: bytes | None, deadline: float, max_output: int
) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin and read stdout/stderr until both close, the program exits (plus a
    grace period) or the deadline passes. Returns (stdout, stderr, truncated, timed_out)."""
    assert proc.stdout is not None and proc.stderr is not None
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = False
    pending = memoryview(stdin or b"")
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        if proc.stdin is not None:
            if pending:
                selector.register(proc.stdin, selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        exited_at: float | None = None
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return (
                    bytes(buffers[proc.stdout.fileno()]),
                    bytes(buffers[proc.stderr.fileno()]),
                    truncated,
                    True,
                )
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _EXIT_GRACE_S:
                break
            for key, _ in selector.select(timeout=min(deadline - now, _POLL_S)):
                stream = key.fileobj
                fd = key.fd
                if proc.stdin is not None and stream is proc.stdin:
                    try:
                        # At most PIPE_BUF bytes: a write that size never blocks once
                        # the selector says the pipe is writable.
                        written = os.write(fd, pending[: select.PIPE_BUF])
                        pending = pending[written:]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(stream)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(stream)
                    continue
                buffer = buffers[fd]
                room = max_output - len(buffer)
                if len(chunk) > room:
                    truncated = True
                    chunk = chunk[:room]
                buffer += chunk
    return (
        bytes(buffers[proc.stdout.fileno()]),
        bytes(buffers[proc.stderr.fileno()]),
        truncated,
        False,
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    proc.wait()
