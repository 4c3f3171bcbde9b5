"""One reconcile pass: read the desired state (git HEAD or the work tree), check the
commit guard, read etcd, plan, apply in guarded transactions (planning again for keys
someone changed meanwhile), and record what was applied.

This module only sequences the steps; git is behind gitsource, etcd behind sync, and the
decisions are the pure functions of manifests, diff and state.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gleam import keys, signing
from reconciler import commitsig, diff, gitsource, manifests, parsecache, signed, state, sync

log = logging.getLogger("gleam.reconcile")

MAX_ATTEMPTS = 5


class ReconcileError(Exception):
    """A pass that stopped before writing anything it should not; the text says why."""


class GuardRefused(ReconcileError):
    """HEAD does not descend from the recorded commit (or that cannot be checked)."""


class PruneRefused(ReconcileError):
    """--prune would delete every owned key."""


class Conflict(ReconcileError):
    """Keys kept changing under us; gave up after MAX_ATTEMPTS plans."""


def resource_failure(exc: BaseException) -> str:
    """One line for a pass stopped by Python's own limits. The inputs are bounded
    (manifests.MAX_FILE_BYTES, aliases, depth; messages are decoded strictly), so this
    is the last line of defence: an error line, never a traceback."""
    if isinstance(exc, MemoryError):
        return "the pass ran out of memory and stopped"
    return "the pass met a value nested too deeply for Python and stopped"


@dataclass(frozen=True)
class Options:
    repo: Path
    prune: bool = False
    allow_empty: bool = False
    force: bool = False
    dry_run: bool = False
    full: bool = False
    worktree: bool = False
    lock_timeout: float = 60.0
    lock_ttl: int = 15
    cache: bool = True  # the parse cache (parsecache.py); off only to measure without it
    # -verify_commits: the allowed-signers file the applied commit must be signed by
    verify_commits: Path | None = None
    # -sign_key: every task message written carries this key's signature (signed.py)
    signer: signing.Signer | None = None


@dataclass(frozen=True)
class Desired:
    """The desired state for the keys in scope (all keys when `scope` is None)."""

    entries: dict[str, manifests.Manifest]
    scope: frozenset[str] | None
    source: str  # "commit" or "worktree"
    commit: str | None
    digest: str
    total: int  # manifests in the whole tree
    mode: str  # "full" or "incremental"

    @property
    def values(self) -> dict[str, bytes]:
        return {key: m.value for key, m in self.entries.items()}


@dataclass(frozen=True)
class Result:
    """What a pass saw and did, for rendering and exit codes."""

    desired: Desired
    previous: state.Record | None
    plan: diff.Plan  # the first plan (what --dry-run shows)
    applied: tuple[diff.Change, ...] = ()
    revisions: dict[str, int] = field(default_factory=dict)
    replans: int = 0
    recorded: bool = False
    dry_run: bool = False

    @property
    def changes(self) -> tuple[diff.Change, ...]:
        """The changes to show: planned for a dry run, applied otherwise."""
        return self.plan.changes if self.dry_run else self.applied


# Desired state -------------------------------------------------------------------------


def worktree_digest(values: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(values):
        h.update(key.encode("utf-8") + b"\0" + values[key] + b"\n")
    return f"sha256:{h.hexdigest()}"


def _entries(
    layout: keys.Layout, files: Any, problems: Iterable[manifests.ManifestError] = ()
) -> dict[str, manifests.Manifest]:
    # A refused path may be reported by two listings (the diff and the tree): once.
    loaded = manifests.load(files, problems=dict.fromkeys(problems))
    return {layout.task_key(target): m for target, m in loaded.items()}


def check_guard(
    source: gitsource.Source | None, record: state.Record | None, head: str | None, *, force: bool
) -> None:
    """Refuse a commit that does not descend from the last commit applied from git (an
    older CI job finishing after a newer one), unless forced. Work-tree applies (head
    None) are not guarded: they are for trying things out."""
    recorded = record.commit if record is not None else None
    if force or recorded is None or head is None or recorded == head or source is None:
        return
    try:
        descends = source.is_ancestor(recorded, head)
    except gitsource.GitError as exc:
        raise GuardRefused(
            f"cannot check that HEAD {source.describe(head)} descends from the recorded "
            f"commit {recorded[:12]}: {exc}; use --force to apply anyway"
        ) from None
    if not descends:
        raise GuardRefused(
            f"HEAD {source.describe(head)} does not descend from the last applied commit "
            f"{source.describe(recorded)}: refusing to go back (an older job finishing "
            "after a newer one?); use --force to apply it anyway"
        )


def read_desired(
    layout: keys.Layout,
    options: Options,
    record: state.Record | None,
    *,
    source: gitsource.Source | None,
) -> Desired:
    """Desired state plus the commit guard. Raises manifests.InvalidManifests,
    GuardRefused or gitsource.GitError before anything is written."""
    if options.worktree:
        snapshot = gitsource.read_worktree(options.repo)
        entries = _entries(layout, snapshot.files, snapshot.problems)
        head = None
        if source is not None:
            try:
                head = source.head()
            except gitsource.GitError:
                head = None
        return Desired(
            entries=entries,
            scope=None,
            source="worktree",
            commit=head,
            digest=worktree_digest({k: m.value for k, m in entries.items()}),
            total=len(entries),
            mode="full",
        )
    assert source is not None
    head = source.head()
    recorded = record.commit if record is not None else None
    incremental = False
    check_guard(source, record, head, force=options.force)
    if recorded is not None and not options.force:
        last = record.last if record is not None else None
        incremental = (
            not options.full
            and last is not None
            and last.from_git
            and (last.pruned or not options.prune)
            and last.rules == parsecache.fingerprint()
        )
    if not incremental or recorded is None or record is None or record.last is None:
        return read_full(layout, source, head, cache=options.cache)
    # Incremental: only the manifests that changed since the recorded commit. For each
    # target touched, both spellings (.yaml, .yml) are read from HEAD, so a rename between
    # them, or a duplicate, is seen whole.
    # Paths refused by name or mode (a newline in a name, a symbolic link) are reported
    # as errors like any invalid manifest, before anything is read.
    changed = source.changed(recorded, head)
    targets: dict[keys.Target, None] = {}
    problems = list(changed.problems)
    delta = 0
    for entry in changed.paths:
        target = manifests.classify(entry.path)
        if isinstance(target, keys.Target):
            targets[target] = None
            delta += {"A": 1, "D": -1}.get(entry.status, 0)
        elif isinstance(target, manifests.ManifestError) and entry.status != "D":
            problems.append(target)
    paths = [
        f"{manifests.TASKS_DIR}/{dirname}/{t.name}{ext}"
        for t in targets
        for dirname, kind in manifests.KIND_DIRS.items()
        if kind is t.kind
        for ext in manifests.EXTENSIONS
    ]
    listing = source.list_paths(head, paths)
    entries = _entries(layout, source.read_blobs(listing.blobs), [*problems, *listing.problems])
    return Desired(
        entries=entries,
        scope=frozenset(layout.task_key(t) for t in targets),
        source="commit",
        commit=head,
        digest=f"git-tree:{listing.tree or 'none'}",
        total=record.last.keys + delta,
        mode="incremental",
    )


def read_full(
    layout: keys.Layout, source: gitsource.Source, commit: str, *, cache: bool = True
) -> Desired:
    """Every manifest at `commit`. Blobs parsed before come from the parse cache; only
    the others are read from git and parsed."""
    listing = source.list_tree(commit)
    blobs = listing.blobs
    cache_path = parsecache.path_for(source.git_dir)
    cached = parsecache.load(cache_path) if cache else {}
    known = [(path, cached[sha]) for path, sha in blobs if sha in cached]
    missing = [(path, sha) for path, sha in blobs if sha not in cached]
    loaded = manifests.load(source.read_blobs(missing), known=known, problems=listing.problems)
    entries = {layout.task_key(target): m for target, m in loaded.items()}
    if cache and missing:
        by_path = {m.path: m.value for m in loaded.values()}
        parsecache.save(cache_path, {sha: by_path[path] for path, sha in blobs if path in by_path})
    log.debug(
        "read %d manifests at %s (%d parsed, %d cached)",
        len(entries),
        commit[:12],
        len(missing),
        len(known),
    )
    return Desired(
        entries=entries,
        scope=None,
        source="commit",
        commit=commit,
        digest=f"git-tree:{listing.tree or 'none'}",
        total=len(entries),
        mode="full",
    )


# The pass ---------------------------------------------------------------------------------


# Above this many keys, one range read of everything beats point reads in batches.
POINT_READS_MAX = 1024


def _observe(etcd: Any, layout: keys.Layout, scope: frozenset[str] | None) -> sync.Observed:
    if scope is not None and len(scope) <= POINT_READS_MAX:
        return sync.read_keys(etcd, layout, scope)
    observed = sync.read_all(etcd, layout)
    if scope is None:
        return observed
    return sync.Observed(
        actual={k: v for k, v in observed.actual.items() if k in scope},
        owned={k: v for k, v in observed.owned.items() if k in scope},
    )


def _check_prune(
    etcd: Any,
    layout: keys.Layout,
    plan: diff.Plan,
    observed: sync.Observed,
    options: Options,
    *,
    full: bool,
) -> None:
    removing = plan.count(diff.Action.DELETE) + plan.count(diff.Action.FORGET)
    if not removing or options.allow_empty:
        return
    owned_total = len(observed.owned) if full else sync.count_owned(etcd, layout)
    gaining = sum(
        1
        for c in plan.changes
        if c.action is diff.Action.ADOPT or (c.action in diff.WRITES and not c.owned)
    )
    if owned_total - removing + gaining <= 0:
        raise PruneRefused(
            f"--prune would delete every key this reconciler owns ({removing}): the tasks "
            "tree is empty or missing. Pass --allow-empty if that is really what you want"
        )


def _comparable(observed: sync.Observed, options: Options) -> sync.Observed:
    return observed if options.signer is None else signed.comparable(observed, options.signer)


def _signed(etcd: Any, layout: keys.Layout, plan: diff.Plan, options: Options) -> diff.Plan:
    """The plan's writes signed (-sign_key); P for a key that must not exist yet is
    etcd's revision now, read only when there is such a key."""
    if options.signer is None:
        return plan
    revision = 0
    if any(c.action is diff.Action.CREATE for c in plan.changes):
        revision = int(
            etcd.get_prefix_response(layout.meta_prefix, count_only=True).header.revision
        )
    return signed.sign_plan(plan, options.signer, revision=revision)


class CommitRefused(ReconcileError):
    """-verify_commits: the commit is not signed by an allowed signer; nothing written."""


def _verify_commit(options: Options, desired: Desired) -> None:
    assert options.verify_commits is not None
    if desired.source != "commit" or not desired.commit:
        raise CommitRefused("-verify_commits needs a commit to check (not --worktree)")
    try:
        good = commitsig.verify(
            options.repo, desired.commit, allowed_signers=options.verify_commits
        )
    except commitsig.CommitRefused as exc:
        raise CommitRefused(str(exc)) from None
    log.info("commit %s: %s", desired.commit[:12], good)


def run(
    etcd: Any,
    layout: keys.Layout,
    options: Options,
    *,
    source: gitsource.Source | None = None,
    desired: Desired | None = None,
    before_apply: Callable[[diff.Plan], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    cancel: threading.Event | None = None,
) -> Result:
    """One pass. `source` is the git checkout (None: opened from options.repo, or none
    for a --worktree directory that is not a repository). `desired` may be passed by a
    caller that already read it (the daemon's cache); `before_apply` is a test seam
    called between the first plan and its apply."""
    if source is None and not options.worktree:
        source = gitsource.Source(options.repo)
    elif source is None:
        try:
            source = gitsource.Source(options.repo)
        except gitsource.GitError:
            source = None
    lock = None
    if not options.dry_run:
        lock = sync.Lock(etcd, layout, ttl=options.lock_ttl)
        lock.acquire(timeout=options.lock_timeout, cancel=cancel)
    try:
        return _run_locked(
            etcd,
            layout,
            options,
            source=source,
            desired=desired,
            lock=lock,
            before_apply=before_apply,
            clock=clock,
        )
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    etcd: Any,
    layout: keys.Layout,
    options: Options,
    *,
    source: gitsource.Source | None,
    desired: Desired | None,
    lock: sync.Lock | None,
    before_apply: Callable[[diff.Plan], None] | None,
    clock: Callable[[], datetime],
) -> Result:
    record, record_revision = sync.read_record(etcd, layout)
    if desired is None:
        desired = read_desired(layout, options, record, source=source)
    elif desired.source == "commit":
        check_guard(source, record, desired.commit, force=options.force)
    if options.verify_commits is not None:
        _verify_commit(options, desired)
    values = desired.values
    scope = desired.scope
    observed = _comparable(_observe(etcd, layout, scope), options)
    first = diff.plan(values, observed.actual, observed.owned, prune=options.prune)
    _check_prune(etcd, layout, first, observed, options, full=scope is None)
    if before_apply is not None:
        before_apply(first)
    if options.dry_run:
        return Result(desired=desired, previous=record, plan=first, dry_run=True)

    applied: list[diff.Change] = []
    revisions: dict[str, int] = {}
    current = first
    replans = 0
    while True:
        written = sync.apply_changes(
            etcd,
            layout,
            _signed(etcd, layout, current, options).changes,
            fence=lock,
            origin=state.origin_record(source=desired.source, commit=desired.commit),
        )
        applied += written.done
        revisions.update(written.revisions)
        if not written.conflicts:
            break
        replans += 1
        if replans >= MAX_ATTEMPTS:
            raise Conflict(
                f"{len(written.conflicts)} key(s) kept changing while applying (e.g. "
                f"{written.conflicts[0].key}); gave up after {MAX_ATTEMPTS} plans. "
                f"{len(applied)} change(s) were applied"
            )
        conflict_keys = frozenset(c.key for c in written.conflicts)
        log.info(
            "%d key(s) changed since planning (e.g. %s): reading them again and re-planning",
            len(conflict_keys),
            min(conflict_keys),
        )
        observed = _comparable(sync.read_keys(etcd, layout, conflict_keys), options)
        current = diff.plan(
            {k: v for k, v in values.items() if k in conflict_keys},
            observed.actual,
            observed.owned,
            prune=options.prune,
        )

    recorded = False
    last = record.last if record is not None else None
    changed_state = (
        bool(applied)
        or last is None
        or (last.source, last.commit, last.digest, last.pruned or not options.prune, last.rules)
        != (desired.source, desired.commit, desired.digest, True, parsecache.fingerprint())
    )
    if changed_state:
        entry = state.Apply(
            source=desired.source,
            commit=desired.commit,
            time=clock().isoformat(timespec="seconds"),
            keys=desired.total,
            digest=desired.digest,
            mode=desired.mode,
            pruned=options.prune,
            rules=parsecache.fingerprint(),
        )
        if not sync.write_record(
            etcd, layout, state.after(record, entry), seen_revision=record_revision, fence=lock
        ):
            raise ReconcileError(
                f"{layout.applied_key} was changed by someone else during this apply "
                "(another reconciler without the lock?); the keys are written, the record is not"
            )
        recorded = True
    return Result(
        desired=desired,
        previous=record,
        plan=first,
        applied=tuple(applied),
        revisions=revisions,
        replans=replans,
        recorded=recorded,
    )
