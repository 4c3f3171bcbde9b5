"""The pass's hardest rules on the in-memory etcd (gleam/fake_etcd.py), in milliseconds:
re-planning after a conflict, a lock lost mid-pass, the prune refusal, the commit guard,
incremental versus full reads. tests/test_reconcile_once.py covers the same ground end
to end on a real etcd and a real git checkout."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from gleam import etcdapi, keys, messages
from gleam.fake_etcd import FakeEtcd
from reconciler import desired as desired_state
from reconciler import diff, manifests, reconcile, records, sync

LAYOUT = keys.Layout("/gleam")


def sha(name: str) -> str:
    """A commit id for a short name (the applied record takes hex ids only)."""
    return hashlib.sha1(name.encode()).hexdigest()


def wanted(*names: str, commit: str = "c1", scope: frozenset[str] | None = None) -> Any:
    entries = {}
    for name in names:
        target = keys.Target(keys.Kind.NODE, name)
        value = messages.Task("print", {"n": name}).encode()
        entries[LAYOUT.task_key(target)] = manifests.Manifest(
            f"tasks/nodes/{name}.yaml", target, value
        )
    return desired_state.Desired(
        entries=entries,
        scope=scope,
        source="commit",
        commit=sha(commit),
        digest=f"git-tree:{commit}",
        total=len(entries),
        mode="full" if scope is None else "incremental",
    )


class History:
    """A stand-in for gitsource.Source: commits in one line, c1 before c2 before c3."""

    order = tuple(sha(c) for c in ("c1", "c2", "c3"))

    def is_ancestor(self, older: str, newer: str) -> bool:
        return self.order.index(older) <= self.order.index(newer)

    def describe(self, commit: str) -> str:
        return commit


def run(fake: FakeEtcd, desired: Any, *, source: Any = None, **options: Any) -> reconcile.Pass:
    before_apply = options.pop("before_apply", None)
    return reconcile.run(
        sync.Store(fake, LAYOUT),
        reconcile.Options(repo=Path("/nonexistent"), **options),
        source=source or History(),
        desired=desired,
        before_apply=before_apply,
    )


def node(name: str) -> str:
    return LAYOUT.node_key(name)


def test_a_pass_writes_keys_owns_them_and_records_the_commit() -> None:
    fake = FakeEtcd()
    result = run(fake, wanted("a", "b"))
    assert {c.action for c in result.applied} == {diff.Action.CREATE}
    assert set(fake.values(LAYOUT.prefix + "/node/")) == {node("a"), node("b")}
    assert set(fake.values(LAYOUT.owned_prefix)) == {LAYOUT.owned_key(node(n)) for n in "ab"}
    record = records.decode(fake.values(LAYOUT.applied_key)[LAYOUT.applied_key])
    assert record.commit == sha("c1") and result.recorded
    assert LAYOUT.lock_key not in fake.values(LAYOUT.meta_prefix)  # released
    # The same state again writes nothing, and need not record it again.
    again = run(fake, wanted("a", "b"))
    assert not again.applied and not again.recorded


def test_a_key_changed_between_plan_and_apply_is_read_and_planned_again() -> None:
    fake = FakeEtcd()
    result = run(fake, wanted("a"), before_apply=lambda _plan: fake.put(node("a"), b"by hand"))
    assert result.replans == 1
    assert [c.action for c in result.plan.changes] == [diff.Action.CREATE]
    # Planned again from what is there now: the hand-written value is replaced.
    assert [c.action for c in result.applied] == [diff.Action.UPDATE]
    assert fake.values(node("a"))[node("a")] == wanted("a").values[node("a")]


def test_keys_that_keep_changing_end_the_pass_with_conflict() -> None:
    fake = FakeEtcd()
    store = sync.Store(fake, LAYOUT)
    real_read = store.read_keys

    def read_then_meddle(task_keys: Any) -> sync.EtcdState:
        observed = real_read(task_keys)
        fake.put(node("a"), b"again")  # after every read: each plan is stale
        return observed

    store.read_keys = read_then_meddle  # type: ignore[method-assign]
    with pytest.raises(reconcile.Conflict, match="gave up after 5 plans"):
        reconcile.run(
            store,
            reconcile.Options(repo=Path("/x")),
            source=History(),  # type: ignore[arg-type]
            desired=wanted("a"),
            before_apply=lambda _plan: fake.put(node("a"), b"first"),
        )


def test_a_lock_lost_mid_pass_stops_every_write() -> None:
    fake = FakeEtcd()
    with pytest.raises(sync.LockLost, match="lost the apply lock"):
        run(fake, wanted("a"), before_apply=lambda _plan: fake.delete(LAYOUT.lock_key))
    assert fake.values(LAYOUT.prefix + "/") == {}


def test_a_lock_whose_lease_expired_cannot_write() -> None:
    now = [0.0]
    fake = FakeEtcd(clock=lambda: now[0])
    store = sync.Store(fake, LAYOUT)
    lock = store.lock(ttl=5)
    lock.acquire(timeout=1)
    try:
        now[0] += 60  # no refresh reached etcd for longer than the TTL
        change = diff.Change(diff.Action.CREATE, node("a"), new=b"{}")
        with pytest.raises(sync.LockLost):
            store.apply_changes([change], fence=lock)
        assert fake.values(LAYOUT.prefix + "/node/") == {}
    finally:
        lock.release()


def test_a_held_lock_times_out_naming_its_holder() -> None:
    fake = FakeEtcd()
    store = sync.Store(fake, LAYOUT)
    holder = store.lock(holder="ci-job-41")
    holder.acquire(timeout=1)
    try:
        with pytest.raises(sync.LockTimeout, match="held by ci-job-41; gave up"):
            store.lock().acquire(timeout=0, poll=0)
    finally:
        holder.release()
    store.lock().acquire(timeout=0)


def test_prune_refuses_to_delete_every_owned_key_unless_allowed() -> None:
    fake = FakeEtcd()
    run(fake, wanted("a", "b"))
    with pytest.raises(reconcile.PruneRefused, match="every key this reconciler owns"):
        run(fake, wanted(), prune=True)
    assert len(fake.values(LAYOUT.prefix + "/node/")) == 2
    # Removing some is fine; so is removing all when asked for.
    run(fake, wanted("a"), prune=True)
    assert set(fake.values(LAYOUT.prefix + "/node/")) == {node("a")}
    run(fake, wanted(), prune=True, allow_empty=True)
    assert fake.values(LAYOUT.prefix + "/node/") == {}


def test_an_incremental_prune_counts_owned_keys_outside_its_scope() -> None:
    fake = FakeEtcd()
    run(fake, wanted("a", "b"))
    # Only "a" changed (deleted) since c1: b is still owned, so this is no wipe-out.
    only_a = wanted(commit="c2", scope=frozenset({node("a")}))
    result = run(fake, only_a, prune=True)
    assert [(c.action, c.key) for c in result.applied] == [(diff.Action.DELETE, node("a"))]


def test_the_commit_guard_refuses_an_older_commit_unless_forced() -> None:
    fake = FakeEtcd()
    run(fake, wanted("a", commit="c2"))
    with pytest.raises(reconcile.GuardRefused, match="does not descend"):
        run(fake, wanted("b", commit="c1"))
    assert set(fake.values(LAYOUT.prefix + "/node/")) == {node("a")}
    run(fake, wanted("b", commit="c1"), force=True)
    assert node("b") in fake.values(LAYOUT.prefix + "/node/")
    run(fake, wanted("b", commit="c3"))  # a descendant is fine


def test_an_incremental_pass_reads_only_its_keys_a_full_one_reads_all() -> None:
    fake = FakeEtcd()
    run(fake, wanted("a", "b"))
    fake.put(node("b"), b"drifted")
    fake.put(LAYOUT.node_key("stray"), b"not ours")
    ranges: list[str] = []
    real_range = fake.range

    def range_(query: etcdapi.Range) -> Any:
        if query.prefix:
            ranges.append(query.key)
        return real_range(query)

    fake.range = range_  # type: ignore[method-assign]
    incremental = run(fake, wanted("a", commit="c2", scope=frozenset({node("a")})))
    assert not incremental.applied  # b's drift is outside the scope
    assert ranges == []  # point reads of a's keys only
    full = run(fake, wanted("a", "b", commit="c2"))
    assert [(c.action, c.key) for c in full.applied] == [(diff.Action.UPDATE, node("b"))]


def test_etcd_errors_come_out_as_etcd_failed() -> None:
    fake = FakeEtcd()

    def down(call: str) -> None:
        raise etcdapi.EtcdError(f"UNAVAILABLE: {call}")

    fake.fail = down
    with pytest.raises(sync.EtcdFailed, match="UNAVAILABLE"):
        run(fake, wanted("a"))


# The desired state's pure rules --------------------------------------------------------

RULES = "rules-1"


def record_of(*, source: str = "commit", pruned: bool = False, rules: str = RULES) -> Any:
    """A record whose guard commit is c1 and whose last apply is as given."""
    from_git = records.Apply("commit", sha("c1"), "t", 2, "d", pruned=pruned, rules=rules)
    last = records.Apply(source, sha("c1"), "t", 2, "d", pruned=pruned, rules=rules)
    return records.after(records.after(None, from_git), last)


@pytest.mark.parametrize(
    ("record", "options", "mode"),
    [
        (None, {}, desired_state.FULL),  # nothing applied yet
        (record_of(), {}, desired_state.INCREMENTAL),
        (record_of(), {"full": True}, desired_state.FULL),
        (record_of(), {"force": True}, desired_state.FULL),
        (record_of(rules="older"), {}, desired_state.FULL),  # validation rules changed
        (record_of(source="worktree"), {}, desired_state.FULL),  # last apply not from git
        (record_of(), {"prune": True}, desired_state.FULL),  # may have left orphans
        (record_of(pruned=True), {"prune": True}, desired_state.INCREMENTAL),
    ],
)
def test_choose_mode(record: Any, options: dict[str, bool], mode: str) -> None:
    chosen = desired_state.choose_mode(
        record,
        full=options.get("full", False),
        prune=options.get("prune", False),
        force=options.get("force", False),
        rules=RULES,
    )
    assert chosen == mode


def test_merge_replaces_the_keys_in_scope_of_an_incremental_read() -> None:
    cached = wanted("a", "b", commit="c1")
    newer = wanted("b", "c", commit="c2", scope=frozenset({node("b"), node("c"), node("a")}))
    merged = cached.merge(newer, base_commit=sha("c1"))
    assert merged is not None and merged.scope is None and merged.mode == desired_state.FULL
    assert set(merged.entries) == {node("b"), node("c")} and merged.total == 2
    assert merged.commit == sha("c2")
    # Read on top of another commit than the cached one's: cannot be merged.
    assert cached.merge(newer, base_commit=sha("c0")) is None
    # A full read replaces the cache; a work tree's is never kept.
    full = wanted("z", commit="c3")
    assert cached.merge(full, base_commit=sha("c2")) is full
    tree = desired_state.Desired({}, None, "worktree", None, "sha256:x", 0, desired_state.FULL)
    assert cached.merge(tree, base_commit=None) is None


def test_a_lock_that_could_not_be_taken_leaves_no_lease_behind() -> None:
    fake = FakeEtcd()
    store = sync.Store(fake, LAYOUT)
    holder = store.lock(holder="ci-job-41")
    holder.acquire(timeout=1)
    waiting = store.lock()
    with pytest.raises(sync.LockTimeout):
        waiting.acquire(timeout=0, poll=0)
    assert waiting.lease_id == 0
    real_txn = fake.txn

    def txn_fails(*args: Any) -> Any:
        raise etcdapi.EtcdError("UNAVAILABLE: txn")

    fake.txn = txn_fails  # type: ignore[method-assign]
    failing = store.lock()
    with pytest.raises(sync.EtcdFailed):
        failing.acquire(timeout=1)
    assert failing.lease_id == 0  # revoked, and its keep-alive stopped
    fake.txn = real_txn  # type: ignore[method-assign]
    holder.release()


# A full pass reads etcd on a thread while it reads the manifests --------------------------


def _worktree_pass(tmp_path: Path, text: str, read_all: Any) -> tuple[reconcile.Pass, FakeEtcd]:
    (tmp_path / "tasks" / "nodes").mkdir(parents=True)
    (tmp_path / "tasks" / "nodes" / "web-1.yaml").write_text(text)
    fake = FakeEtcd()
    store = sync.Store(fake, LAYOUT)
    store.read_all = read_all(store.read_all)  # type: ignore[method-assign]
    options = reconcile.Options(repo=tmp_path, worktree=True)
    return reconcile.run(store, options, source=None), fake


def _failing(_real: Any) -> Any:
    def read_all() -> sync.EtcdState:
        raise sync.EtcdFailed("etcd went away")

    return read_all


def test_a_full_pass_uses_the_etcd_read_it_started_early(tmp_path: Path) -> None:
    threads: list[str] = []

    def counted(real: Any) -> Any:
        def read_all() -> sync.EtcdState:
            threads.append(threading.current_thread().name)
            return real()

        return read_all

    result, fake = _worktree_pass(tmp_path, "name: print\n", counted)
    assert threads == ["gleam-read-etcd"]
    assert [c.key for c in result.applied] == [node("web-1")]
    assert node("web-1") in fake.values(LAYOUT.prefix)


def test_invalid_manifests_are_reported_before_a_failed_early_read(tmp_path: Path) -> None:
    with pytest.raises(manifests.InvalidManifests):
        _worktree_pass(tmp_path, "name: [unclosed\n", _failing)


def test_a_failed_early_read_ends_the_pass_as_a_read_would(tmp_path: Path) -> None:
    with pytest.raises(sync.EtcdFailed, match="etcd went away"):
        _worktree_pass(tmp_path, "name: print\n", _failing)


def _record(*, source: str = "commit", rules: str = "") -> records.Record:
    applied = records.Apply(source=source, commit=sha("c1"), time="t", keys=1, digest="d")
    return records.Record(commit=sha("c1"), history=(dataclasses.replace(applied, rules=rules),))


@pytest.mark.parametrize(
    ("record", "flags", "expected"),
    [
        (None, {}, True),  # the first pass
        (_record(rules="old rules"), {}, True),  # rules changed since
        (_record(source="worktree"), {}, True),  # the last apply was not from git
        ("current", {"full": True}, True),
        ("current", {"worktree": True}, True),
        ("current", {}, False),  # incremental: the changed keys only, read later
    ],
)
def test_reads_everything_follows_the_pass_mode(
    record: records.Record | str | None, flags: dict[str, bool], expected: bool
) -> None:
    if record == "current":
        record = _record(rules=manifests.rules_fingerprint())
    assert not isinstance(record, str)
    options = reconcile.Options(repo=Path("/nonexistent"), **flags)
    assert reconcile.reads_everything(options, record) is expected
