"""Helpers for the operations tests: a fake systemd notify socket, scraping /metrics with
prometheus_client's own parser, and asking /healthz."""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class NotifySocket:
    """A real AF_UNIX datagram socket, as systemd's $NOTIFY_SOCKET is; every datagram
    received is kept with the monotonic time it arrived."""

    def __init__(self) -> None:
        # Its own short directory: a socket path must fit in 108 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="gleam-notify-"))
        self.path = str(self._dir / "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def env(self, *, watchdog_seconds: float | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.path}
        if watchdog_seconds is not None:
            env["WATCHDOG_USEC"] = str(int(watchdog_seconds * 1_000_000))
        return env

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[tuple[float, dict[str, str]]]:
        out = []
        for at, text in list(self.messages):
            pairs = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            out.append((at, pairs))
        return out

    def wait_for(self, name: str, value: str | None = None, *, timeout: float = 30.0) -> float:
        """When a message first set `name` (to `value`, if given)."""

        def seen() -> float | None:
            for at, pairs in self.fields():
                if name in pairs and (value is None or value in pairs[name]):
                    return at
            return None

        found = wait_until(seen, timeout=timeout, what=f"{name}={value or '*'} from the service")
        return found

    def pings_after(self, moment: float) -> list[float]:
        return [at for at, pairs in self.fields() if at > moment and pairs.get("WATCHDOG") == "1"]

    def last_status(self) -> str:
        statuses = [pairs["STATUS"] for _at, pairs in self.fields() if "STATUS" in pairs]
        return statuses[-1] if statuses else ""

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def metrics_url(log_text: str) -> str | None:
    """The listener's address from the "serving http://.../metrics" log line."""
    found = re.search(r"serving (http://\S+)/metrics", log_text)
    return found.group(1) if found else None


def scrape(base: str) -> Samples:
    """Every sample on /metrics, parsed by prometheus_client: (name, labels) -> value."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples: Samples) -> set[str]:
    return {name for name, _labels in samples}


def healthz(base: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
