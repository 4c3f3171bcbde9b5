"""Rollout waves: the rules, pure (no etcd, no clock: `now` is passed in).

A region task whose message has a `Rollout` section reaches the region's agents in
waves. The gate record `<prefix>/rollout/<region>` says which agents may run which
revision; drivers (the reconciler, the client) move it on with `advance`, `promote` and
`abort`, and agents hold the task until `admits` says yes. See the README, "Rollouts".
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from gleam import keys, messages

GATE_VERSION = 1
DEFAULT_TIMEOUT = 600.0
ALL = "*"

_PERCENT_RE = re.compile(r"([1-9][0-9]?|100)%")
_FIELDS = frozenset({"waves", "first", "max_failed", "bake", "timeout", "manual"})
_MAX_WAVES = 100
_MAX_SECONDS = 7 * 24 * 3600


class RolloutError(ValueError):
    """A rollout section or gate record Gleam refuses. `where` names the field."""

    def __init__(self, where: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.where = where


class State(StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    HALTED = "halted"
    COMPLETE = "complete"
    ABORTED = "aborted"


# The manifest section ---------------------------------------------------------------


Wave = int | str  # a member count, or "N%"


@dataclass(frozen=True)
class Plan:
    """A normalised `rollout` section: every field present."""

    waves: tuple[Wave, ...]
    first: tuple[str, ...] = ()
    max_failed: int = 0
    bake: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    manual: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "waves": list(self.waves),
            "first": list(self.first),
            "max_failed": self.max_failed,
            "bake": _number_json(self.bake),
            "timeout": _number_json(self.timeout),
            "manual": self.manual,
        }


def _number_json(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _wave(value: Any, index: int) -> Wave:
    where: tuple[str | int, ...] = ("waves", index)
    if type(value) is int:
        if value < 1:
            raise RolloutError(where, f"rollout.waves[{index}]: {value} is not a positive count")
        return value
    if isinstance(value, str) and _PERCENT_RE.fullmatch(value.strip()):
        return value.strip()
    raise RolloutError(
        where, f"rollout.waves[{index}]: {value!r} is neither a count (1, 5) nor a percent ('25%')"
    )


def _seconds(section: Mapping[str, Any], name: str, default: float) -> float:
    value = section.get(name, default)
    if type(value) not in (int, float) or not (0 <= value <= _MAX_SECONDS) or value != value:
        raise RolloutError(
            (name,),
            f"rollout.{name}: {value!r} is not a number of seconds from 0 to {_MAX_SECONDS}",
        )
    return float(value)


def parse_plan(section: Any) -> Plan:
    """Check and normalise a manifest's (or a message's) rollout section."""
    if not isinstance(section, dict):
        raise RolloutError((), "rollout must be a mapping with at least `waves:`")
    for name in sorted(set(section) - _FIELDS, key=str):
        raise RolloutError(
            (name,), f"rollout: unknown key {name!r} (known: {', '.join(sorted(_FIELDS))})"
        )
    raw = section.get("waves")
    if not isinstance(raw, list) or not raw:
        raise RolloutError(
            ("waves",), 'rollout.waves must be a non-empty list such as [1, "25%", "100%"]'
        )
    if len(raw) > _MAX_WAVES:
        raise RolloutError(("waves",), f"rollout.waves has more than {_MAX_WAVES} waves")
    waves = tuple(_wave(v, i) for i, v in enumerate(raw))
    check_increasing(waves)
    first = section.get("first", [])
    if not isinstance(first, list):
        raise RolloutError(("first",), "rollout.first must be a list of agent ids")
    for index, agent in enumerate(first):
        try:
            keys.validate_name(agent, what="agent id")
        except keys.InvalidName as exc:
            raise RolloutError(("first", index), f"rollout.first[{index}]: {exc}") from None
    if len(set(first)) != len(first):
        raise RolloutError(("first",), "rollout.first names an agent twice")
    max_failed = section.get("max_failed", 0)
    if type(max_failed) is not int or not 0 <= max_failed <= 1_000_000:
        raise RolloutError(
            ("max_failed",), f"rollout.max_failed: {max_failed!r} is not a count >= 0"
        )
    manual = section.get("manual", False)
    if type(manual) is not bool:
        raise RolloutError(("manual",), f"rollout.manual: {manual!r} is not true or false")
    timeout = _seconds(section, "timeout", DEFAULT_TIMEOUT)
    if timeout <= 0:
        raise RolloutError(("timeout",), "rollout.timeout must be more than 0 seconds")
    return Plan(
        waves=waves,
        first=tuple(first),
        max_failed=max_failed,
        bake=_seconds(section, "bake", 0.0),
        timeout=timeout,
        manual=manual,
    )


def check_increasing(waves: Sequence[Wave]) -> None:
    """Counts increase, percents increase, every count precedes every percent, and the
    last wave is "100%"."""
    if waves[-1] != "100%":
        raise RolloutError(("waves", len(waves) - 1), 'rollout.waves: the last wave must be "100%"')
    for index in range(1, len(waves)):
        before, now = waves[index - 1], waves[index]
        if isinstance(before, str) and isinstance(now, int):
            bad = True
        elif isinstance(before, int) and isinstance(now, int):
            bad = now <= before
        elif isinstance(before, str) and isinstance(now, str):
            bad = int(now[:-1]) <= int(before[:-1])
        else:
            bad = False
        if bad:
            raise RolloutError(
                ("waves", index),
                f"rollout.waves[{index}]: {now!r} after {before!r}: waves must strictly increase",
            )


def parse_waves_flag(text: str) -> tuple[Wave, ...]:
    """`1,25%,100%` (the client's -rollout flag) -> (1, "25%", "100%")."""
    parts = [p.strip() for p in (text or "").split(",")]
    # ASCII digits only ('²'.isdigit() holds, but int() refuses it), and no longer than
    # int() converts; anything else goes as text, for parse_plan to name what is wrong.
    values: list[Any] = [
        int(p) if p.isascii() and p.isdigit() and len(p) <= messages.MAX_INT_DIGITS else p
        for p in parts
    ]
    return parse_plan({"waves": values}).waves


def wave_sizes(waves: Sequence[Wave], members: int) -> list[int]:
    """The cumulative number of members admitted after each wave."""
    sizes: list[int] = []
    for wave in waves:
        if isinstance(wave, int):
            size = min(wave, members)
        else:
            size = math.ceil(members * int(wave[:-1]) / 100)
        sizes.append(max(size, sizes[-1] if sizes else 0))
    if sizes:
        sizes[-1] = members
    return sizes


def admission_order(agents: Collection[str], *, region: str, first: Sequence[str]) -> list[str]:
    """`first` (those present) in their order, then the rest ordered by a hash of region
    and id: stable for a host, not the alphabetical first every time."""
    present = set(agents)
    head = [a for a in first if a in present]
    rest = sorted(
        present - set(head),
        key=lambda a: (hashlib.sha256(f"{region}\0{a}".encode()).hexdigest(), a),
    )
    return head + rest


# The gate record --------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    key: str
    revision: int
    state: State
    wave: int
    waves: int
    members: tuple[str, ...]
    admitted: tuple[str, ...] | str  # ids, or ALL once complete
    failed: tuple[str, ...] = ()
    reason: str = ""
    started: str = ""
    updated: str = ""
    # When the last wave was admitted (for `timeout`); with `tolerated`, not part of the
    # contract's list of fields: additions readers may ignore.
    wave_started: str = ""
    # Failures a promote after a halt accepted: the halt rule counts only those beyond.
    tolerated: int = 0
    version: int = GATE_VERSION

    def admits(self, agent_id: str, revision: int) -> bool:
        return self.revision == revision and (self.admitted == ALL or agent_id in self.admitted)

    @property
    def finished(self) -> bool:
        return self.state in (State.COMPLETE, State.ABORTED)

    def encode(self) -> bytes:
        doc = {
            "version": self.version,
            "key": self.key,
            "revision": self.revision,
            "state": self.state.value,
            "wave": self.wave,
            "waves": self.waves,
            "members": list(self.members),
            "admitted": self.admitted if self.admitted == ALL else list(self.admitted),
            "failed": list(self.failed),
            "reason": self.reason,
            "started": self.started,
            "updated": self.updated,
            "wave_started": self.wave_started,
            "tolerated": self.tolerated,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_gate(raw: bytes) -> Gate:
    """Any bytes give a Gate or a RolloutError."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        admitted = doc["admitted"]
        return Gate(
            key=str(doc["key"]),
            revision=_int(doc["revision"]),
            state=State(doc["state"]),
            wave=_int(doc["wave"]),
            waves=_int(doc["waves"]),
            members=_names(doc["members"]),
            admitted=ALL if admitted == ALL else _names(admitted),
            failed=_names(doc.get("failed", [])),
            reason=str(doc.get("reason", "")),
            started=str(doc.get("started", "")),
            updated=str(doc.get("updated", "")),
            wave_started=str(doc.get("wave_started", "")),
            tolerated=_int(doc.get("tolerated", 0)),
            version=_int(doc.get("version", GATE_VERSION)),
        )
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise RolloutError((), f"gate record is invalid: {exc!r}") from None


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"{value!r} is not an integer")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{value!r} is not a list of agent ids")
    for name in value:  # a driver reads each member's result key, which needs an agent id
        keys.validate_name(name, what="agent id")  # InvalidName is a ValueError
    return tuple(value)


def stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_stamp(value: str) -> datetime | None:
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


# Moving a rollout on ------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A member's result for the rollout's revision: ok, or the error's first line."""

    ok: bool
    error: str = ""


def start(
    plan: Plan, *, key: str, revision: int, region: str, agents: Collection[str], now: datetime
) -> Gate:
    """The gate record of a new rollout: wave 1 admitted (or complete for no agents)."""
    members = tuple(admission_order(agents, region=region, first=plan.first))
    sizes = wave_sizes(plan.waves, len(members))
    at = stamp(now)
    gate = Gate(
        key=key,
        revision=revision,
        state=State.PROGRESSING,
        wave=1,
        waves=len(plan.waves),
        members=members,
        admitted=members[: sizes[0]],
        started=at,
        updated=at,
        wave_started=at,
    )
    if not members:
        return replace(gate, wave=gate.waves, state=State.COMPLETE, admitted=ALL)
    return gate


@dataclass(frozen=True)
class Progress:
    """What an advance found: counts for the status line, and the next gate."""

    ok: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    wave_done: bool = False
    gate: Gate | None = None  # None: nothing to write
    errors: Mapping[str, str] = field(default_factory=dict)


def advance(
    gate: Gate,
    plan: Plan,
    *,
    reports: Mapping[str, Report],
    live: Collection[str],
    now: datetime,
    done_since: datetime | None,
) -> Progress:
    """The next state of a rollout.

    `reports`: members' results for the gate's revision; `live`: registered agent ids;
    `done_since`: when this driver first saw the current wave done (for `bake`), None
    if it has not. A wave is done when every admitted member has an ok result or counts
    as failed (failed result, registration gone before reporting, or no report within
    `timeout` of its wave's admission)."""
    admitted = gate.members if gate.admitted == ALL else gate.admitted
    wave_at = _parse_stamp(gate.wave_started) or _parse_stamp(gate.updated) or now
    overdue = (now - wave_at).total_seconds() > plan.timeout
    ok: list[str] = []
    failed: list[str] = list(gate.failed)
    pending: list[str] = []
    errors: dict[str, str] = {}
    for member in admitted:
        report = reports.get(member)
        if report is not None and report.ok:
            if member not in failed:
                ok.append(member)
            continue
        if member in failed:
            continue
        if report is not None:
            errors[member] = report.error or "failed"
        elif member not in live:
            errors[member] = "its registration is gone and it did not report"
        elif overdue:
            errors[member] = f"no result within {plan.timeout:g}s"
        else:
            pending.append(member)
            continue
        failed.append(member)
    progress = Progress(ok=tuple(ok), failed=tuple(failed), pending=tuple(pending), errors=errors)
    if gate.state is not State.PROGRESSING:
        return progress
    at = stamp(now)
    if len(failed) > plan.max_failed + gate.tolerated:
        culprit = next((m for m in failed if m in errors), failed[0])
        reason = f"{' '.join(failed)} failed: {first_line(errors.get(culprit, 'failed'))}"
        halted = replace(gate, state=State.HALTED, failed=tuple(failed), reason=reason, updated=at)
        return replace(progress, gate=halted)
    changed = tuple(failed) != gate.failed
    current = replace(gate, failed=tuple(failed), updated=at) if changed else gate
    if pending:
        return replace(progress, gate=current if changed else None)
    progress = replace(progress, wave_done=True)
    if gate.wave >= gate.waves:
        done = replace(current, state=State.COMPLETE, admitted=ALL, updated=at)
        return replace(progress, gate=done)
    if plan.manual:
        return replace(progress, gate=replace(current, state=State.PAUSED, updated=at))
    if plan.bake > 0 and (
        done_since is None or changed or (now - done_since).total_seconds() < plan.bake
    ):
        return replace(progress, gate=current if changed else None)
    return replace(progress, gate=next_wave(current, now=now, waves=plan.waves))


def next_wave(gate: Gate, *, now: datetime, waves: Sequence[Wave] | None = None) -> Gate:
    """Admit the gate's next wave (or complete it after its last)."""
    at = stamp(now)
    if gate.wave >= gate.waves:
        return replace(gate, state=State.COMPLETE, admitted=ALL, updated=at)
    sizes = _sizes_of(gate, waves)
    wave = gate.wave + 1
    return replace(
        gate,
        state=State.PROGRESSING,
        wave=wave,
        admitted=gate.members[: sizes[wave - 1]],
        reason="",
        updated=at,
        wave_started=at,
    )


def _sizes_of(gate: Gate, waves: Sequence[Wave] | None) -> list[int]:
    if waves is None:
        raise RolloutError((), "the rollout's waves are needed to admit the next wave")
    return wave_sizes(waves, len(gate.members))


def promote(gate: Gate, plan: Plan, *, now: datetime) -> Gate:
    """Admit the next wave now (a paused rollout, or going on after a halt)."""
    if gate.finished:
        raise RolloutError((), f"the rollout of {gate.key} @{gate.revision} is {gate.state.value}")
    if gate.state is State.HALTED:  # going on anyway: the failures so far are accepted
        gate = replace(gate, tolerated=max(0, len(gate.failed) - plan.max_failed))
    return next_wave(gate, now=now, waves=plan.waves)


def abort(gate: Gate, *, now: datetime) -> Gate:
    if gate.finished:
        raise RolloutError((), f"the rollout of {gate.key} @{gate.revision} is {gate.state.value}")
    return replace(gate, state=State.ABORTED, reason="aborted", updated=stamp(now))


def first_line(text: str) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:200] if lines else ""


def staged(value: bytes) -> Plan | None:
    """The rollout plan of a task message, None when it has none (or is no message)."""
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or "Rollout" not in doc:
        return None
    try:
        return parse_plan(doc["Rollout"])
    except RolloutError:
        # A message whose Rollout is garbage is still staged: held until a gate
        # admits it, rather than run on every agent at once.
        return Plan(waves=("100%",))
