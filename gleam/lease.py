"""A lease session: one etcd lease, its refreshes and its end, the shape of etcd's own
`concurrency.Session`. Keys bound to the lease (an agent's registration, the apply
lock) vanish when their holder dies and the TTL runs out.

The agent's registration drives the refreshes from its own loop (`grant`, `refresh`,
`revoke`), with its backoff; the apply lock lets the session refresh from a thread of
its own (`open`, `close`). Works over anything with the three lease calls of
`etcdapi.Backend` (agent/store.Store has them too).
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
        self.id = 0  # 0: no lease (none granted yet, revoked, or found gone)
        self.interval = refresh_interval(ttl)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Driven by the caller ---------------------------------------------------------

    def grant(self) -> tuple[int, int]:
        """A new lease: (id, granted TTL)."""
        self.id, granted = self._leases.grant_lease(self.ttl)
        self.interval = refresh_interval(granted)
        return self.id, granted

    def refresh(self) -> bool:
        """Keep the lease alive for another TTL; False (and no lease) when etcd no
        longer has it. etcd's errors pass through: the lease may outlive an outage."""
        if self._leases.keep_alive(self.id) > 0:
            return True
        self.id = 0
        return False

    def revoke(self) -> None:
        """End the lease now (its keys go at once); etcd's errors pass through."""
        lease, self.id = self.id, 0
        if lease:
            self._leases.revoke_lease(lease)

    # Refreshed by a thread of its own ------------------------------------------------

    def open(self) -> int:
        """Grant the lease and keep it alive from a thread until `close()`; its id."""
        self.grant()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._keep_alive,
            args=(self._stop,),
            name=f"{self._name}-keepalive",
            daemon=True,
        )
        self._thread.start()
        return self.id

    def _keep_alive(self, stop: threading.Event) -> None:
        """If refreshes fail for longer than the TTL the lease expires; whatever was
        bound to it (a lock's fencing compare) then stops further writes."""
        while not stop.wait(self.interval):
            try:
                if not self.refresh():
                    log.warning("%s: the lease is gone", self._name)
                    return
            except Exception as exc:  # noqa: BLE001 - keep trying until closed
                log.warning("%s: could not refresh the lease: %s", self._name, exc)

    def close(self) -> None:
        """Stop refreshing and revoke the lease (best effort: its TTL ends it anyway)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.revoke()
        except Exception as exc:  # noqa: BLE001 - never mask the caller's own error
            log.debug("%s: could not revoke the lease: %s", self._name, exc)
