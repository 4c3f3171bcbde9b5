"""Where task keys came from: the reconciler's records under `<prefix>/meta/`, read for
`gleam-client status` (the owner and commit columns). Pure: it decodes values already
read in one snapshot.

The reconciler (reconciler/state.py owns the format; the shared package must not import
the reconciler, so the few fields needed are read here, tolerantly) keeps:
- `<prefix>/meta/owned/<node|region>/<name>`: one key per task key it owns;
- `<prefix>/meta/applied`: `{"version": 1, "commit": <last commit applied from git>,
  "history": [{"source": "commit"|"worktree", "commit", "time", ...}, ...]}`, newest
  first, written after the apply's task writes.

It records no commit per task key, so the commit is inferred: a key the reconciler owns
whose mod_revision is older than the applied record's holds what that last apply left,
that is the value in the last applied commit's manifests. A key changed after that (by
hand, or by an apply still running) shows no commit, nor does one the reconciler does
not own (sent with gleam-client) or one left by a work-tree apply (no commit to name).
An owned key whose value is a JSON object with a string `commit` names its own commit:
that wins, should the reconciler ever record one per key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gleam import client, keys

_RECORD_VERSION = 1  # the meta/applied record version this reader understands

OWNER_RECONCILER = "reconciler"


@dataclass(frozen=True)
class Provenance:
    """Where a task key's value came from."""

    commit: str | None = None  # the git commit whose manifests hold this value
    owner: str | None = None  # "reconciler" when it owns the key; None: written by hand


@dataclass(frozen=True)
class Origin:
    keys: Mapping[str, Provenance] = field(default_factory=dict)
    applied_commit: str | None = None  # the last commit the reconciler applied from git
    applied_time: str | None = None  # when the last apply (git or work tree) finished


def owned_prefix(layout: keys.Layout) -> str:
    return f"{layout.meta_prefix}owned/"


def applied_key(layout: keys.Layout) -> str:
    return f"{layout.meta_prefix}applied"


@dataclass(frozen=True)
class _Applied:
    commit: str | None  # the last commit applied from git (the commit guard's reference)
    last_commit: str | None  # the last apply's commit when it came from git, else None
    time: str | None
    revision: int


def _applied(stored: client.Stored | None) -> _Applied | None:
    if stored is None:
        return None
    try:
        body: Any = json.loads(stored.value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("version") != _RECORD_VERSION:
        return None
    history = body.get("history")
    last = history[0] if isinstance(history, list) and history else {}
    if not isinstance(last, dict):
        last = {}
    from_git = last.get("source") == "commit"
    return _Applied(
        commit=_text(body.get("commit")),
        last_commit=_text(last.get("commit")) if from_git else None,
        time=_text(last.get("time")),
        revision=stored.revision,
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _own_commit(stored: client.Stored) -> str | None:
    try:
        body: Any = json.loads(stored.value) if stored.value else None
    except (ValueError, UnicodeDecodeError):
        return None
    return _text(body.get("commit")) if isinstance(body, dict) else None


def read(
    meta: Mapping[str, client.Stored],
    tasks: Iterable[client.TaskEntry],
    layout: keys.Layout,
) -> Origin:
    """The provenance of each task key (see the module docstring)."""
    applied = _applied(meta.get(applied_key(layout)))
    out: dict[str, Provenance] = {}
    for entry in tasks:
        owned = meta.get(owned_prefix(layout) + entry.target.path)
        if owned is None:
            continue
        commit = _own_commit(owned)
        if commit is None and applied is not None and entry.revision < applied.revision:
            commit = applied.last_commit
        out[entry.key] = Provenance(commit=commit, owner=OWNER_RECONCILER)
    return Origin(
        keys=out,
        applied_commit=applied.commit if applied else None,
        applied_time=applied.time if applied else None,
    )
