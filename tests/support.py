"""Helpers for tests: deadline-bound waits, agent subprocesses, etcd clients."""

from __future__ import annotations

import contextlib
import os
import signal as signals
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gleam import connection

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SCRIPTS = ROOT / "scripts"

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate}"
                + (f" (last error: {last_exc!r})" if last_exc else "")
            )
        time.sleep(interval)


def client_for(endpoint: str) -> Any:
    return connection.connect(connection.make_settings(endpoint))


@contextlib.contextmanager
def connected(endpoint: str) -> Iterator[Any]:
    """A client for `endpoint`, closed afterwards (what the `etcd` fixtures yield)."""
    client = client_for(endpoint)
    try:
        yield client
    finally:
        client.close()


class AgentProcess:
    """A real gleam-agent subprocess with its log captured to a file."""

    def __init__(self, args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None):
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.gleam_agent", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=full_env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, *, sig: int = signals.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
