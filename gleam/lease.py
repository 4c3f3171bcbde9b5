"""A lease session: one etcd lease and the thread that keeps it alive until it is
closed, the shape of etcd's own `concurrency.Session`. Keys bound to the lease (the
apply lock) vanish when the holder dies and the TTL runs out.

Works over anything with the three lease calls of `etcdapi.Backend` (also
agent/store.Store's).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger("gleam.lease")


class Leases(Protocol):
    def grant_lease(self, ttl: int) -> tuple[int, int]: ...

    def keep_alive(self, lease: int) -> int: ...

    def revoke_lease(self, lease: int) -> None: ...


def refresh_interval(granted_ttl: int) -> float:
    """Refresh three times per TTL, so that two lost refreshes in a row are survived."""
    return max(0.5, granted_ttl / 3)


class LeaseSession:
    def __init__(self, leases: Leases, *, ttl: int, name: str = "gleam-lease") -> None:
        self._leases = leases
        self.ttl = ttl
        self._name = name
        self.id = 0  # 0: no lease (not open, or closed)
        self.lost = threading.Event()  # set when etcd says the lease is gone
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> int:
        """Grant the lease and start keeping it alive; its id."""
        self.id, granted = self._leases.grant_lease(self.ttl)
        self.lost.clear()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._keep_alive,
            args=(self.id, refresh_interval(granted), self._stop),
            name=f"{self._name}-keepalive",
            daemon=True,
        )
        self._thread.start()
        return self.id

    def _keep_alive(self, lease: int, interval: float, stop: threading.Event) -> None:
        """If refreshes fail for longer than the TTL the lease expires; whatever was
        bound to it (a lock's fencing compare) then stops further writes."""
        while not stop.wait(interval):
            try:
                if self._leases.keep_alive(lease) <= 0:
                    log.warning("%s: lease %x is gone", self._name, lease)
                    self.lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 - keep trying until closed
                log.warning("%s: could not refresh lease %x: %s", self._name, lease, exc)

    def close(self) -> None:
        """Stop the keep-alive and revoke the lease (best effort: its TTL frees it)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        if self.id:
            lease, self.id = self.id, 0
            try:
                self._leases.revoke_lease(lease)
            except Exception as exc:  # noqa: BLE001 - never mask the caller's own error
                log.debug("%s: could not revoke lease %x: %s", self._name, lease, exc)
