"""systemd's readiness protocol (sd_notify(3)), spoken directly: one datagram per message
on the AF_UNIX socket named by $NOTIFY_SOCKET.

A message is newline-separated `KEY=VALUE` assignments: `READY=1` once the service is
serving, `WATCHDOG=1` as a keep-alive (systemd restarts a unit with `WatchdogSec=` whose
pings stop), `STATUS=<one line>` for `systemctl status`, `STOPPING=1` on shutdown. The
protocol is twenty lines, so no library: it is the documented datagram, no more.

Outside systemd (no $NOTIFY_SOCKET) every call does nothing. A send that fails is logged
once and otherwise ignored: a service must never stop because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger("gleam.sdnotify")

# A STATUS= line is for a human at `systemctl status`; keep it one short line.
MAX_STATUS_CHARS = 200


def encode(fields: Mapping[str, str]) -> bytes:
    """`KEY=VALUE` lines. A value cannot hold a newline (it would start a new assignment,
    so a status text could forge `READY=1`): newlines become spaces."""
    lines = []
    for name, value in fields.items():
        flat = " ".join(str(value).split("\n")).replace("\r", " ")
        lines.append(f"{name}={flat}")
    return "\n".join(lines).encode("utf-8", errors="replace")


def socket_address(raw: str | None) -> str | bytes | None:
    """The address in $NOTIFY_SOCKET: an absolute path, or `@name` for Linux's abstract
    namespace; None for anything else (unset, empty, or a kind this module does not
    speak, such as systemd's `vsock:` addresses)."""
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def watchdog_seconds(environ: Mapping[str, str], *, pid: int) -> float | None:
    """The watchdog timeout systemd set ($WATCHDOG_USEC) when it is meant for this process
    ($WATCHDOG_PID unset or equal to `pid`); None when there is no watchdog."""
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Notifier:
    """Sends notifications to systemd; a no-op when not started by it."""

    def __init__(self, address: str | bytes | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        address = socket_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket path this program can use", raw)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> bool:
        """Send one message; True if it was sent."""
        if self._address is None:
            return False
        data = encode(fields)
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)  # never wait on the supervisor
                self._sock.sendto(data, self._address)
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot notify systemd: %s (further failures not logged)", exc)
                    self._warned = True
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status[:MAX_STATUS_CHARS])

    def status(self, status: str) -> bool:
        return self.send(STATUS=status[:MAX_STATUS_CHARS])

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING="1", STATUS=status[:MAX_STATUS_CHARS])

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
