"""The plan: a purely computational function of (desired, actual, owned) with no side
effects, plus a model of applying it (for property tests) and a path-level diff of two
task messages (for people reading a plan).

Keys are plain strings here (full etcd keys); values are the canonical message bytes.
Only the keys in scope are passed in: a full pass passes everything, an incremental pass
only the keys whose manifests changed, and the plan covers exactly those.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from gleam import messages


class Action(StrEnum):
    CREATE = "create"  # no such key in etcd: write it, record ownership
    UPDATE = "update"  # the key holds other bytes: write it (and own it, if not yet)
    ADOPT = "adopt"  # the key already holds the desired bytes but is not owned: own it
    DELETE = "delete"  # owned, no manifest any more, --prune: delete key and record
    FORGET = "forget"  # owned, no manifest, key already gone, --prune: drop the record


WRITES = frozenset({Action.CREATE, Action.UPDATE})


class Actual(NamedTuple):
    """A key as read from etcd: its bytes and the mod_revision to guard a write with.
    A NamedTuple: a full pass makes one per key (100,000), and a tuple is built in a
    third of a frozen dataclass's time."""

    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Change:
    """One key's change. `mod_revision` is the task key's and `owned_revision` its
    ownership record's mod_revision when planned (0: absent); writes compare both."""

    action: Action
    key: str
    new: bytes | None = None
    old: bytes | None = None
    mod_revision: int = 0
    owned_revision: int = 0

    @property
    def owned(self) -> bool:
        return self.owned_revision > 0


@dataclass(frozen=True)
class Plan:
    """Changes in key order; `unchanged` counts keys in scope needing nothing;
    `orphans` are owned keys without a manifest that stay because pruning is off."""

    changes: tuple[Change, ...] = ()
    unchanged: int = 0
    orphans: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes)

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action is action)

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(c.key for c in self.changes)


def plan(
    desired: Mapping[str, bytes],
    actual: Mapping[str, Actual],
    owned: Mapping[str, int],
    *,
    prune: bool,
) -> Plan:
    """What to do so that etcd holds `desired`.

    desired: key -> bytes wanted; actual: key -> what etcd holds; owned: key -> the
    ownership record's mod_revision, for keys this reconciler wrote. A key that is neither
    desired nor owned is someone else's (written by hand) and is never touched.
    """
    changes: list[Change] = []
    unchanged = 0
    orphans: list[str] = []
    for key in sorted(desired.keys() | owned.keys()):
        want = desired.get(key)
        have = actual.get(key)
        owned_rev = owned.get(key, 0)
        if want is not None:
            if have is None:
                changes.append(Change(Action.CREATE, key, new=want, owned_revision=owned_rev))
            elif have.value != want:
                changes.append(
                    Change(
                        Action.UPDATE,
                        key,
                        new=want,
                        old=have.value,
                        mod_revision=have.mod_revision,
                        owned_revision=owned_rev,
                    )
                )
            elif not owned_rev:
                changes.append(
                    Change(
                        Action.ADOPT, key, new=want, old=have.value, mod_revision=have.mod_revision
                    )
                )
            else:
                unchanged += 1
        elif not prune:
            orphans.append(key)
        elif have is None:
            changes.append(Change(Action.FORGET, key, owned_revision=owned_rev))
        else:
            changes.append(
                Change(
                    Action.DELETE,
                    key,
                    old=have.value,
                    mod_revision=have.mod_revision,
                    owned_revision=owned_rev,
                )
            )
    return Plan(changes=tuple(changes), unchanged=unchanged, orphans=tuple(orphans))


def apply(
    changes: Plan, values: Mapping[str, bytes], owned: Set[str]
) -> tuple[dict[str, bytes], frozenset[str]]:
    """A model of what applying the plan does to etcd: (values, owned keys) after."""
    out = dict(values)
    mine = set(owned)
    for change in changes.changes:
        if change.action in (Action.CREATE, Action.UPDATE, Action.ADOPT):
            assert change.new is not None
            out[change.key] = change.new
            mine.add(change.key)
        else:
            out.pop(change.key, None)
            mine.discard(change.key)
    return out, frozenset(mine)


# What changed inside a message, for people ------------------------------------------

_MISSING = object()


@dataclass(frozen=True)
class FieldChange:
    """One path in a task message that differs: `data.path: "/a" -> "/b"`. `old`/`new`
    are JSON values, or None with `added`/`removed` set."""

    path: str
    old: Any = None
    new: Any = None
    added: bool = False
    removed: bool = False


def describe(old: bytes | None, new: bytes | None, *, limit: int = 20) -> list[FieldChange]:
    """The paths that differ between two task messages (name, data.a.b, data.list[2]).
    An old value that is not a task message is reported as a whole."""
    if old is None or new is None:
        return []
    new_task = messages.decode_task(new)
    try:
        old_task = messages.decode_task(old)
    except messages.MessageError as exc:
        return [FieldChange("value", old=f"<not a task message: {exc}>", new=_plain(new_task))]
    out: list[FieldChange] = []
    if old_task.name != new_task.name:
        out.append(FieldChange("name", old=old_task.name, new=new_task.name))
    _walk("data", old_task.data, new_task.data, out, limit)
    return out[:limit]


def _plain(task: messages.Task) -> dict[str, Any]:
    return {"Name": task.name, "Data": task.data}


def _walk(path: str, old: Any, new: Any, out: list[FieldChange], limit: int) -> None:
    if len(out) >= limit or (type(old) is type(new) and old == new):
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old.keys() | new.keys()):
            sub = f"{path}.{k}"
            if k not in new:
                out.append(FieldChange(sub, old=old[k], removed=True))
            elif k not in old:
                out.append(FieldChange(sub, new=new[k], added=True))
            else:
                _walk(sub, old[k], new[k], out, limit)
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _walk(f"{path}[{i}]", a, b, out, limit)
        return
    out.append(FieldChange(path, old=old, new=new))
