"""gleam-reconcile --once against a real etcd and real git repositories."""

from __future__ import annotations

import dataclasses
import json
import marshal
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from gleam import connection, flags, keys
from gleam.embedded import EtcdServer
from reconciler import (
    cli,
    desired,
    diff,
    gitsource,
    manifests,
    parsecache,
    reconcile,
    records,
    sync,
)
from tests.reconcile_support import OpsRepo, revisions, run_cli, values


@pytest.fixture
def repo(tmp_path: Path) -> OpsRepo:
    r = OpsRepo(tmp_path / "ops")
    r.node("web-1", "print", "data:\n  msg: hello\n")
    r.region("eu", "config::sync", "data:\n  path: /etc/app.conf\n")
    r.commit("first")
    return r


def test_first_apply_writes_canonical_messages_ownership_and_the_record(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0, err
    assert f"+ {layout.prefix}/node/web-1  print" in out
    assert f"+ {layout.prefix}/region/eu  config::sync" in out
    assert "2 created, 0 updated, 0 deleted" in out
    got = values(etcd, layout.prefix + "/")
    assert got[layout.node_key("web-1")] == b'{"Data":{"msg":"hello"},"Name":"print"}'
    assert (
        got[layout.region_key("eu")] == b'{"Data":{"path":"/etc/app.conf"},"Name":"config::sync"}'
    )
    assert set(values(etcd, layout.owned_prefix)) == {
        f"{layout.prefix}/meta/owned/node/web-1",
        f"{layout.prefix}/meta/owned/region/eu",
    }
    record = records.decode(got[layout.applied_key])
    assert record.commit == repo.head()
    assert record.last is not None and record.last.keys == 2
    assert record.last.digest == "git-tree:" + repo.git("rev-parse", "HEAD:tasks")
    # The lock was released.
    assert layout.lock_key not in got


def test_update_writes_only_what_changed_and_says_what_changed_in_the_data(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    before = revisions(etcd, layout.prefix + "/")
    repo.region("eu", "config::sync", "data:\n  path: /etc/other.conf\n")
    repo.commit("move the file")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0, err
    assert f"~ {layout.prefix}/region/eu  config::sync" in out
    assert 'data.path: "/etc/app.conf" -> "/etc/other.conf"' in out
    assert "incremental pass" in out
    after = revisions(etcd, layout.prefix + "/")
    assert after[layout.node_key("web-1")] == before[layout.node_key("web-1")]
    assert after[layout.region_key("eu")] > before[layout.region_key("eu")]
    # A second run has nothing to do and writes nothing at all.
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0 and "No changes" in out
    assert revisions(etcd, layout.prefix + "/") == after


def test_prune_deletes_only_owned_keys_and_never_hand_written_ones(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    etcd.put(layout.node_key("by-hand"), b'{"Name":"print","Data":1}')
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    repo.remove("tasks/nodes/web-1.yaml")
    repo.commit("retire web-1")

    # Without --prune the key stays, and the output says so.
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0
    assert "1 owned key(s) have no manifest" in out and layout.node_key("web-1") in out
    assert layout.node_key("web-1") in values(etcd, layout.prefix + "/node/")

    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--prune")
    assert code == 0, err
    assert f"- {layout.prefix}/node/web-1  print" in out
    left = values(etcd, layout.prefix + "/")
    assert layout.node_key("web-1") not in left
    assert f"{layout.prefix}/meta/owned/node/web-1" not in left
    assert left[layout.node_key("by-hand")] == b'{"Name":"print","Data":1}'
    assert layout.region_key("eu") in left


def test_pruning_every_owned_key_is_refused_unless_allow_empty(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    repo.git("rm", "-q", "-r", "tasks")
    repo.commit("oops, everything gone")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--prune")
    assert code == 1
    assert "--allow-empty" in err
    assert len(values(etcd, layout.prefix + "/node/")) == 1  # nothing deleted
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--prune", "--allow-empty")
    assert code == 0, err
    assert values(etcd, layout.prefix + "/node/") == {}
    assert values(etcd, layout.prefix + "/region/") == {}
    assert values(etcd, layout.owned_prefix) == {}


def test_a_pass_that_would_write_more_than_max_write_mib_writes_nothing(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    # One 0.3 MiB blob at 8 paths: git holds it once, etcd would get 2.7 MiB (as JSON).
    text = "name: print\ndata:\n" + "".join(f"  k{i}: {'x' * 60}\n" for i in range(5000))
    for i in range(8):
        repo.write(f"tasks/nodes/copy-{i}.yaml", text)
    repo.commit("many copies of one big file")
    for extra in (("--dry-run",), ()):
        code, _out, err = run_cli(
            capsys, etcd_server.endpoint, layout, repo, "--max_write_mib", "2", *extra
        )
        assert code == 1, err
        assert "would write 2.7 MiB of task messages to etcd, over --max_write_mib 2" in err
        assert values(etcd, layout.prefix + "/node/") == {}  # nothing written
    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--max_write_mib", "3")
    assert code == 0, err
    assert len(values(etcd, layout.prefix + "/node/")) == 9
    for bad in ("0", "-1", "nan", "1.5", "9" * 5000):
        code, _out, err = run_cli(
            capsys, etcd_server.endpoint, layout, repo, "--max_write_mib", bad
        )
        assert code == 1 and "-max_write_mib: " in err, (bad, err)


def test_a_dead_endpoint_in_the_list_never_fails_a_pass(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    from gleam.embedded import free_port

    endpoints = f"http://127.0.0.1:{free_port()},{etcd_server.endpoint}"
    for _ in range(3):  # every run, not one in two (pyetcd alone starts at random)
        code, _out, err = run_cli(capsys, endpoints, layout, repo)
        assert code == 0, err
    assert len(values(etcd, layout.prefix + "/node/")) == 1


def test_invalid_manifests_write_nothing_and_every_error_is_printed(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    repo.write("tasks/nodes/web-2.yaml", "name: print\ndata: 1\nextra: no\n")
    repo.write("tasks/regions/us.yaml", "name: [not, a, name]\n")
    repo.commit("two bad files")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 1
    assert "tasks/nodes/web-2.yaml:3: unknown key 'extra'" in err
    assert "tasks/regions/us.yaml:1: name: ['not', 'a', 'name'] is not of type 'string'" in err
    assert "nothing was written" in err
    assert values(etcd, layout.prefix + "/") == {}

    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--output", "json")
    body = json.loads(out)
    assert code == 1 and body["version"] == 1 and body["ok"] is False
    assert {(e["file"], e["line"]) for e in body["errors"]} == {
        ("tasks/nodes/web-2.yaml", 3),
        ("tasks/regions/us.yaml", 1),
    }


def test_commit_guard_refuses_a_commit_that_does_not_descend_from_the_applied_one(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    base = repo.head()
    repo.git("checkout", "-q", "-b", "newer")
    repo.node("web-1", "print", "data:\n  msg: newer\n")
    newer = repo.commit("newer change")
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0

    # An older job, on a branch that does not contain the applied commit, finishes late.
    repo.git("checkout", "-q", "-b", "older", base)
    repo.node("web-1", "print", "data:\n  msg: older\n")
    older = repo.commit("older change")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 1
    assert older[:12] in err and newer[:12] in err and "--force" in err
    assert b"newer" in values(etcd, layout.node_key("web-1"))[layout.node_key("web-1")]

    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--force")
    assert code == 0, err
    assert b"older" in values(etcd, layout.node_key("web-1"))[layout.node_key("web-1")]
    record = records.decode(values(etcd, layout.applied_key)[layout.applied_key])
    assert [h.commit for h in record.history] == [older, newer]


def test_a_writer_between_plan_and_apply_makes_the_reconciler_plan_again(
    etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    repo.node("web-2", "print")
    repo.commit("add web-2")
    web1, web2 = layout.node_key("web-1"), layout.node_key("web-2")
    etcd.put(web1, b"old")

    def meddle(plan: diff.Plan) -> None:
        assert {c.key for c in plan.changes} >= {web1, web2}
        etcd.put(web1, b'{"Name":"print","Data":"meddled"}')  # changed after planning
        etcd.put(web2, b'{"Data":null,"Name":"print"}')  # created, already as wanted

    result = reconcile.run(
        sync.Store.over(etcd, layout), reconcile.Options(repo=repo.path), before_apply=meddle
    )
    assert result.replans == 1
    got = values(etcd, layout.prefix + "/node/")
    assert got[web1] == b'{"Data":{"msg":"hello"},"Name":"print"}'
    assert got[web2] == b'{"Data":null,"Name":"print"}'
    actions = {c.key: c.action for c in result.applied}
    assert actions[web1] is diff.Action.UPDATE
    assert actions[web2] is diff.Action.ADOPT  # re-planned: nothing to write but ownership
    owned = values(etcd, layout.owned_prefix)
    assert f"{layout.prefix}/meta/owned/node/web-2" in owned


def test_more_than_128_changes_go_in_several_guarded_transactions(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, tmp_path: Path
) -> None:
    repo = OpsRepo(tmp_path / "big")
    for i in range(300):
        repo.node(f"n{i:03d}", "print", f"data:\n  i: {i}\n")
    repo.commit("300 nodes")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0, err
    assert "300 created" in out
    revs = revisions(etcd, layout.prefix + "/node/")
    assert len(revs) == 300
    assert len(set(revs.values())) >= 300 * 2 // connection.MAX_TXN_OPS  # one revision per txn
    for batch in sync.batches([diff.Change(diff.Action.CREATE, k, new=b"x" * 10) for k in revs]):
        assert 2 * len(batch) <= connection.MAX_TXN_OPS - 1


def test_batches_respect_the_request_size_limit() -> None:
    big = b"x" * (300 * 1024)
    changes = [diff.Change(diff.Action.CREATE, f"/g/node/n{i}", new=big) for i in range(10)]
    groups = sync.batches(changes)
    assert sum(len(g) for g in groups) == 10
    for group in groups:
        assert sum(len(c.new or b"") for c in group) < sync.MAX_TXN_BYTES


def test_dry_run_writes_nothing_and_detailed_exitcode_says_changes_are_pending(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    args = ("--dry-run", "--detailed-exitcode")
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, *args)
    assert code == 2 and "2 to create" in out and "Dry run: nothing written" in out
    assert values(etcd, layout.prefix + "/") == {}
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--dry-run")
    assert code == 0
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, *args)
    assert code == 0 and "Nothing to do" in out


def test_json_output_is_versioned_and_lists_the_changes(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "-output", "json")
    body = json.loads(out)
    assert code == 0 and body["version"] == 1 and body["ok"] is True
    assert body["commit"] == repo.head() and body["mode"] == "full"
    assert body["summary"]["create"] == 2
    created = {c["key"]: c for c in body["changes"]}
    written = revisions(etcd, layout.prefix + "/node/")
    assert created[layout.node_key("web-1")]["revision"] == written[layout.node_key("web-1")]


def test_an_unowned_key_already_as_wanted_is_adopted_and_then_prunable(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    etcd.put(layout.node_key("web-1"), b'{"Data":{"msg":"hello"},"Name":"print"}')
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0 and "now owned" in out and "1 adopted" in out
    repo.remove("tasks/nodes/web-1.yaml")
    repo.commit("gone")
    assert run_cli(capsys, etcd_server.endpoint, layout, repo, "--prune")[0] == 0
    assert layout.node_key("web-1") not in values(etcd, layout.prefix + "/node/")


def test_incremental_pass_skips_unchanged_manifests_and_full_puts_back_drift(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    etcd.put(layout.region_key("eu"), b'{"Name":"print","Data":"drift"}')
    repo.node("web-1", "print", "data:\n  msg: bye\n")
    repo.commit("change web-1 only")
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0 and "incremental pass" in out and "1 updated" in out
    assert b"drift" in values(etcd, layout.region_key("eu"))[layout.region_key("eu")]
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--full")
    assert code == 0 and "full pass" in out and f"~ {layout.region_key('eu')}" in out
    assert b"drift" not in values(etcd, layout.region_key("eu"))[layout.region_key("eu")]


def test_renaming_yaml_to_yml_in_an_incremental_pass_keeps_the_key(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    repo.git("mv", "tasks/nodes/web-1.yaml", "tasks/nodes/web-1.yml")
    repo.commit("rename")
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--prune")
    assert code == 0 and "No changes" in out
    assert layout.node_key("web-1") in values(etcd, layout.prefix + "/node/")


def test_worktree_reads_uncommitted_files_and_the_next_commit_run_is_full(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    repo.node("web-1", "print", "data:\n  msg: trying\n")  # not committed
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--worktree")
    assert code == 0 and "the work tree" in out and "1 updated" in out
    record = records.decode(values(etcd, layout.applied_key)[layout.applied_key])
    assert record.last is not None and record.last.source == "worktree"
    assert record.commit == repo.head()  # the guard's reference is still the last commit
    # Back to git: HEAD is the truth again, read in full because etcd held the work tree.
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0 and "full pass" in out and "1 updated" in out
    assert b"hello" in values(etcd, layout.node_key("web-1"))[layout.node_key("web-1")]


def test_bad_flags_and_unreachable_etcd_exit_1(
    capsys: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    code, _, err = run_cli(capsys, "http://127.0.0.1:1", layout, repo, "--output", "yaml")
    assert code == 1 and "-output" in err
    code, _, err = run_cli(capsys, "http://127.0.0.1:1", layout, repo, "--bogus")
    assert code == 1
    code, _, err = run_cli(capsys, "http://127.0.0.1:1", layout, repo, "-lock_timeout", "1")
    assert code == 1 and "etcd" in err


def test_full_reads_use_the_parse_cache_by_blob_id_and_ignore_a_stale_one(
    layout: keys.Layout, repo: OpsRepo
) -> None:
    source = gitsource.Source(repo.path)
    first = desired.read_full(layout, source, repo.head())
    cache_file = parsecache.path_for(source.git_dir)
    blob = manifests.cache_key(
        "tasks/nodes/web-1.yaml", repo.git("rev-parse", "HEAD:tasks/nodes/web-1.yaml")
    )
    cached = parsecache.load(cache_file)
    assert cached[blob] == first.entries[layout.node_key("web-1")].value
    # The cache is what a full read uses: a doctored entry shows through...
    cached[blob] = b'{"Data":"from the cache","Name":"print"}'
    parsecache.save(cache_file, cached)
    again = desired.read_full(layout, source, repo.head())
    assert again.entries[layout.node_key("web-1")].value == cached[blob]
    # ...unless the cache is off, or was written by other parsing rules.
    off = desired.read_full(layout, source, repo.head(), cache=False)
    assert (
        off.entries[layout.node_key("web-1")].value == first.entries[layout.node_key("web-1")].value
    )
    with open(cache_file, "wb") as fh:
        marshal.dump(("another fingerprint", cached), fh)
    assert parsecache.load(cache_file) == {}
    fresh = desired.read_full(layout, source, repo.head())
    assert fresh.entries == first.entries


def test_a_cached_region_manifest_copied_to_a_node_path_is_still_refused(
    layout: keys.Layout, repo: OpsRepo
) -> None:
    # A blob parses to different things at a region path and at a node path (a rollout
    # is for region tasks only): the cache of a blob parsed as a region manifest must
    # not let the same bytes through as a node manifest in a later pass.
    text = 'name: print\nrollout:\n  waves: [1, "100%"]\n'
    repo.write("tasks/regions/eu.yaml", text)
    repo.commit("a staged region task")
    source = gitsource.Source(repo.path)
    first = desired.read_full(layout, source, repo.head())
    assert b'"Rollout"' in first.entries[layout.region_key("eu")].value
    repo.write("tasks/nodes/web-9.yaml", text)
    repo.commit("the same file as a node task")
    with pytest.raises(manifests.InvalidManifests) as refused:
        desired.read_full(layout, source, repo.head())
    assert [(e.path, e.message) for e in refused.value.errors] == [
        (
            "tasks/nodes/web-9.yaml",
            "a node manifest cannot have `rollout` (waves are for region tasks)",
        )
    ]


def test_a_parse_cache_that_is_a_fifo_or_a_directory_is_ignored(tmp_path: Path) -> None:
    found: list[dict[str, bytes]] = []
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # On a thread, so that a regression hangs no test run: it fails on the deadline.
    reader = threading.Thread(target=lambda: found.append(parsecache.load(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert found == [{}]
    assert parsecache.load(tmp_path) == {}  # a directory


def test_worktree_works_in_a_directory_that_is_not_a_git_repository(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    (plain / "tasks" / "nodes").mkdir(parents=True)
    (plain / "tasks" / "nodes" / "n1.yml").write_text("name: print\n")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, plain)
    assert code == 1 and "not a git repository" in err
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, plain, "--worktree")
    assert code == 0, err
    assert values(etcd, layout.node_key("n1")) == {
        layout.node_key("n1"): b'{"Data":null,"Name":"print"}'
    }


def test_a_recorded_commit_missing_from_the_checkout_is_refused_unless_forced(
    capsys: Any,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    repo: OpsRepo,
    tmp_path: Path,
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    other = OpsRepo(tmp_path / "unrelated")
    other.node("web-1", "print")
    other.commit("unrelated history")
    code, _, err = run_cli(capsys, etcd_server.endpoint, layout, other)
    assert code == 1
    assert f"commit {repo.head()[:12]} is not in" in err and "--force" in err
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, other, "--force")
    assert code == 0, err
    assert "full pass" in out


def test_an_incremental_pass_reports_every_error_in_the_changed_files(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    before = revisions(etcd, layout.prefix + "/")
    repo.write("tasks/nodes/eu/web-9.yaml", "name: print\n")
    repo.write("tasks/regions/us.yaml", "name: print\ndata: [unclosed\n")
    repo.node("web-1", "print", "data:\n  msg: changed\n")
    repo.commit("one good change, two bad files")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 1
    assert "tasks/nodes/eu/web-9.yaml: manifests go directly in tasks/nodes/" in err
    assert "tasks/regions/us.yaml:3: not valid YAML" in err
    assert revisions(etcd, layout.prefix + "/") == before  # not even the good change


def test_a_held_lock_makes_a_second_run_wait_then_give_up_naming_the_holder(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    holder = sync.Store.over(etcd, layout).lock(holder="ci-job-41")
    holder.acquire(timeout=5)
    try:
        code, _, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "-lock_timeout", "0.3")
        assert code == 1 and "held by ci-job-41" in err
        assert values(etcd, layout.prefix + "/node/") == {}
        # A dry run reads only, so it does not need the lock.
        assert run_cli(capsys, etcd_server.endpoint, layout, repo, "--dry-run")[0] == 0
    finally:
        holder.release()
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0


def test_a_reconciler_that_lost_its_lock_writes_nothing(etcd: Any, layout: keys.Layout) -> None:
    lock = sync.Store.over(etcd, layout).lock()
    lock.acquire(timeout=5)
    try:
        etcd.delete(layout.lock_key)  # as if the lease had expired
        change = diff.Change(diff.Action.CREATE, layout.node_key("n1"), new=b"{}")
        with pytest.raises(sync.LockLost):
            sync.Store.over(etcd, layout).apply_changes([change], fence=lock)
        assert values(etcd, layout.prefix + "/") == {}
    finally:
        lock.release()


def test_switches_come_from_the_command_line_the_environment_or_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "gleam.yaml"
    config_file.write_text("prune: true\nrepo: /srv/ops\noutput: json\n")
    monkeypatch.setenv("GLEAM_FORCE", "yes")
    parsed = cli.parse(["-once", "-config", str(config_file), "-dry-run"])
    assert parsed.options.prune and parsed.options.force and parsed.options.dry_run
    assert parsed.options.repo == Path("/srv/ops") and parsed.output == "json"
    assert not parsed.options.full
    monkeypatch.setenv("GLEAM_FULL", "perhaps")
    with pytest.raises(flags.FlagError, match="GLEAM_FULL"):
        cli.parse(["--once"])


def test_a_stray_ownership_record_cannot_make_prune_delete_other_keys(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    etcd.put(layout.info_key("web-9"), b"{}")
    etcd.put(layout.owned_prefix + "info/web-9", b"")
    etcd.put(layout.owned_prefix + "node/a/b", b"")
    code, _, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--prune", "--full")
    assert code == 0, err
    assert values(etcd, layout.info_key("web-9")) == {layout.info_key("web-9"): b"{}"}


def test_an_incremental_pass_sees_a_new_file_that_duplicates_an_unchanged_one(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    repo.write("tasks/nodes/web-1.yml", "name: print\ndata: the other spelling\n")
    repo.commit("a second file for web-1")
    code, _, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 1
    assert "tasks/nodes/web-1.yml: tasks/nodes/web-1.yaml already defines node/web-1" in err


def test_after_an_upgrade_that_changes_the_rules_the_next_pass_is_full(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    key = layout.applied_key
    record = records.decode(values(etcd, key)[key])
    assert record.last is not None and record.last.rules == manifests.rules_fingerprint()
    older = dataclasses.replace(record.last, rules="older-rules")
    etcd.put(key, records.Record(record.commit, (older,)).encode())
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0 and "full pass" in out
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0 and "incremental pass" in out


def test_a_cache_saved_on_a_thread_is_whole_for_the_next_load(tmp_path: Path) -> None:
    """read_full saves the parse cache on a thread; a load (the next pass) or another
    save of the same file waits for it, so neither sees a missing or older cache."""
    path = tmp_path / "cache"
    gate = threading.Event()
    entries = {f"{i:040x}": b"x" * 100 for i in range(20000)}

    def slow() -> dict[str, bytes]:
        gate.wait(10)  # still building when load is called
        return entries

    parsecache.save_soon(path, slow)
    assert path in parsecache._saving  # still building: load must wait for it
    threading.Timer(0.2, gate.set).start()
    assert parsecache.load(path) == entries
    parsecache.save_soon(path, lambda: {"a" * 40: b"1"})
    parsecache.save_soon(path, lambda: {"b" * 40: b"2"})  # waits for the first
    assert parsecache.load(path) == {"b" * 40: b"2"}
    assert not [t for t in threading.enumerate() if t.name == "gleam-parse-cache-save"]
