"""The subprocesses a benchmark runs, started as a user would start them.

Agents (`python -m agent.gleam_agent`), the reconciler (`gleam-reconcile`), and the
baselines' `etcdctl`. Every process is stopped by its own pid; output goes to log files
kept in the run's work directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from queue import Empty, Queue

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A workload could not be measured (a component failed or did not answer)."""


def console_script(name: str, module: str) -> list[str]:
    """The installed console script (what a user types), else `python -m module`."""
    script = BIN / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", module]


def etcdctl_binary() -> str:
    beside = BIN / "etcdctl"
    return str(beside) if beside.is_file() else "etcdctl"


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Daemon:
    """A long-running subprocess (agent, reconciler daemon, etcdctl watch)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        stdout: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                + _log_tail(self.log_path)
            )

    def rss_mib(self) -> float:
        """Resident memory of the process and its descendants (an agent and its Lua
        executor count as one agent)."""
        return _tree_sum(self.pid, rss_mib)

    def uss_mib(self) -> float:
        """Private memory of the process and its descendants."""
        return _tree_sum(self.pid, uss_mib)

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, *, timeout: float = 15.0) -> None:
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def check_all(daemons: Iterable[Daemon]) -> None:
    """BenchError naming the first daemon that has exited."""
    for daemon in daemons:
        daemon.check_alive()


def stop_all(daemons: Iterable[Daemon], *, timeout: float = 20.0) -> None:
    """SIGTERM every daemon first, then wait for each: a fleet stops in parallel."""
    daemons = list(daemons)
    for daemon in daemons:
        daemon.terminate()
    deadline = time.monotonic() + timeout
    for daemon in daemons:
        try:
            daemon.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(child) for child in children)
    return found


def _tree_sum(pid: int, measure: Callable[[int], float]) -> float:
    total = measure(pid)
    for child in process_tree(pid)[1:]:
        with contextlib.suppress(OSError):  # exited meanwhile (an etcdctl watch's `date`)
            total += measure(child)
    return total


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS from /proc/<pid>/status), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    if not found:
        raise BenchError(f"no VmRSS for pid {pid}")
    return int(found.group(1)) / 1024


def uss_mib(pid: int) -> float:
    """Memory only this process holds (private pages, from /proc/<pid>/smaps_rollup), in
    MiB: what each more agent on a host costs, shared libraries counted once."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    private = re.findall(r"^Private_(?:Clean|Dirty):\s+(\d+)\s+kB", rollup, re.MULTILINE)
    if not private:
        raise BenchError(f"no private memory figures for pid {pid}")
    return sum(int(kib) for kib in private) / 1024


def start_agent(
    *,
    endpoint: str,
    prefix: str,
    agent_id: str,
    regions: Sequence[str],
    script_dir: Path,
    log_dir: Path,
    extra: Sequence[str] = (),
) -> Daemon:
    argv = [
        sys.executable, "-m", "agent.gleam_agent",
        "-etcd", endpoint,
        "-prefix", prefix,
        "-id", agent_id,
        "-script", str(script_dir),
        "-log_level", "warning",
        "-state_dir", str(log_dir / "agent-state"),
        *(["-region", ":".join(regions)] if regions else []),
        *extra,
    ]  # fmt: skip
    return Daemon(f"agent {agent_id}", argv, log_path=log_dir / f"agent-{agent_id}.log")


def reconcile_argv(*, repo: Path, endpoint: str, prefix: str, once: bool = True) -> list[str]:
    argv = console_script("gleam-reconcile", "reconciler.launch")
    argv += ["--repo", str(repo), "-etcd", endpoint, "-prefix", prefix]
    return argv + (["--once"] if once else [])


def run_timed(argv: Sequence[str], *, log_path: Path, timeout: float = 600.0) -> float:
    """Run a command to completion; its wall time in seconds, process start included.
    A non-zero exit is a BenchError carrying the end of its output."""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT
        )
        # A plain blocking wait: Popen.wait(timeout=...) polls with sleeps of up to 50 ms,
        # which would round every measured time up to the next poll. The timer enforces
        # the time limit instead.
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            returncode = proc.wait()
        finally:
            killer.cancel()
        elapsed = time.perf_counter() - started
    if returncode != 0:
        raise BenchError(
            f"{argv[0]} exited with {returncode}; log {log_path}:\n" + _log_tail(log_path)
        )
    return elapsed


# --- marker lines ------------------------------------------------------------------------

# The trivial command the `etcdctl watch -- CMD` baselines run per event: `date` writes
# one line as soon as it runs, like the benchmark's Lua chunks do.
MARK = "DATE"
MARK_COMMAND = ("date", f"+{MARK}%s.%N")


class MarkerLines:
    """Lines that commands and Lua chunks write as they start, read in a thread and
    stamped with the wall time they arrived. The benchmark's own clock stamps both the
    write of a task and the arrival of its line, so no other process's clock is trusted."""

    def __init__(self, read_fd: int, *, write_fd: int | None = None) -> None:
        self._write_fd = write_fd
        self._queue: Queue[tuple[str, float]] = Queue()
        self._thread = threading.Thread(
            target=self._read, args=(read_fd,), name="marker-lines", daemon=True
        )
        self._thread.start()

    @classmethod
    def pipe(cls) -> MarkerLines:
        """For child processes: hand them `write_fd` as stdout, then `close_writer()`."""
        read_fd, write_fd = os.pipe()
        return cls(read_fd, write_fd=write_fd)

    @classmethod
    def fifo(cls, path: Path) -> MarkerLines:
        """A named pipe any process (a Lua chunk too) can open and write a line into.
        Opened read-write here, so writers never block and the reader never sees EOF."""
        os.mkfifo(path)
        return cls(os.open(path, os.O_RDWR))

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as stream:
            pending = b""
            while chunk := stream.read(65536):
                now = time.time()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._queue.put((line.decode("utf-8", "replace"), now))

    @property
    def write_fd(self) -> int:
        """The write end of a `pipe()`, to hand to child processes as their stdout."""
        if self._write_fd is None:
            raise BenchError("this marker reader has no open write end")
        return self._write_fd

    def close_writer(self) -> None:
        """Close the parent's copy of the write end once the children hold theirs."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def next(self, *, timeout: float) -> tuple[str, float]:
        """The next line and the wall time it arrived."""
        try:
            return self._queue.get(timeout=timeout)
        except Empty:
            raise BenchError(f"no marker line within {timeout}s") from None

    def next_mark(self, *, timeout: float) -> float:
        """The arrival time of the next `date` marker line (other output is skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line, arrived = self.next(timeout=max(0.05, deadline - time.monotonic()))
            if line.startswith(MARK):
                return arrived

    def drain(self) -> int:
        count = 0
        while True:
            try:
                self._queue.get_nowait()
                count += 1
            except Empty:
                return count


def start_etcdctl_watch(
    *, endpoint: str, key: str, prefix: bool, stdout_fd: int, log_dir: Path, name: str
) -> Daemon:
    """`etcdctl watch KEY -- date ...`: the shell alternative to an agent."""
    argv = [
        etcdctl_binary(), "--endpoints", endpoint, "watch", key,
        *(["--prefix"] if prefix else []), "--", *MARK_COMMAND,
    ]  # fmt: skip
    return Daemon(name, argv, log_path=log_dir / f"{name}.log", stdout=stdout_fd)
