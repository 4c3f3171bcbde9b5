"""Tell systemd how a daemon is doing, from the real state of its loops.

Each loop of a daemon leaves a timestamp where it goes round (the agent's watch loop, its
worker while it runs a task, the reconciler's pass loop). A `Pinger` thread asks a
`check` function, every tick, for a `Verdict` built from those stamps, and:

- sends `READY=1` (with a `STATUS=`) the first time the verdict is ready;
- sends `WATCHDOG=1` every half watchdog period, but only while no loop is overdue: a
  wedged loop stops the pings, and systemd restarts the service (`WatchdogSec=`);
- sends `STATUS=` whenever the one-line status changes;
- sends `STOPPING=1` once the daemon starts shutting down, and from then on pings
  whatever the loops do (they are being stopped; systemd's TimeoutStopSec= bounds it).

`decide` is the pure part: what to send on a tick, given what was sent before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gleam import sdnotify

if TYPE_CHECKING:
    from gleam.health import Listener

log = logging.getLogger("gleam.liveness")

TICK_SECONDS = 0.25
MIN_TICK_SECONDS = 0.05  # however short WatchdogSec= is, no busy loop


@dataclass(frozen=True)
class Health:
    """What /healthz answers: 200 with `reason` when ok, else 503 with it."""

    ok: bool
    reason: str  # one line

    @classmethod
    def good(cls, reason: str = "ok") -> Health:
        return cls(True, reason)

    @classmethod
    def bad(cls, reason: str) -> Health:
        return cls(False, reason)


@dataclass(frozen=True)
class Verdict:
    ready: bool  # serving: READY=1 may be sent
    stalled: tuple[str, ...]  # loops that missed their deadline: no WATCHDOG=1
    status: str  # one line for STATUS=
    stopping: bool = False  # shutting down: STOPPING=1


def overdue(now: float, since: float | None, limit: float) -> bool:
    """A loop that last showed life at `since` (None: idle, waiting for work) is overdue
    once more than `limit` seconds have passed."""
    return since is not None and now - since > limit


@dataclass(frozen=True)
class Sent:
    """What the pinger has told systemd so far."""

    ready: bool = False
    status: str | None = None
    next_ping: float = 0.0  # monotonic time the next WATCHDOG=1 is due
    stalled: tuple[str, ...] = ()
    stopping: bool = False


def decide(
    verdict: Verdict, sent: Sent, *, now: float, watchdog: float | None
) -> tuple[dict[str, str], Sent]:
    """The fields to send on this tick (maybe none) and the new `Sent`."""
    fields: dict[str, str] = {}
    ready, next_ping = sent.ready, sent.next_ping
    stopping = sent.stopping or verdict.stopping
    if verdict.ready and not ready and not stopping:
        fields["READY"] = "1"
        ready = True
    if stopping and not sent.stopping:
        fields["STOPPING"] = "1"
    if verdict.status != sent.status:
        fields["STATUS"] = verdict.status[: sdnotify.MAX_STATUS_CHARS]
    # While stopping, the loops end one by one: that is no wedge.
    alive = stopping or not verdict.stalled
    if watchdog is not None and alive and now >= next_ping:
        fields["WATCHDOG"] = "1"
        # systemd's advice: ping at half the timeout, so one late tick is survived.
        next_ping = now + watchdog / 2
    return fields, Sent(ready, verdict.status, next_ping, verdict.stalled, stopping)


class Pinger:
    """The thread that runs `decide` every tick and sends what it says."""

    def __init__(
        self,
        notifier: sdnotify.Notifier,
        check: Callable[[], Verdict],
        *,
        watchdog: float | None,
        tick: float = TICK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self._check = check
        self._watchdog = watchdog
        self._tick = max(MIN_TICK_SECONDS, min(tick, watchdog / 4) if watchdog else tick)
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the thread ticks, and so may a shutdown
        self.sent = Sent()

    @classmethod
    def from_environ(
        cls, check: Callable[[], Verdict], environ: Mapping[str, str] | None = None
    ) -> Pinger:
        """A pinger for the socket and watchdog period systemd put in the environment."""
        env = os.environ if environ is None else environ
        return cls(
            sdnotify.Notifier.from_environ(env),
            check,
            watchdog=sdnotify.watchdog_seconds(env, pid=os.getpid()),
        )

    def start(self) -> None:
        if not self._notifier.enabled:
            return  # not under systemd: nothing to tell anyone
        self._thread = threading.Thread(target=self._run, name="gleam-sdnotify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self._tick):
                return

    def tick(self) -> None:
        with self._lock:
            self._tick_locked()

    def _tick_locked(self) -> None:
        try:
            verdict = self._check()
        except Exception:  # noqa: BLE001 - a bug here must not kill the pinger silently
            log.exception("liveness check failed; no watchdog ping this time")
            return
        fields, sent = decide(verdict, self.sent, now=self._clock(), watchdog=self._watchdog)
        if sent.stopping:
            pass  # loops ending during shutdown are expected
        elif sent.stalled and sent.stalled != self.sent.stalled:
            log.error(
                "%s stalled: watchdog pings stopped (systemd restarts the service)",
                ", ".join(sent.stalled),
            )
        elif self.sent.stalled and not sent.stalled:
            log.warning("%s going again: watchdog pings resumed", ", ".join(self.sent.stalled))
        if fields:
            self._notifier.send(**fields)
        self.sent = sent

    def stop(self) -> None:
        """Stop pinging (after STOPPING=1, if the verdicts never said stopping)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if not self.sent.stopping:
            self._notifier.stopping()
        self._notifier.close()


class Watched:
    """How a daemon is watched from outside: the systemd pinger (under systemd) and,
    with -metrics, the HTTP listener for /metrics and /healthz. The agent's and the
    reconciler's observers each own one."""

    def __init__(
        self, verdict: Callable[[], Verdict], *, environ: Mapping[str, str] | None = None
    ) -> None:
        self.pinger = Pinger.from_environ(verdict, environ)
        self.listener: Listener | None = None

    def start(
        self,
        address: tuple[str, int] | None,
        *,
        health: Callable[[], Health],
        register: Callable[[Any], object],
    ) -> None:
        """Start the pinger and, given an address, the listener with the metrics that
        `register` adds to a new registry. Raises metrics.ListenError when the address
        cannot be listened on."""
        if address is not None:
            from gleam import health as http  # http.server only with -metrics
            from gleam import metrics

            registry = metrics.new_registry()
            register(registry)
            self.listener = http.serve(address, registry, health=health)
        self.pinger.start()

    def stop(self) -> None:
        self.pinger.stop()
        if self.listener is not None:
            self.listener.close()
