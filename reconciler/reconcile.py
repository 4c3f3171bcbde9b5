"""One reconcile pass: read the desired state (git HEAD or the work tree), check the
commit guard, read etcd, plan, apply in guarded transactions (planning again for keys
someone changed meanwhile), and record what was applied.

This module only sequences the steps; git is behind gitsource, etcd behind sync, and the
decisions are the pure functions of manifests, diff and state.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gleam import keys, messages, signing
from reconciler import commitsig, diff, gitsource, manifests, records, signed, sync
from reconciler import desired as desired_state

log = logging.getLogger("gleam.reconcile")

MAX_ATTEMPTS = 5


class ReconcileError(Exception):
    """A pass that stopped before writing anything it should not; the text says why."""


class GuardRefused(ReconcileError):
    """HEAD does not descend from the recorded commit (or that cannot be checked)."""


class PruneRefused(ReconcileError):
    """--prune would delete every owned key."""


class TooLarge(ReconcileError):
    """The pass would write more than --max_write_mib to etcd."""


class Conflict(ReconcileError):
    """Keys kept changing under us; gave up after MAX_ATTEMPTS plans."""


# The errors one pass can end with (besides manifests.InvalidManifests), each with a
# message to show as it is; the CLI and the daemon catch these and nothing else.
PASS_ERRORS: tuple[type[BaseException], ...] = (
    ReconcileError,
    gitsource.GitError,
    records.RecordError,
    sync.SyncError,
)


def resource_failure(exc: BaseException) -> str:
    """One line for a pass stopped by Python's own limits. The inputs are bounded
    (manifests.MAX_FILE_BYTES, aliases, depth; messages are decoded strictly), so this
    is the last line of defence: an error line, never a traceback."""
    if isinstance(exc, MemoryError):
        return "the pass ran out of memory and stopped"
    return "the pass met a value nested too deeply for Python and stopped"


# --max_write_mib's default: the most one pass may write to etcd (see _check_size).
MAX_WRITE_MIB = 256


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
    max_write_bytes: int = MAX_WRITE_MIB * 2**20


@dataclass(frozen=True)
class Pass:
    """What a pass saw and did, for rendering and exit codes."""

    desired: desired_state.Desired
    previous: records.Record | None
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


# The commit guard and the desired state --------------------------------------------


def check_guard(
    source: gitsource.Source | None, record: records.Record | None, head: str | None, *, force: bool
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
    record: records.Record | None,
    *,
    source: gitsource.Source | None,
) -> desired_state.Desired:
    """Desired state plus the commit guard. Raises manifests.InvalidManifests,
    GuardRefused or gitsource.GitError before anything is written."""
    if options.worktree:
        return desired_state.read_worktree(layout, options.repo, source)
    assert source is not None
    head = source.head()
    check_guard(source, record, head, force=options.force)
    mode = _mode(options, record)
    return desired_state.read_commit(layout, source, head, record, mode=mode, cache=options.cache)


def _mode(options: Options, record: records.Record | None) -> str:
    return desired_state.choose_mode(
        record,
        full=options.full,
        prune=options.prune,
        force=options.force,
        rules=manifests.rules_fingerprint(),
    )


def reads_everything(options: Options, record: records.Record | None) -> bool:
    """Whether read_desired will read every manifest (its scope None) for `record`."""
    if options.worktree:
        return True
    return _mode(options, record) == desired_state.FULL  # with no record, or no last apply


class _EarlyRead:
    """store.read_all() on a thread, started before a full pass reads its manifests:
    etcd looks up 100,000 keys (on the other core) while this one reads git. Reading
    early changes nothing: every write is still guarded by the revisions read."""

    def __init__(self, store: sync.Store) -> None:
        self._state: sync.EtcdState | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._read, args=(store,), name="gleam-read-etcd", daemon=True
        )
        self._thread.start()

    def _read(self, store: sync.Store) -> None:
        try:
            self._state = store.read_all()
        except BaseException as exc:  # handed to the pass's thread by result()
            self._error = exc

    def result(self) -> sync.EtcdState:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._state is not None
        return self._state

    def discard(self) -> None:
        self._thread.join()


# The pass ---------------------------------------------------------------------------------


# Above this many keys, one range read of everything beats point reads in batches.
POINT_READS_MAX = 1024


def _observe(store: sync.Store, scope: frozenset[str] | None) -> sync.EtcdState:
    if scope is not None and len(scope) <= POINT_READS_MAX:
        return store.read_keys(scope)
    observed = store.read_all()
    return observed if scope is None else observed.within(scope)


def _check_prune(
    store: sync.Store,
    plan: diff.Plan,
    observed: sync.EtcdState,
    options: Options,
    *,
    full: bool,
) -> None:
    removing = plan.count(diff.Action.DELETE) + plan.count(diff.Action.FORGET)
    if not removing or options.allow_empty:
        return
    owned_total = len(observed.owned) if full else store.count_owned()
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


def _check_size(plan: diff.Plan, options: Options) -> None:
    """Refuse a plan that would write more than options.max_write_bytes of messages. Git
    stores one blob once however many paths hold it, so a commit of a thousand copies of
    a 1 MiB manifest costs its author nothing and would write 1 GiB to etcd, whose
    default quota is 2 GiB for everything, history included: past it etcd refuses every
    write (its NOSPACE alarm), the agents' results and registrations too."""
    total = sum(len(c.new) for c in plan.changes if c.action in diff.WRITES and c.new is not None)
    if total > options.max_write_bytes:
        raise TooLarge(
            f"this pass would write {total / 2**20:.1f} MiB of task messages to etcd, over "
            f"--max_write_mib {options.max_write_bytes / 2**20:g}; nothing written. Raise "
            "it if that is really what you want (and etcd's quota with it)"
        )


def _comparable(observed: sync.EtcdState, options: Options) -> sync.EtcdState:
    return observed if options.signer is None else signed.comparable(observed, options.signer)


def _signed(store: sync.Store, plan: diff.Plan, options: Options, *, applied: int) -> diff.Plan:
    """The plan's writes signed (-sign_key); P for a key that must not exist yet is
    etcd's revision now, read only when there is such a key. `applied`: changes this
    pass has written already (a re-plan), for the error."""
    if options.signer is None:
        return plan
    revision = 0
    if any(c.action is diff.Action.CREATE for c in plan.changes):
        revision = store.current_revision()
    try:
        return signed.sign_plan(plan, options.signer, revision=revision)
    except messages.MessageError as exc:
        done = f"{applied} change(s) were applied before" if applied else "nothing written"
        raise ReconcileError(f"-sign_key: {exc}; {done}") from None


class CommitRefused(ReconcileError):
    """-verify_commits: the commit is not signed by an allowed signer; nothing written."""


def _verify_commit(options: Options, desired: desired_state.Desired) -> None:
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


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off for the span of a pass. A pass holds a whole
    tree's values (100,000 manifests: millions of objects) that are freed by reference
    counting, not cycles, and the collector's full sweeps over them were a tenth of a
    large apply's time. Nested uses are fine; the collector runs again after."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def run(
    store: sync.Store,
    options: Options,
    *,
    source: gitsource.Source | None = None,
    desired: desired_state.Desired | None = None,
    before_apply: Callable[[diff.Plan], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    cancel: threading.Event | None = None,
) -> Pass:
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
        lock = store.lock(ttl=options.lock_ttl)
        lock.acquire(timeout=options.lock_timeout, cancel=cancel)
    try:
        with collector_paused():
            return _run_locked(
                store,
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
    store: sync.Store,
    options: Options,
    *,
    source: gitsource.Source | None,
    desired: desired_state.Desired | None,
    lock: sync.Lock | None,
    before_apply: Callable[[diff.Plan], None] | None,
    clock: Callable[[], datetime],
) -> Pass:
    layout = store.layout
    record, record_revision = store.read_record()
    early = _EarlyRead(store) if desired is None and reads_everything(options, record) else None
    try:
        if desired is None:
            desired = read_desired(layout, options, record, source=source)
        elif desired.source == "commit":
            check_guard(source, record, desired.commit, force=options.force)
        if options.verify_commits is not None:
            _verify_commit(options, desired)
    except BaseException:
        if early is not None:
            early.discard()  # the pass's own error, not the read's
        raise
    values = desired.values
    scope = desired.scope
    if early is not None and scope is None:
        observed = _comparable(early.result(), options)
    else:
        if early is not None:
            early.discard()
        observed = _comparable(_observe(store, scope), options)
    first = diff.plan(values, observed.actual, observed.owned, prune=options.prune)
    _check_prune(store, first, observed, options, full=scope is None)
    _check_size(first, options)
    if before_apply is not None:
        before_apply(first)
    if options.dry_run:
        return Pass(desired=desired, previous=record, plan=first, dry_run=True)

    applied: list[diff.Change] = []
    revisions: dict[str, int] = {}
    current = first
    replans = 0
    while True:
        written = store.apply_changes(
            _signed(store, current, options, applied=len(applied)).changes,
            fence=lock,
            origin=records.origin_record(source=desired.source, commit=desired.commit),
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
        observed = _comparable(store.read_keys(conflict_keys), options)
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
        != (desired.source, desired.commit, desired.digest, True, manifests.rules_fingerprint())
    )
    if changed_state:
        entry = records.Apply(
            source=desired.source,
            commit=desired.commit,
            time=messages.rfc3339(clock().timestamp()),
            keys=desired.total,
            digest=desired.digest,
            mode=desired.mode,
            pruned=options.prune,
            rules=manifests.rules_fingerprint(),
        )
        if not store.write_record(
            records.after(record, entry), seen_revision=record_revision, fence=lock
        ):
            raise ReconcileError(
                f"{layout.applied_key} was changed by someone else during this apply "
                "(another reconciler without the lock?); the keys are written, the record is not"
            )
        recorded = True
    return Pass(
        desired=desired,
        previous=record,
        plan=first,
        applied=tuple(applied),
        revisions=revisions,
        replans=replans,
        recorded=recorded,
    )
