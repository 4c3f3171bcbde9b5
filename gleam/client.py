"""The public Python client: send a task, list agents, read and wait for results.

gleam-client, gleam-reconcile --wait and the status command are built on these
functions; scripts can use them too (see the README). Every function takes a connected
pyetcd client (from `gleam.connection.connect`) and a `keys.Layout`, and raises pyetcd's
errors (connection.ETCD_ERRORS).

Reads go through the typed seam (gleam.etcdapi). The send's guarded write still calls
pyetcd's `transaction` itself: tests/test_client_send.py loses its answers there, the
way a network does, to check that a write in doubt lands at most once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from gleam import connection, etcdapi, invalid_records, keys, messages, signing


def send_task(
    etcd: connection.Client, layout: keys.Layout, target: keys.Target, task: messages.Task
) -> int:
    """Write `task` to the target's key; returns the write's revision (the key's new
    mod_revision, which agents put in their results). See `send_tasks`."""
    return send_tasks(etcd, layout, [target], task)


def list_agents(etcd: connection.Client, layout: keys.Layout) -> list[messages.AgentInfo]:
    """Live agents: those whose lease-bound registration is present, sorted by id.
    A registration that cannot be decoded is skipped rather than failing the listing."""
    return read_agents(etcd, layout)[0]


def read_agents(
    etcd: connection.Client, layout: keys.Layout
) -> tuple[list[messages.AgentInfo], tuple[invalid_records.InvalidRecord, ...]]:
    """The registrations that decode (live agents, sorted by id) and those that do not
    (by key, with why), from one read."""
    items = ((_key(kv), kv.value) for kv in _range(etcd, layout.info_prefix).kvs)
    decoded = invalid_records.decode(items, layout)
    return sorted(decoded.agents, key=lambda a: a.id), decoded.invalid


def read_results(etcd: connection.Client, layout: keys.Layout) -> list[messages.Result]:
    """Every result record under the prefix (including those of departed agents)."""
    return read_result_records(etcd, layout)[0]


# (agent id, task key) -> what is wrong with that agent's result record for the key.
Unreadable = Mapping[tuple[str, str], str]


def read_result_records(
    etcd: connection.Client, layout: keys.Layout
) -> tuple[list[messages.Result], Unreadable]:
    """The result records that decode, and those that do not (by agent and task key,
    with the record's key and why), from one read."""
    items = ((_key(kv), kv.value) for kv in _range(etcd, layout.results_prefix).kvs)
    decoded = invalid_records.decode(items, layout)
    unreadable = {
        (record.agent, record.task_key or ""): f"{record.key}: {record.error}"
        for record in decoded.invalid
    }
    return list(decoded.results), unreadable


def _key(kv: etcdapi.KeyValue) -> str:
    return kv.key.decode("utf-8", "replace")


def _range(etcd: connection.Client, key: str, *, prefix: bool = True) -> etcdapi.RangeResult:
    """Every key under `key` (or that key alone), read through the typed seam; raises
    pyetcd's errors, as every function here does (etcdapi.pyetcd_errors)."""
    with etcdapi.pyetcd_errors():
        return etcdapi.Pyetcd(etcd).range(etcdapi.Range(key, prefix=prefix))


def watchers(target: keys.Target, agents: Iterable[messages.AgentInfo]) -> list[str]:
    """Ids of the agents that watch `target`: the node's own agent, or a region's members."""
    if target.kind is keys.Kind.NODE:
        return sorted(a.id for a in agents if a.id == target.name)
    return sorted(a.id for a in agents if target.name in a.regions)


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    PENDING = "pending"  # no result for this revision (yet)
    INVALID = "invalid"  # the agent's result record for the key cannot be read


@dataclass(frozen=True)
class Report:
    """One agent's answer (or silence) for one task key at one revision."""

    agent: str
    key: str
    revision: int
    outcome: Outcome
    result: messages.Result | None = None
    invalid: str | None = None  # INVALID: the record's key and why it cannot be read

    @property
    def error(self) -> str | None:
        return self.result.error if self.result is not None else None


def outcome_of(result: messages.Result | None, revision: int) -> Outcome:
    """Pure: what one agent's result (or none) says about a write at `revision`. A
    result for a later revision also answers (the agent coalesced that write into a
    newer one, or ran it and then a newer one)."""
    if result is None or result.revision < revision:
        return Outcome.PENDING
    return Outcome.OK if result.ok else Outcome.FAILED


def judge(
    expected: Mapping[str, int],
    agents: Iterable[messages.AgentInfo],
    results: Iterable[messages.Result],
    layout: keys.Layout,
    unreadable: Unreadable | None = None,
) -> list[Report]:
    """Pure: for each task key at its expected revision, each watching agent's outcome
    (see outcome_of); INVALID where the agent's result record for the key is there but
    cannot be read (garbage in the key: nothing says the task ran, and waiting longer
    would only turn it into "no answer")."""
    agent_list = list(agents)
    by_agent_key = {(r.agent, r.key): r for r in results}
    reports = []
    for key, revision in sorted(expected.items()):
        target = layout.parse_task_key(key)
        if target is None:
            raise keys.InvalidName(f"{key!r} is not a task key under {layout.prefix}")
        for agent_id in watchers(target, agent_list):
            result = by_agent_key.get((agent_id, key))
            problem = (unreadable or {}).get((agent_id, key))
            if problem is not None:
                reports.append(Report(agent_id, key, revision, Outcome.INVALID, invalid=problem))
                continue
            reports.append(Report(agent_id, key, revision, outcome_of(result, revision), result))
    return reports


def wait_for_results(
    etcd: connection.Client,
    layout: keys.Layout,
    expected: Mapping[str, int],
    *,
    timeout: float,
    poll_interval: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Report]:
    """Wait until every live agent that watches each key in `expected` (key -> revision
    written) has a result for that revision or later, or until `timeout` seconds pass.

    The set of agents is taken when the wait starts, so an agent that dies meanwhile is
    reported PENDING rather than silently dropped. Returns the final reports."""
    agents = list_agents(etcd, layout)
    deadline = clock() + timeout
    while True:
        results, unreadable = read_result_records(etcd, layout)
        reports = judge(expected, agents, results, layout, unreadable)
        if all(r.outcome is not Outcome.PENDING for r in reports) or clock() >= deadline:
            return reports
        sleep(min(poll_interval, max(0.0, deadline - clock())))


# Several targets at once, listings and whole-fleet snapshots ----------------------------


# Attempts at one send: a timed-out attempt is sent again (pyetcd moves on to another
# endpoint), under the same guard, so that at most one of them can ever be applied.
SEND_ATTEMPTS = 3


class SendOutcomeUnknown(connection.WriteError):
    """etcd did not say whether the task was written. It is written at most once: every
    attempt was guarded by the keys' mod_revisions as read before the first."""


class SendConflict(connection.WriteError):
    """The keys changed between reading and writing them, every time (a plain or a
    signed send): nothing written."""


def _stored(etcd: connection.Client, task_keys: Sequence[str]) -> dict[str, Stored | None]:
    """The keys' values and mod_revisions now (None for a missing key), at one revision."""
    backend = etcdapi.Pyetcd(etcd)
    found: dict[str, Stored | None] = {}
    for start in range(0, len(task_keys), connection.MAX_TXN_OPS):
        chunk = task_keys[start : start + connection.MAX_TXN_OPS]
        with etcdapi.pyetcd_errors():
            answer = backend.txn([], [etcdapi.Get(k) for k in chunk])
        for key, kvs in zip(chunk, answer.gets, strict=True):
            found[key] = Stored(kvs[0].value, kvs[0].mod_revision) if kvs else None
    return found


def _prepare(
    etcd: connection.Client,
    task_keys: Sequence[str],
    task: messages.Task,
    signer: signing.Signer | None,
    *,
    stored: Mapping[str, Stored | None] | None = None,
) -> tuple[dict[str, int], dict[str, bytes]]:
    """The guard (each key's mod_revision now, 0 for a missing key) and the value to
    write to each key. Signed, a message names the revision it replaces as P: the key's
    mod_revision, or for a missing key etcd's revision read after it was seen missing
    (the guard makes both true when the write lands; README, "Securing a fleet")."""
    if stored is None:
        stored = _stored(etcd, task_keys)
    seen = {key: (s.revision if s else 0) for key, s in stored.items()}
    if signer is None:
        value = task.encode()
        return seen, dict.fromkeys(task_keys, value)
    current = 0
    if not all(seen.values()):
        current = _range(etcd, task_keys[0], prefix=False).revision
    values = {
        key: signing.sign_task(task, key=key, prev=seen[key] or current, signer=signer)
        for key in task_keys
    }
    return seen, values


def landed(
    values: Mapping[str, bytes], seen: Mapping[str, int], now: Mapping[str, Stored | None]
) -> int | None:
    """Pure: the revision our write got, if the keys show it landed (every key holds our
    value at one mod_revision newer than the one our guard named); None otherwise."""
    revisions = set()
    for key, was in seen.items():
        stored = now.get(key)
        if stored is None or stored.value != values[key] or stored.revision <= was:
            return None
        revisions.add(stored.revision)
    return revisions.pop() if len(revisions) == 1 else None


def send_tasks(
    etcd: connection.Client,
    layout: keys.Layout,
    targets: Iterable[keys.Target],
    task: messages.Task,
    *,
    signer: signing.Signer | None = None,
) -> int:
    """Write `task` to every target's key in ONE etcd transaction: all keys or none.
    With `signer`, each key gets the message signed for it (see `_prepare`).

    Returns the transaction's revision, which is every written key's new mod_revision
    (what agents put in their results, and what `wait_for_results` waits for).

    The write is guarded by each key's mod_revision as read just before, so a request
    etcd applies late can never land as a second revision: when an attempt times out,
    the next one (on another endpoint) carries the same guard, and at most one of them is
    applied. If the keys then show our value at a newer revision, that is our write. If
    etcd never answers, or the keys were changed meanwhile by someone else, the outcome
    is unknown: SendOutcomeUnknown says so (see the README, "When etcd misbehaves")."""
    task_keys = sorted({layout.task_key(t) for t in targets})
    if not task_keys:
        raise ValueError("send_tasks: no target given")
    t = etcd.transactions
    seen, values = _prepare(etcd, task_keys, task, signer)
    doubt: BaseException | None = None  # why an earlier attempt's outcome is unknown
    for _attempt in range(SEND_ATTEMPTS):
        try:
            ok, responses = etcd.transaction(
                compare=[t.mod(key) == seen[key] for key in task_keys],
                success=[t.put(key, values[key]) for key in task_keys],
                failure=[],
            )
            if ok:
                return int(responses[0].response_put.header.revision)
            now = _stored(etcd, task_keys)
        except connection.ETCD_ERRORS as exc:
            if not connection.may_have_applied(exc):
                if doubt is None:
                    raise
                break
            doubt = exc
            continue
        if doubt is None:
            # Written by someone else between our read and our write, and ours cannot
            # have landed: write over it, as a plain put would have (a signed message is
            # signed again, for the revision it now replaces).
            seen, values = _prepare(etcd, task_keys, task, signer, stored=now)
            continue
        revision = landed(values, seen, now)
        if revision is not None:
            return revision
        raise SendOutcomeUnknown(
            f"{_keys_text(task_keys)} changed while the write was in doubt "
            f"({connection.describe_error(doubt)}): the task may or may not have been "
            "written before that; it was not sent again"
        )
    if doubt is None:
        raise SendConflict(
            f"{_keys_text(task_keys)} changed under every one of {SEND_ATTEMPTS} attempts "
            "(someone else keeps writing them); the task was not written"
        )
    raise SendOutcomeUnknown(
        f"no answer from etcd for {_keys_text(task_keys)} after {SEND_ATTEMPTS} attempts "
        f"({connection.describe_error(doubt)}): the task may or may not have been written, "
        "and may still be, at most once; check the key's revision with 'gleam-client node', "
        "'region' or 'status' before sending it again"
    )


def _keys_text(task_keys: Sequence[str]) -> str:
    return task_keys[0] if len(task_keys) == 1 else f"{len(task_keys)} keys ({task_keys[0]}, ...)"


@dataclass(frozen=True)
class TaskEntry:
    """A task key as stored: its target, its raw value and the revisions etcd gave it."""

    key: str
    target: keys.Target
    revision: int  # mod_revision: what agents record having run
    value: bytes

    def decode(self) -> messages.Task:
        """The task message; raises MessageError for a value agents would refuse."""
        return messages.decode_task(self.value)


class Stored(NamedTuple):
    """A raw value with its mod_revision."""

    value: bytes
    revision: int


@dataclass(frozen=True)
class Snapshot:
    """Everything under the prefix, read in one request, so at one etcd revision: task
    keys, live registrations, results (of live and departed agents) and the
    reconciler's bookkeeping under `<prefix>/meta/` (raw values and revisions, by key)."""

    revision: int
    tasks: tuple[TaskEntry, ...]
    agents: tuple[messages.AgentInfo, ...]
    results: tuple[messages.Result, ...]
    meta: Mapping[str, Stored]
    # The registrations and result records of the same read that cannot be decoded
    # (left out of `agents` and `results`; status names them).
    invalid: tuple[invalid_records.InvalidRecord, ...] = ()


def _task_entries(items: Iterable[tuple[str, bytes, int]], layout: keys.Layout) -> list[TaskEntry]:
    entries = []
    for key, value, revision in items:
        target = layout.parse_task_key(key)
        if target is not None:
            entries.append(TaskEntry(key, target, revision, value))
    return sorted(entries, key=lambda e: (e.target.kind.value, e.target.name))


def list_tasks(etcd: connection.Client, layout: keys.Layout, kind: keys.Kind) -> list[TaskEntry]:
    """The task keys of one kind (`node` or `region`) with their values and revisions."""
    return _task_entries(
        (
            (_key(kv), kv.value, kv.mod_revision)
            for kv in _range(etcd, layout.tasks_prefix(kind)).kvs
        ),
        layout,
    )


def read_snapshot(etcd: connection.Client, layout: keys.Layout) -> Snapshot:
    """One consistent read of the whole prefix (see Snapshot)."""
    response = _range(etcd, layout.prefix + "/")
    items = [(_key(kv), kv.value, kv.mod_revision) for kv in response.kvs]
    records = invalid_records.decode(((key, value) for key, value, _ in items), layout)
    return Snapshot(
        revision=response.revision,
        tasks=tuple(_task_entries(items, layout)),
        agents=tuple(sorted(records.agents, key=lambda a: a.id)),
        results=records.results,
        meta={
            key: Stored(value, revision)
            for key, value, revision in items
            if key.startswith(layout.meta_prefix)
        },
        invalid=records.invalid,
    )
