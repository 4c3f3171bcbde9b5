"""The agent's registration at `<prefix>/info/<id>`, bound to a lease it keeps alive.

A dead agent's lease expires and its record disappears. If the lease is lost while the
agent lives (etcd lost it, or the agent was cut off for longer than the TTL), the loop
grants a new lease and registers again. A clean shutdown revokes the lease, so the
record goes at once.

Every write of the record is guarded twice against landing late (etcd may apply a
request after its client gave up, or died): by the record's mod_revision as last seen, so
that a late write cannot replace a newer registration, and by its lease, so that a late
write whose lease is gone (revoked or expired) fails instead of bringing the record back.

The record is this agent's alone: if it finds the record held by another live agent
(one started with -takeover, or a duplicate that registered while this one was cut off),
it stops instead of writing it back, and the agent exits 1; the rule is
agent/preflight.py's `other_holder`.
"""

from __future__ import annotations

import logging
import threading

from agent import preflight, store
from agent.backoff import Backoff
from gleam import lease, messages

log = logging.getLogger("agent.registration")


# Every this many refreshes (once per TTL) the record itself is read back.
REFRESHES_PER_CHECK = 3


class TakenOver(Exception):
    """The registration is held by another live agent: this one must stop."""

    def __init__(self, holder: messages.AgentInfo) -> None:
        super().__init__(holder)
        self.holder = holder


class Registrar:
    def __init__(
        self,
        etcd: store.Store,
        *,
        key: str,
        info: messages.AgentInfo,
        ttl: int,
        backoff: Backoff | None = None,
        takeover: bool = False,
    ) -> None:
        self._etcd = etcd
        self._takeover = takeover  # the first registration may replace another holder's
        self.taken_over: messages.AgentInfo | None = None
        self._key = key
        self._info = info
        self._session = lease.LeaseSession(etcd, ttl=ttl, name="registration")
        self._backoff = backoff or Backoff()
        self._stop = threading.Event()
        self.registered = threading.Event()
        self.registrations = 0
        self.refreshes = 0

    @property
    def lease_id(self) -> int | None:
        return self._session.id or None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Register and keep the lease alive until `stop()`; then revoke it."""
        interval = self._session.interval
        pause = 0.0  # before the next refresh: the interval, or a backoff after a failure
        while not self._stop.wait(pause):
            try:
                if not self.registered.is_set():
                    _lease, interval = self._register()
                    pause = interval
                    continue
                lease_id = self._session.id
                if not self._session.refresh():
                    log.warning("lease %x is gone; registering again", lease_id)
                    self.registered.clear()
                    pause = 0.0
                else:
                    self.refreshes += 1
                    if self._backoff.failures:
                        log.info("lease %x kept alive again", lease_id)
                    if self.refreshes % REFRESHES_PER_CHECK == 0:
                        self._ensure_record(lease_id)
                    pause = interval
                self._backoff.reset()
            except TakenOver as exc:
                self.taken_over = exc.holder
                log.critical(
                    "%s; this agent stops (its lease is revoked, the record stays theirs)",
                    preflight.taken_message(self._key, exc.holder),
                )
                break
            except store.Denied as exc:
                log.error("registration: cannot write %s: %s; not registering", self._key, exc)
                self._revoke()
                self._stop.wait()
            except store.StoreError as exc:
                # The lease may well outlive a short outage: keep it and refresh it as
                # soon as etcd answers again; if it expired meanwhile, the refresh says so.
                level = logging.DEBUG if self._backoff.failures else logging.WARNING
                pause = min(self._backoff.next_delay(), interval)
                log.log(level, "registration: %s; retrying in %.1fs", exc, pause)
                self._etcd.reset()
            except Exception:  # noqa: BLE001 - a bug here must not end the registration
                pause = self._backoff.next_delay()
                log.exception("registration loop failed; retrying in %.1fs", pause)
                self._etcd.reset()
        self._revoke()

    def _ensure_record(self, lease_id: int) -> None:
        """Put the record back if it was deleted (or overwritten) while the lease lives:
        a live agent must stay listed. A lease found gone means registering anew; a
        record now held by another live agent means this one stops (TakenOver)."""
        value, mod_revision = self._etcd.read_records([self._key])[self._key]
        if value != self._info.encode():
            if (holder := preflight.other_holder(value, self._info)) is not None:
                raise TakenOver(holder)
            log.warning("%s was deleted or changed; registering again", self._key)
            try:
                self._put_record(lease_id, mod_revision)
            except store.LeaseNotFound:
                log.warning("lease %x is gone; registering again", lease_id)
                self._session.id = 0
                self.registered.clear()
                return
            self.registrations += 1

    def _put_record(self, lease_id: int, mod_revision: int) -> None:
        """Write the record bound to `lease_id` over the one seen at `mod_revision`. The
        live agent's record replaces whatever is there: if the compare fails (the record
        changed since it was read), it is tried again over the new one, a few times."""
        for _attempt in range(3):
            outcome = self._etcd.put_guarded(
                [store.Guarded(self._key, self._info.encode(), mod_revision, lease_id)]
            )
            if outcome.ok:
                return
            mod_revision = outcome.current[self._key]
        raise store.Unavailable(f"{self._key} keeps changing while it is written")

    def _register(self) -> tuple[int, float]:
        previous, mod_revision = self._etcd.read_records([self._key])[self._key]
        holder = preflight.other_holder(previous, self._info)
        if holder is not None:
            if self.registrations or not self._takeover:
                raise TakenOver(holder)
            log.warning("-takeover: replacing %s", preflight.taken_message(self._key, holder))
        lease_id, granted = self._session.grant()
        self._put_record(lease_id, mod_revision)
        self.registrations += 1
        self.registered.set()
        log.info("registered %s with lease %x (TTL %ds)", self._key, lease_id, granted)
        return lease_id, self._session.interval

    def _revoke(self) -> None:
        lease_id = self.lease_id
        if lease_id is None:
            return
        try:
            self._session.revoke()
            log.info("revoked lease %x; %s removed", lease_id, self._key)
        except store.StoreError as exc:
            log.warning(
                "could not revoke lease %x (%s); %s goes when the lease expires",
                lease_id,
                exc,
                self._key,
            )
        self.registered.clear()
        self._etcd.reset()
