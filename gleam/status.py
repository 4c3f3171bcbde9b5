"""The fleet at a glance: live agents, and for each task key what each agent made of it.

`build` turns one `client.Snapshot` (plus where each key came from, and the time) into a
`FleetStatus`; `gleam.client_render` turns that into text or JSON. Pure: no etcd, no clock.

Who is "targeted": the live agents that watch a key (`client.watchers`). Each gets a row
that says whether it ran the key's current revision ok, failed, or has not yet (pending).
Agents that left a result for a key but are no longer registered get a row marked gone;
they count for nothing in the exit code (nobody is there to run anything).

A result record that cannot be decoded (gleam.invalid_records) gets a row marked invalid,
naming its key, whether its agent is live or not: only agents write there, so garbage
means a bug or a hand that should not write there, and it counts as a failure. So does a
registration that cannot be decoded (`invalid_registrations`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from gleam import client, invalid_records, keys, messages, provenance, rollout

# The JSON document's schema version (`--output json`); bump on incompatible changes.
SCHEMA_VERSION = 1


class RowState(StrEnum):
    OK = "ok"
    FAILED = "failed"
    PENDING = "pending"
    GONE = "gone"  # left a result, no longer registered
    HELD = "held"  # a staged region task its rollout has not admitted this agent to yet
    INVALID = "invalid"  # its result record for the key cannot be decoded


class TaskState(StrEnum):
    OK = "ok"  # every live targeted agent ran the current revision ok
    FAILED = "failed"  # at least one failed
    PENDING = "pending"  # none failed, at least one has not run it yet
    UNWATCHED = "unwatched"  # no live agent watches this key


@dataclass(frozen=True)
class AgentRow:
    """One targeted (or departed) agent's state for one task key."""

    agent: str
    state: RowState
    # What the agent's last result says about the key's current revision, also for a
    # departed agent (ok/failed: it ran this revision or a later one; pending: not yet).
    outcome: client.Outcome
    result: messages.Result | None = None
    # State INVALID: the record that cannot be read, and whether its agent is registered
    # (an unreadable record may be a departed agent's).
    invalid: invalid_records.InvalidRecord | None = None
    registered: bool = True

    @property
    def live(self) -> bool:
        return self.state is not RowState.GONE and self.registered

    @property
    def error_line(self) -> str | None:
        """The first non-empty line of the recorded error, when the run failed."""
        if self.result is None or self.result.ok or not self.result.error:
            return None
        return first_line(self.result.error)


@dataclass(frozen=True)
class TaskStatus:
    key: str
    target: str  # node/<id> or region/<name>
    revision: int
    function: str | None  # None when the stored value is not a valid task message
    invalid: str | None  # why the value is not a valid task message
    provenance: provenance.Provenance
    rows: tuple[AgentRow, ...]

    @property
    def state(self) -> TaskState:
        live = [r for r in self.rows if r.live]
        if not live:
            return TaskState.UNWATCHED
        if any(r.state in (RowState.FAILED, RowState.INVALID) for r in live):
            return TaskState.FAILED
        if any(r.state in (RowState.PENDING, RowState.HELD) for r in live):
            return TaskState.PENDING
        return TaskState.OK


@dataclass(frozen=True)
class AgentSummary:
    info: messages.AgentInfo
    up_seconds: float | None  # None when `started` is not an RFC 3339 time


@dataclass(frozen=True)
class Counts:
    ok: int
    failed: int
    pending: int
    gone: int
    unwatched: int  # task keys no live agent watches
    held: int = 0  # rows a rollout has not admitted yet
    invalid: int = 0  # rows whose result record cannot be decoded


@dataclass(frozen=True)
class RolloutStatus:
    """A region's rollout for its current task revision (gleam.rollout)."""

    region: str
    gate: rollout.Gate
    ok: int
    failed: int
    pending: int
    held: int

    @property
    def state(self) -> rollout.State:
        return self.gate.state


@dataclass(frozen=True)
class FleetStatus:
    prefix: str
    revision: int  # the etcd revision the snapshot was read at
    agents: tuple[AgentSummary, ...]
    tasks: tuple[TaskStatus, ...]
    applied_commit: str | None = None  # the reconciler's last applied commit, if known
    applied_time: str | None = None  # when the reconciler last applied
    rollouts: tuple[RolloutStatus, ...] = ()
    invalid_registrations: tuple[invalid_records.InvalidRecord, ...] = ()

    @property
    def counts(self) -> Counts:
        rows = [r for t in self.tasks for r in t.rows]
        return Counts(
            ok=sum(r.state is RowState.OK for r in rows),
            failed=sum(r.state is RowState.FAILED for r in rows),
            pending=sum(r.state is RowState.PENDING for r in rows),
            gone=sum(r.state is RowState.GONE for r in rows),
            unwatched=sum(t.state is TaskState.UNWATCHED for t in self.tasks),
            held=sum(r.state is RowState.HELD for r in rows),
            invalid=sum(r.state is RowState.INVALID for r in rows),
        )

    @property
    def exit_code(self) -> int:
        """0 when every targeted live agent ran its key's revision ok, 1 when one
        failed or a record cannot be read (failure wins over pending: it needs someone),
        2 when one is pending."""
        counts = self.counts
        states = {r.state for r in self.rollouts}
        unreadable = counts.invalid or self.invalid_registrations
        if counts.failed or unreadable or rollout.State.HALTED in states:
            return 1
        if counts.pending or states & {rollout.State.PROGRESSING, rollout.State.PAUSED}:
            return 2
        return 0


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_time(value: str) -> datetime | None:
    """An RFC 3339 time (`2026-11-28T22:50:01Z`, offsets, fractions) or None."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return parsed if parsed.tzinfo is not None else None


def _invalid_row(record: invalid_records.InvalidRecord, *, registered: bool) -> AgentRow:
    # Outcome pending: nothing readable says the agent ran the key's revision.
    return AgentRow(
        record.agent,
        RowState.INVALID,
        client.Outcome.PENDING,
        invalid=record,
        registered=registered,
    )


def _rows(
    entry: client.TaskEntry,
    agents: tuple[messages.AgentInfo, ...],
    results: Mapping[tuple[str, str], messages.Result],
    departed_ids: list[str],
    unreadable: Mapping[str, invalid_records.InvalidRecord],
) -> tuple[AgentRow, ...]:
    """The rows of one task key; `unreadable` holds its invalid result records by agent."""
    rows = []
    watching = client.watchers(entry.target, agents)
    for agent_id in watching:
        if agent_id in unreadable:
            rows.append(_invalid_row(unreadable[agent_id], registered=True))
            continue
        result = results.get((agent_id, entry.key))
        outcome = client.outcome_of(result, entry.revision)
        rows.append(AgentRow(agent_id, RowState(outcome.value), outcome, result))
    for agent_id in departed_ids:
        result = results[(agent_id, entry.key)]
        rows.append(
            AgentRow(agent_id, RowState.GONE, client.outcome_of(result, entry.revision), result)
        )
    live_ids = {a.id for a in agents}
    for agent_id in sorted(set(unreadable) - set(watching)):
        rows.append(_invalid_row(unreadable[agent_id], registered=agent_id in live_ids))
    return tuple(rows)


def build(
    snapshot: client.Snapshot,
    *,
    layout: keys.Layout,
    now: datetime,
    invalid: Iterable[invalid_records.InvalidRecord] = (),
) -> FleetStatus:
    """The status of every task key in `snapshot` (see the module docstring), with the
    commit each came from when the reconciler's records in the snapshot say so.
    `now` (timezone-aware) gives the agents' uptimes; `invalid` are the records of the
    snapshot that cannot be decoded (client.Snapshot.invalid)."""
    origin = provenance.read(snapshot.meta, snapshot.tasks, layout)
    live_ids = {a.id for a in snapshot.agents}
    results = {(r.agent, r.key): r for r in snapshot.results}
    unreadable: dict[str, dict[str, invalid_records.InvalidRecord]] = {}
    registrations = []
    for record in invalid:
        if record.task_key is None:
            registrations.append(record)
        else:
            unreadable.setdefault(record.task_key, {})[record.agent] = record
    departed: dict[str, list[str]] = {}
    for agent_id, key in sorted(results):
        if agent_id not in live_ids and agent_id not in unreadable.get(key, {}):
            departed.setdefault(key, []).append(agent_id)
    tasks = []
    for entry in snapshot.tasks:
        try:
            function: str | None = entry.decode().name
            refused = None
        except messages.MessageError as exc:
            function, refused = None, str(exc)
        tasks.append(
            TaskStatus(
                key=entry.key,
                target=entry.target.path,
                revision=entry.revision,
                function=function,
                invalid=refused,
                provenance=origin.keys.get(entry.key, provenance.Provenance()),
                rows=_rows(
                    entry,
                    snapshot.agents,
                    results,
                    departed.get(entry.key, []),
                    unreadable.get(entry.key, {}),
                ),
            )
        )
    agents = []
    for info in snapshot.agents:
        started = parse_time(info.started)
        up = max(0.0, (now - started).total_seconds()) if started is not None else None
        agents.append(AgentSummary(info, up))
    return FleetStatus(
        prefix=layout.prefix,
        revision=snapshot.revision,
        agents=tuple(agents),
        tasks=tuple(tasks),
        applied_commit=origin.applied_commit,
        applied_time=origin.applied_time,
        invalid_registrations=tuple(registrations),
    )


def with_rollouts(fleet: FleetStatus, gates: Mapping[str, rollout.Gate]) -> FleetStatus:
    """`fleet` with each region's rollout (region -> its gate record): the rows of agents
    its current revision has not admitted are `held`, not pending."""
    tasks, rollouts = [], []
    for task in fleet.tasks:
        kind, _, region = task.target.partition("/")
        gate = gates.get(region) if kind == keys.Kind.REGION.value else None
        if gate is None or gate.revision != task.revision:
            tasks.append(task)
            continue
        rows = tuple(
            replace(row, state=RowState.HELD)
            if row.state is RowState.PENDING and not gate.admits(row.agent, task.revision)
            else row
            for row in task.rows
        )
        tasks.append(replace(task, rows=rows))
        count = {state: sum(r.state is state for r in rows if r.live) for state in RowState}
        rollouts.append(
            RolloutStatus(
                region=region,
                gate=gate,
                ok=count[RowState.OK],
                failed=count[RowState.FAILED],
                pending=count[RowState.PENDING],
                held=count[RowState.HELD],
            )
        )
    return replace(fleet, tasks=tuple(tasks), rollouts=tuple(rollouts))
