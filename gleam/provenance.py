"""Where task keys came from: the reconciler's records under `<prefix>/meta/`, read for
`gleam-client status` (the owner and commit columns). Pure: it decodes values already
read in one snapshot.

The reconciler (reconciler/records.py owns the format; the shared package must not import
the reconciler, so the few fields needed are read here, tolerantly) keeps:
- `<prefix>/meta/owned/<node|region>/<name>`: one key per task key it owns, holding
  `{"source": "commit", "commit": <sha>}` (or `{"source": "worktree"}`), written in the
  same transaction as the task value, so both share one mod_revision;
- `<prefix>/meta/applied`: `{"version": 1, "commit": <last commit applied from git>,
  "history": [{"source": "commit"|"worktree", "commit", "time", ...}, ...]}`, newest
  first, written after the apply's task writes.

A task key whose mod_revision is later than its ownership record's was changed by hand
since the reconciler wrote it: it shows no commit. A key the reconciler does not own
(sent with gleam-client) has no provenance at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gleam import client, keys, messages

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


@dataclass(frozen=True)
class _Applied:
    commit: str | None  # the last commit applied from git (the commit guard's reference)
    time: str | None


def _applied(stored: client.Stored | None) -> _Applied | None:
    if stored is None:
        return None
    try:
        body: Any = messages.load_json(stored.value, what="record")
    except messages.MessageError:
        return None
    if not isinstance(body, dict) or body.get("version") != _RECORD_VERSION:
        return None
    history = body.get("history")
    last = history[0] if isinstance(history, list) and history else {}
    if not isinstance(last, dict):
        last = {}
    return _Applied(commit=_text(body.get("commit")), time=_text(last.get("time")))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _own_record(stored: client.Stored) -> dict[str, Any] | None:
    try:
        body: Any = messages.load_json(stored.value, what="record") if stored.value else None
    except messages.MessageError:
        return None
    return body if isinstance(body, dict) else None


def read(
    meta: Mapping[str, client.Stored],
    tasks: Iterable[client.TaskEntry],
    layout: keys.Layout,
) -> Origin:
    """The provenance of each task key (see the module docstring)."""
    applied = _applied(meta.get(layout.applied_key))
    out: dict[str, Provenance] = {}
    for entry in tasks:
        owned = meta.get(layout.owned_prefix + entry.target.path)
        if owned is None:
            continue
        record = _own_record(owned)
        # Same mod_revision: the value is still the one that commit gave.
        fresh = record is not None and owned.revision == entry.revision
        commit = _text(record.get("commit")) if record is not None and fresh else None
        out[entry.key] = Provenance(commit=commit, owner=OWNER_RECONCILER)
    return Origin(
        keys=out,
        applied_commit=applied.commit if applied else None,
        applied_time=applied.time if applied else None,
    )
