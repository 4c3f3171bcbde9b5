"""Driving rollouts: read a region's task, gate record, registrations and results, ask
gleam.rollout what comes next, and write the gate in a guarded transaction.

Every gate write compares the gate's mod_revision and the region key's mod_revision
with what was read: two drivers never both admit a wave, and a driver never moves a
rollout whose task has been replaced. The loser of a race simply reads again.

Used by gleam-reconcile (its daemon drives every rollout; `--once --wait` those its pass
started) and by gleam-client (`rollout status|promote|abort`, `-rollout ... -wait`).

All etcd access goes through the typed seam (gleam.etcdapi), so the driver runs on
gleam.fake_etcd in tests (tests/test_rollout_driver.py); `Driver.over` wraps a connected
pyetcd client, and its callers still see pyetcd's errors (etcdapi.pyetcd_errors).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from gleam import connection, etcdapi, invalid_records, keys, messages, rollout

log = logging.getLogger("gleam.rollout")

_GETS_PER_TXN = 64  # below etcd's default --max-txn-ops (128)
POLL_SECONDS = 0.05


class RolloutRefused(Exception):
    """A promote or abort that cannot be done; the text says why."""


@dataclass(frozen=True)
class View:
    """One region's rollout as read from etcd."""

    region: str
    task_key: str
    task_revision: int  # 0: no task key
    plan: rollout.Plan | None  # None: the task is not staged
    gate: rollout.Gate | None
    gate_revision: int  # 0: no gate record
    live: frozenset[str] = frozenset()
    region_agents: tuple[str, ...] = ()
    reports: dict[str, rollout.Report] = field(default_factory=dict)

    @property
    def current(self) -> bool:
        """The gate is for the task's revision."""
        return self.gate is not None and self.gate.revision == self.task_revision


def now_utc() -> datetime:
    return datetime.now(UTC)


def _agents(
    backend: etcdapi.Backend, layout: keys.Layout, region: str
) -> tuple[frozenset[str], tuple[str, ...]]:
    """Live agents and the region's members, from the registrations that can be read
    (decoded as gleam-client status decodes them: one stored by hand under another
    agent's key is not a second member)."""
    found = backend.range(etcdapi.Range(layout.info_prefix, prefix=True)).kvs
    items = ((kv.key.decode("utf-8", "replace"), kv.value) for kv in found)
    agents = invalid_records.decode(items, layout).agents
    members = sorted(a.id for a in agents if region in a.regions)
    return frozenset(a.id for a in agents), tuple(members)


def _reports(
    backend: etcdapi.Backend,
    layout: keys.Layout,
    region: str,
    agents: Sequence[str],
    revision: int,
) -> dict[str, rollout.Report]:
    """Members' results for `revision` (a result for another revision is no report). A
    result record that cannot be read and was written after the task (`revision`) is a
    failure: nothing says the member ran it well, and the rollout must not go on over
    it (fail closed); an older unreadable record is no report yet."""
    target = keys.Target.region(region)
    out: dict[str, rollout.Report] = {}
    for start in range(0, len(agents), _GETS_PER_TXN):
        chunk = agents[start : start + _GETS_PER_TXN]
        found = backend.txn([], [etcdapi.Get(layout.result_key(a, target)) for a in chunk])
        for agent, kvs in zip(chunk, found.gets, strict=True):
            for kv in kvs:
                try:
                    result = messages.decode_result(kv.value)
                except messages.MessageError as exc:
                    if kv.mod_revision > revision:
                        key = kv.key.decode("utf-8", "replace")
                        error = f"result record {key} cannot be read: {exc}"
                        out[agent] = rollout.Report(ok=False, error=error)
                    continue
                if result.revision == revision:
                    out[agent] = rollout.Report(ok=result.ok, error=result.error or "")
    return out


def read(backend: etcdapi.Backend, layout: keys.Layout, region: str) -> View:
    task_key, gate_key = layout.region_key(region), layout.rollout_key(region)
    found = backend.txn([], [etcdapi.Get(task_key), etcdapi.Get(gate_key)])
    task_kvs, gate_kvs = found.gets
    task_revision, plan = 0, None
    for kv in task_kvs:
        task_revision, plan = kv.mod_revision, rollout.staged(kv.value)
    gate, gate_revision = None, 0
    for kv in gate_kvs:
        gate_revision = kv.mod_revision
        try:
            gate = rollout.decode_gate(kv.value)
        except rollout.RolloutError as exc:
            log.warning("%s: %s; a driver will start the rollout again", gate_key, exc)
    live, region_agents = _agents(backend, layout, region)
    view = View(region, task_key, task_revision, plan, gate, gate_revision, live, region_agents)
    if gate is not None and view.current:
        reports = _reports(backend, layout, region, gate.members, gate.revision)
        view = replace(view, reports=reports)
    return view


def write(backend: etcdapi.Backend, layout: keys.Layout, view: View, gate: rollout.Gate) -> bool:
    """Write `gate` if neither the gate record nor the task key changed since `view`."""
    gate_key = layout.rollout_key(view.region)
    guard = [
        etcdapi.Compare(gate_key, etcdapi.Target.MOD, view.gate_revision),
        etcdapi.Compare(view.task_key, etcdapi.Target.MOD, view.task_revision),
    ]
    return backend.txn(guard, [etcdapi.Put(gate_key, gate.encode())]).succeeded


def staged_regions(backend: etcdapi.Backend, layout: keys.Layout) -> list[str]:
    """Regions whose task key holds a staged task, or that have a gate record."""
    regions: set[str] = set()
    head = layout.tasks_prefix(keys.Kind.REGION)
    for kv in backend.range(etcdapi.Range(head, prefix=True)).kvs:
        name = kv.key.decode("utf-8", "replace")[len(head) :]
        if rollout.staged(kv.value) is not None and _valid(name):
            regions.add(name)
    return sorted(regions)


def _valid(name: str) -> bool:
    try:
        keys.validate_name(name, what="region")
    except keys.InvalidName:
        return False
    return True


class Driver:
    """Moves rollouts on, one look at a time. `say` gets the per-wave lines."""

    def __init__(
        self,
        backend: etcdapi.Backend,
        layout: keys.Layout,
        *,
        say: Callable[[str], None] = lambda line: log.info("%s", line),
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self._backend = backend
        self._layout = layout
        self.say = say
        self._clock = clock
        # (region, revision, wave) -> when this driver first saw the wave done (bake)
        self._done_since: dict[tuple[str, int, int], datetime] = {}
        self._said: set[tuple[str, int, int, str]] = set()

    @classmethod
    def over(cls, client: connection.Client, layout: keys.Layout, **options: Any) -> Driver:
        """A driver over a connected pyetcd client; `options` as for the constructor."""
        return cls(etcdapi.Pyetcd(client), layout, **options)

    def step(self, region: str) -> rollout.Gate | None:
        """One look at a region: start its rollout if its staged task has no gate for
        its revision, else advance it. Returns the gate as it now stands."""
        with etcdapi.pyetcd_errors():
            return self._step(region)

    def _step(self, region: str) -> rollout.Gate | None:
        for _attempt in range(5):
            view = read(self._backend, self._layout, region)
            if view.plan is None or view.task_revision == 0:
                return view.gate
            now = self._clock()
            if not view.current:
                gate = rollout.start(
                    view.plan,
                    key=view.task_key,
                    revision=view.task_revision,
                    region=region,
                    agents=view.region_agents,
                    now=now,
                )
                if write(self._backend, self._layout, view, gate):
                    self._announce(region, gate)
                    return gate
                continue
            assert view.gate is not None
            mark = (region, view.gate.revision, view.gate.wave)
            progress = rollout.advance(
                view.gate,
                view.plan,
                reports=view.reports,
                live=view.live,
                now=now,
                done_since=self._done_since.get(mark),
            )
            if progress.wave_done and view.gate.state is rollout.State.PROGRESSING:
                self._done_since.setdefault(mark, now)
                admitted = len(view.gate.admitted)
                self._once(
                    region,
                    view.gate,
                    "ok",
                    f"wave {view.gate.wave}/{view.gate.waves} ok ({len(progress.ok)}/{admitted})",
                )
            if progress.gate is None:
                return view.gate
            if write(self._backend, self._layout, view, progress.gate):
                self._announce(region, progress.gate, before=view.gate)
                return progress.gate
        return None

    def step_all(self, regions: Iterable[str] | None = None) -> dict[str, rollout.Gate | None]:
        with etcdapi.pyetcd_errors():
            names = staged_regions(self._backend, self._layout) if regions is None else regions
            return {region: self._step(region) for region in names}

    def _once(self, region: str, gate: rollout.Gate, what: str, line: str) -> None:
        mark = (region, gate.revision, gate.wave, what)
        if mark not in self._said:
            self._said.add(mark)
            self.say(line)

    def _announce(
        self, region: str, gate: rollout.Gate, *, before: rollout.Gate | None = None
    ) -> None:
        head = f"rollout {gate.key} @{gate.revision}"
        if gate.state is rollout.State.HALTED:
            self._once(region, gate, "halted", f"{head} halted: {gate.reason}")
        elif gate.state is rollout.State.COMPLETE:
            self._once(region, gate, "complete", f"{head} complete")
        elif gate.state is rollout.State.PAUSED:
            self._once(region, gate, "paused", f"{head} paused: waiting for promote")
        elif before is None or before.revision != gate.revision or before.wave != gate.wave:
            old = () if before is None or before.revision != gate.revision else before.admitted
            new = [m for m in gate.admitted if m not in old]
            self._once(
                region,
                gate,
                "admitted",
                f"wave {gate.wave}/{gate.waves} admitted: {' '.join(new) or '(nobody)'}",
            )

    # Hand-made moves --------------------------------------------------------------------
    def promote(self, region: str) -> rollout.Gate:
        return self._manual(
            region, lambda view, gate: rollout.promote(gate, _plan(view), now=self._clock())
        )

    def abort(self, region: str) -> rollout.Gate:
        return self._manual(region, lambda view, gate: rollout.abort(gate, now=self._clock()))

    def _manual(
        self, region: str, move: Callable[[View, rollout.Gate], rollout.Gate]
    ) -> rollout.Gate:
        with etcdapi.pyetcd_errors():
            return self._move(region, move)

    def _move(
        self, region: str, move: Callable[[View, rollout.Gate], rollout.Gate]
    ) -> rollout.Gate:
        for _attempt in range(5):
            view = read(self._backend, self._layout, region)
            if view.gate is None or not view.current:
                raise RolloutRefused(f"region {region} has no rollout for its current task")
            try:
                gate = move(view, view.gate)
            except rollout.RolloutError as exc:
                raise RolloutRefused(str(exc)) from None
            if write(self._backend, self._layout, view, gate):
                self._announce(region, gate, before=view.gate)
                return gate
        raise RolloutRefused(f"the rollout of region {region} kept changing; try again")


def _plan(view: View) -> rollout.Plan:
    if view.plan is None:
        raise rollout.RolloutError((), f"{view.task_key} is not a staged task")
    return view.plan


def drive(
    driver: Driver,
    regions: Sequence[str],
    *,
    timeout: float,
    poll: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, rollout.Gate | None]:
    """Drive `regions` until each rollout is complete, halted or aborted, or `timeout`."""
    deadline = clock() + timeout
    while True:
        gates = driver.step_all(regions)
        settled = all(
            g is not None
            and g.state in (rollout.State.COMPLETE, rollout.State.HALTED, rollout.State.ABORTED)
            for g in gates.values()
        )
        if settled or clock() >= deadline:
            return gates
        sleep(min(poll, max(0.0, deadline - clock())))


class DriverThread:
    """The reconcile daemon's driver: every rollout under the prefix, continuously.

    Every `scan` seconds it looks at every region task (a range read of them all); in
    between, every `poll` seconds, only at the regions whose rollout is running, so a
    fleet with many region keys does not have them all read twenty times a second."""

    def __init__(
        self,
        driver: Driver,
        *,
        stop: threading.Event,
        poll: float = POLL_SECONDS,
        scan: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._driver = driver
        self._stop = stop
        self._poll = poll
        self._scan = scan
        self._clock = clock
        self._kicked = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gleam-rollouts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        """Scan every region task now (a pass has just written some): the gates of new
        staged tasks follow their write at once, not up to `scan` seconds later."""
        self._kicked.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        active: list[str] = []
        next_scan = self._clock()
        while not self._stop.is_set():
            try:
                if self._clock() >= next_scan or self._kicked.is_set():
                    self._kicked.clear()
                    gates = self._driver.step_all()
                    next_scan = self._clock() + self._scan
                else:
                    gates = self._driver.step_all(active)
                active = [region for region, gate in gates.items() if running(gate)]
            except Exception:  # noqa: BLE001 - an etcd outage or a bug must not end the driver
                log.warning("driving rollouts failed; retrying", exc_info=True)
                self._stop.wait(1.0)
            self._kicked.wait(self._poll)


def running(gate: rollout.Gate | None) -> bool:
    """Does this rollout need a driver's eye (None: not started yet)?"""
    return gate is None or gate.state is rollout.State.PROGRESSING
