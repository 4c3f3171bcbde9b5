"""The reconciler's own records under `<prefix>/meta/`: which task keys it owns, what
it applied last, and the apply lock (their key names are in gleam/keys.Layout). Pure:
record codecs only (the etcd calls are in sync.py).

- `<prefix>/meta/owned/node/<id>`, `<prefix>/meta/owned/region/<name>`: one small key
  per owned task key, `{"commit": <sha>, "source": "commit"}` (or
  `{"source": "worktree"}`), rewritten with every write of its task key. A key per key
  keeps every ownership change inside the same transaction as the task write it
  describes, costs one keys-only range to read 10,000 of them (well under 1 MiB), and
  never grows one record past etcd's value limit.
- `<prefix>/meta/applied`: a JSON record of the last apply and the nine before it.
- `<prefix>/meta/lock`: held (bound to a lease) while a reconciler applies; its value
  names the holder (host, pid namespace, pid, start time), see sync.Holder.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from gleam import messages

RECORD_VERSION = 1
HISTORY = 10
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class RecordError(ValueError):
    """A meta record that cannot be read; the text says which and why."""


def origin_record(*, source: str, commit: str | None) -> bytes:
    """The value of an ownership record: where the task value written beside it (in the
    same transaction, so both share one mod_revision) came from. gleam-client status
    shows the commit; a work-tree apply names none."""
    body: dict[str, str] = {"source": source}
    if source == "commit" and commit:
        body["commit"] = commit
    return messages.canonical_json(body).encode("utf-8")


@dataclass(frozen=True)
class Apply:
    """One apply: where the desired state came from and what it held.

    source is "commit" (git HEAD) or "worktree" (files as they were on disk; `commit` is
    then the HEAD the work tree sat on, for information only). digest is `git-tree:<id>`
    (the tree of tasks/ at that commit) or `sha256:<hex>` over the desired keys and
    values for a work-tree apply. keys is the number of manifests."""

    source: str
    commit: str | None
    time: str
    keys: int
    digest: str
    mode: str = "full"  # full or incremental
    # Whether this apply ran with --prune: after one that did not, owned keys may lack a
    # manifest, and the next --prune run must look at every key (a full pass) to find them.
    pruned: bool = False
    # A fingerprint of the validation rules (parsing code and schema) that accepted these
    # manifests: after an upgrade that changes them, the next pass re-validates everything.
    rules: str = ""

    @property
    def from_git(self) -> bool:
        return self.source == "commit"


@dataclass(frozen=True)
class Record:
    """`<prefix>/meta/applied`. `commit` is the last commit applied from git: the commit
    guard's reference, kept across work-tree applies. history[0] is the last apply."""

    commit: str | None
    history: tuple[Apply, ...]

    @property
    def last(self) -> Apply | None:
        return self.history[0] if self.history else None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "version": RECORD_VERSION,
            "commit": self.commit,
            "history": [asdict(a) for a in self.history],
        }
        return messages.canonical_json(body).encode("utf-8")


def after(previous: Record | None, applied: Apply) -> Record:
    """The record once `applied` is done: newest first, at most HISTORY entries."""
    history = (applied, *(previous.history if previous else ()))[:HISTORY]
    commit = applied.commit if applied.from_git else (previous.commit if previous else None)
    return Record(commit=commit, history=history)


def decode(raw: bytes) -> Record:
    try:
        body = messages.load_json(raw, what="the record")
        if not isinstance(body, dict):
            raise TypeError("not a JSON object")
        version = body.get("version")
        if version != RECORD_VERSION:
            raise RecordError(
                f"meta/applied has record version {repr(version)[:40]}; this gleam-reconcile "
                f"reads version {RECORD_VERSION} (upgrade it, or --force)"
            )
        history = tuple(
            Apply(
                source=str(h["source"]),
                commit=h.get("commit"),
                time=str(h["time"]),
                keys=int(h["keys"]),
                digest=str(h["digest"]),
                mode=str(h.get("mode", "full")),
                pruned=bool(h.get("pruned", False)),
                rules=str(h.get("rules", "")),
            )
            for h in body.get("history") or []
        )
        commit = body.get("commit")
        if commit is not None and not (isinstance(commit, str) and _COMMIT.fullmatch(commit)):
            # It goes on git's command line (the commit guard): a hex id and nothing else.
            raise TypeError("commit is not a git commit id")
        return Record(commit=commit, history=history)
    except RecordError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise RecordError(f"meta/applied is not a valid record: {exc}") from None
