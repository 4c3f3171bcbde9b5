"""The reconciler daemon as operations see it: systemd readiness and watchdog, /healthz,
and Prometheus metrics (only with -metrics).

    READY=1     once the first pass is done (whatever its outcome: STATUS= says it)
    WATCHDOG=1  while the loop goes round: between passes it does every half second; a
                pass may take --lock_timeout + PASS_GRACE seconds
    /healthz    200 unless the last pass failed for an etcd reason (or none has run yet)

Metrics come from each pass's report (`on_pass`), and the fleet gauges from the same
consistent read `gleam-client status` uses (`client.read_snapshot` + `status.build`),
taken when Prometheus scrapes, at most once per FLEET_CACHE_SECONDS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gleam import client, connection, etcdapi, liveness, metrics, status
from gleam.liveness import Health
from gleam.metrics import ListenError
from gleam.version import VERSION
from reconciler import diff, manifests, reconcile, render, sync

if TYPE_CHECKING:
    from reconciler.daemon import Daemon, PassReport

__all__ = ["ListenError", "Observer"]

log = logging.getLogger("gleam.reconcile.observe")

# Beyond --lock_timeout, how long one pass may take before the loop counts as wedged: a
# full apply of 10,000 manifests takes seconds, a --pull over a slow link longer.
PASS_GRACE = 600.0
# Between passes the loop goes round every half second (plus the debounce).
WAIT_SLACK = 5.0

# What reading the fleet raises: pyetcd's errors, and the typed seam's (invalid_records).
FLEET_READ_ERRORS: tuple[type[BaseException], ...] = (*connection.ETCD_ERRORS, etcdapi.EtcdError)

# Scrapes closer together than this share one etcd read for the fleet gauges.
FLEET_CACHE_SECONDS = 5.0


class PassResult(StrEnum):
    OK = "ok"
    INVALID = "invalid"  # a manifest failed validation; nothing written
    REFUSED = "refused"  # the commit guard, --prune's safety or --max_write_mib refused the pass
    ERROR = "error"  # anything else: etcd, git, the lock, a bug


def classify(report: PassReport) -> PassResult:
    if report.error is None:
        return PassResult.OK
    if isinstance(report.cause, manifests.InvalidManifests):
        return PassResult.INVALID
    if isinstance(
        report.cause, reconcile.GuardRefused | reconcile.PruneRefused | reconcile.TooLarge
    ):
        return PassResult.REFUSED
    return PassResult.ERROR


def etcd_failure(report: PassReport) -> bool:
    """The pass failed because of etcd (not the repository, not another reconciler)."""
    return isinstance(report.cause, (*connection.ETCD_ERRORS, sync.EtcdFailed, sync.LockLost))


def drift_corrections(result: reconcile.Pass) -> int:
    """Keys put back by a pass whose commit had already been applied (the daemon's drift
    rule: nothing changed in git, so every write undoes a change made by hand)."""
    if result.previous is None or result.previous.commit != result.desired.commit:
        return 0
    return sum(1 for c in result.applied if c.action in diff.WRITES)


def health(last: PassReport | None) -> Health:
    if last is None:
        return Health.bad("starting: the first pass has not finished")
    if last.error is not None and etcd_failure(last):
        return Health.bad(f"the last pass failed: etcd: {last.error}")
    return Health.good(f"ok: last pass {classify(last).value}")


def status_line(last: PassReport | None) -> str:
    if last is None:
        return "starting: first pass"
    if last.error is not None:
        return f"pass {last.number} failed: {last.error}"
    assert last.result is not None
    return f"pass {last.number}: {render.summary(last.result)}"


class Observer:
    """Watches the daemon's passes; runs the systemd pinger and, with -metrics, the HTTP
    listener."""

    def __init__(
        self,
        daemon: Daemon,
        *,
        etcd: Any,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.daemon = daemon
        self._etcd = etcd
        self._clock = clock
        self.last: PassReport | None = None
        self.metrics: ReconcileMetrics | None = None
        self._pass_limit = daemon.options.lock_timeout + PASS_GRACE
        self._wait_limit = daemon.settings.debounce + 0.5 + WAIT_SLACK
        previous = daemon.on_pass

        def on_pass(report: PassReport) -> None:
            self.on_pass(report)
            if previous is not None:
                previous(report)

        daemon.on_pass = on_pass
        self.watched = liveness.Watched(self.verdict, environ=environ)

    def on_pass(self, report: PassReport) -> None:
        self.last = report
        if self.metrics is not None:
            self.metrics.on_pass(report)

    def stalled(self) -> tuple[str, ...]:
        now, busy = self._clock(), self.daemon.busy_since
        if busy is not None:
            wedged = liveness.overdue(now, busy, self._pass_limit)
            return (f"pass (running for {now - busy:.0f}s)",) if wedged else ()
        if liveness.overdue(now, self.daemon.alive_at, self._wait_limit):
            return (f"loop (no round for {now - self.daemon.alive_at:.0f}s)",)
        return ()

    def verdict(self) -> liveness.Verdict:
        wedged = self.stalled()
        if self.daemon.stop.is_set():
            return liveness.Verdict(self.last is not None, wedged, "stopping", stopping=True)
        text = f"stalled: {', '.join(wedged)}" if wedged else status_line(self.last)
        return liveness.Verdict(ready=self.last is not None, stalled=wedged, status=text)

    def health(self) -> Health:
        wedged = self.stalled()
        return Health.bad(f"stalled: {', '.join(wedged)}") if wedged else health(self.last)

    def start(self, address: tuple[str, int] | None) -> None:
        """Start the pinger (under systemd) and the listener (with -metrics); raises
        ListenError when the address cannot be listened on."""

        def register(registry: Any) -> None:
            self.metrics = ReconcileMetrics(registry, fleet=self._fleet_reader())

        self.watched.start(address, health=self.health, register=register)

    def _fleet_reader(self) -> Callable[[], status.FleetStatus]:
        daemon = self.daemon

        def read() -> status.FleetStatus:
            snapshot = client.read_snapshot(self._etcd, daemon.layout)
            now = datetime.now(UTC)
            return status.build(snapshot, layout=daemon.layout, now=now, invalid=snapshot.invalid)

        return read

    def stop(self) -> None:
        self.watched.stop()


class ReconcileMetrics:
    """gleam_reconcile_* from each pass's report; gleam_fleet_* read at scrape time."""

    def __init__(self, registry: Any, *, fleet: Callable[[], status.FleetStatus]) -> None:
        prom = metrics.load()
        self.passes = prom.Counter(
            "gleam_reconcile_passes", "Reconcile passes, by result", ["result"], registry=registry
        )
        for result in PassResult:
            self.passes.labels(result.value)
        self.duration = prom.Histogram(
            "gleam_reconcile_duration_seconds",
            "How long passes took, by mode (incremental: only the manifests changed)",
            ["mode"],
            buckets=metrics.DURATION_BUCKETS,
            registry=registry,
        )
        for mode in ("full", "incremental"):
            self.duration.labels(mode)
        self.changes = prom.Counter(
            "gleam_reconcile_changes",
            "Changes applied to etcd, by action",
            ["action"],
            registry=registry,
        )
        for action in diff.Action:
            self.changes.labels(action.value)
        self.drift = prom.Counter(
            "gleam_reconcile_drift_corrections",
            "Keys put back after someone changed them by hand",
            registry=registry,
        )
        self.last_success = prom.Gauge(
            "gleam_reconcile_last_success_timestamp_seconds",
            "When the last pass succeeded (Unix time; 0: none yet)",
            registry=registry,
        )
        prom.Info("gleam_reconcile", "The reconciler's version", registry=registry).info(
            {"version": VERSION}
        )
        self._fleet = fleet
        self._fleet_cache: tuple[float, status.FleetStatus] | None = None
        self._fleet_lock = threading.Lock()
        registry.register(self)

    def on_pass(self, report: PassReport) -> None:
        self.passes.labels(classify(report).value).inc()
        result = report.result
        if result is None:
            return
        self.duration.labels(result.desired.mode).observe(report.seconds)
        for change in result.applied:
            self.changes.labels(change.action.value).inc()
        self.drift.inc(drift_corrections(result))
        self.last_success.set_to_current_time()

    def fleet(self) -> status.FleetStatus | None:
        """The fleet's status, read again when the cached one is older than
        FLEET_CACHE_SECONDS; None when etcd cannot be read."""
        with self._fleet_lock:
            now = time.monotonic()
            if self._fleet_cache is None or now - self._fleet_cache[0] > FLEET_CACHE_SECONDS:
                try:
                    self._fleet_cache = (now, self._fleet())
                except FLEET_READ_ERRORS as exc:
                    log.debug("fleet gauges: etcd: %s", connection.describe_error(exc))
                    return None
            return self._fleet_cache[1]

    def describe(self) -> list[Any]:
        return []  # the fleet is read at scrape time, not at registration

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        fleet = self.fleet()
        if fleet is None:
            return  # absent, not zero: etcd could not be read
        yield GaugeMetricFamily(
            "gleam_fleet_agents", "Live (registered) agents", value=len(fleet.agents)
        )
        results = GaugeMetricFamily(
            "gleam_fleet_results",
            "Agent results for the current task revisions, by state (as gleam-client status)",
            labels=["state"],
        )
        counts = fleet.counts
        # "held" (held back by a rollout) comes with rollouts, as does gleam_rollouts{state}.
        for state in status.RowState:
            results.add_metric([state.value], getattr(counts, state.value))
        yield results
