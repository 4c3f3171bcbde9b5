"""The reconciler daemon: passes at start, on a new commit, on the interval (drift), with
--pull, under the apply lock, and a clean stop on SIGTERM."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gleam import keys
from gleam.embedded import EtcdServer, free_port
from reconciler import daemon, diff, reconcile, records, sync
from tests.reconcile_support import OpsRepo, values
from tests.support import ROOT, client_for, wait_until


class Running:
    """A Daemon on a thread, with every pass report kept."""

    def __init__(
        self, etcd: Any, layout: keys.Layout, repo: Path, *, worktree: bool = False, **settings: Any
    ) -> None:
        self.reports: list[daemon.PassReport] = []
        self.stop = threading.Event()
        options = reconcile.Options(repo=repo, prune=True, lock_timeout=60, worktree=worktree)
        defaults = {"interval": 60.0, "debounce": 0.05, "full_every": 1000}
        self.daemon = daemon.Daemon(
            sync.Store.over(etcd, layout),
            options,
            daemon.LoopSettings(**{**defaults, **settings}),
            stop=self.stop,
            on_pass=self.reports.append,
        )
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.close()


@pytest.fixture
def repo(tmp_path: Path) -> OpsRepo:
    r = OpsRepo(tmp_path / "ops")
    r.node("web-1", "print", "data:\n  v: 1\n")
    r.commit("first")
    return r


def value_of(etcd: Any, key: str) -> bytes | None:
    return values(etcd, key).get(key)


def test_daemon_applies_at_start_and_picks_up_a_new_commit(
    etcd: Any, layout: keys.Layout, repo: OpsRepo, running: list[Running]
) -> None:
    d = Running(etcd, layout, repo.path)
    running.append(d)
    key = layout.node_key("web-1")
    wait_until(lambda: d.reports, what="the first pass")
    assert d.reports[0].reason is daemon.Reason.START and value_of(etcd, key)

    repo.node("web-1", "print", "data:\n  v: 2\n")
    repo.region("eu", "print")
    commit = repo.commit("second")
    change_pass = wait_until(
        lambda: next((r for r in d.reports if r.reason is daemon.Reason.CHANGE and r.result), None),
        what="the new commit applied",
    )
    assert value_of(etcd, layout.region_key("eu"))
    assert value_of(etcd, key) == b'{"Data":{"v":2},"Name":"print"}'
    assert (
        change_pass is not None
        and change_pass.result is not None
        and change_pass.result.desired.commit == commit
    )
    assert change_pass.result.desired.mode == "incremental"
    record = records.decode(values(etcd, layout.applied_key)[layout.applied_key])
    assert record.commit == commit


def test_interval_pass_puts_back_a_key_changed_by_hand_and_logs_it(
    etcd: Any,
    layout: keys.Layout,
    repo: OpsRepo,
    running: list[Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gleam.reconcile")
    key = layout.node_key("web-1")
    d = Running(etcd, layout, repo.path, interval=0.2)
    running.append(d)
    wait_until(lambda: value_of(etcd, key), what="the first pass")
    etcd.put(key, b'{"Name":"print","Data":"by hand"}')
    wait_until(
        lambda: value_of(etcd, key) == b'{"Data":{"v":1},"Name":"print"}', what="drift put back"
    )
    wait_until(lambda: "drift, put back" in caplog.text, what="the drift log line")
    drift = wait_until(
        lambda: [
            r
            for r in d.reports
            if r.reason is daemon.Reason.INTERVAL and r.result and r.result.applied
        ],
        what="the interval pass report",
    )
    assert drift[0].result is not None
    assert drift[0].result.applied[0].action is diff.Action.UPDATE
    assert drift[0].result.desired.mode == "full"


def test_a_held_apply_lock_keeps_the_daemon_from_applying(
    etcd: Any,
    layout: keys.Layout,
    repo: OpsRepo,
    running: list[Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gleam.reconcile")
    other = sync.Store.over(etcd, layout).lock(holder="other-reconciler")
    other.acquire(timeout=5)
    try:
        d = Running(etcd, layout, repo.path)
        running.append(d)
        wait_until(lambda: "held by other-reconciler" in caplog.text, what="the daemon waiting")
        assert values(etcd, layout.prefix + "/node/") == {}
        assert not d.reports
    finally:
        other.release()
    wait_until(lambda: value_of(etcd, layout.node_key("web-1")), what="apply after release")


def test_pull_fetches_and_fast_forwards_on_the_interval(
    etcd: Any, layout: keys.Layout, tmp_path: Path, running: list[Running]
) -> None:
    upstream = OpsRepo(tmp_path / "upstream")
    upstream.node("web-1", "print")
    upstream.commit("first")
    subprocess.run(
        ["git", "clone", "-q", str(upstream.path), str(tmp_path / "checkout")], check=True
    )
    d = Running(etcd, layout, tmp_path / "checkout", interval=0.2, pull=True)
    running.append(d)
    wait_until(lambda: value_of(etcd, layout.node_key("web-1")), what="the first pass")
    upstream.node("web-2", "print")
    upstream.commit("upstream change")
    wait_until(lambda: value_of(etcd, layout.node_key("web-2")), what="the pulled commit")


def test_sigterm_stops_the_daemon_process_cleanly_after_it_followed_a_commit(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo, tmp_path: Path
) -> None:
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "reconciler.cli",
                # A dead endpoint first: the daemon starts on the live one.
                "-etcd", f"http://127.0.0.1:{free_port()},{etcd_server.endpoint}",
                "-prefix", layout.prefix,
                "--repo", str(repo.path), "--interval", "60", "--debounce", "0.05",
            ],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        key = layout.node_key("web-1")
        wait_until(lambda: value_of(etcd, key), what="the daemon's first pass")
        repo.node("web-1", "print", "data:\n  v: 3\n")
        repo.commit("third")
        wait_until(
            lambda: value_of(etcd, key) == b'{"Data":{"v":3},"Name":"print"}',
            what="the commit applied by the daemon process",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "SIGTERM: stopping" in text and "stopped" in text
    assert "ConnectionFailed" not in text  # no pass failed on the dead endpoint
    assert layout.lock_key not in values(etcd, layout.meta_prefix)


def test_an_invalid_commit_is_logged_and_skipped_and_the_next_good_one_applied(
    etcd: Any,
    layout: keys.Layout,
    repo: OpsRepo,
    running: list[Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gleam.reconcile")
    d = Running(etcd, layout, repo.path)
    running.append(d)
    wait_until(lambda: d.reports, what="the first pass")
    repo.node("web-1", "print", "data:\n  v: 2\nnmae: typo\n")
    repo.commit("typo")
    failed = wait_until(
        lambda: [r for r in d.reports if r.error], what="the pass over the invalid commit"
    )
    assert failed[0].error == "1 invalid manifest(s)"
    assert "tasks/nodes/web-1.yaml:4: unknown key 'nmae'" in caplog.text
    assert value_of(etcd, layout.node_key("web-1")) == b'{"Data":{"v":1},"Name":"print"}'
    repo.node("web-1", "print", "data:\n  v: 2\n")
    repo.commit("fixed")
    wait_until(
        lambda: value_of(etcd, layout.node_key("web-1")) == b'{"Data":{"v":2},"Name":"print"}',
        what="the fixed commit applied",
    )


def test_the_daemon_survives_etcd_going_away_and_applies_once_it_is_back(
    private_etcd: EtcdServer, layout: keys.Layout, repo: OpsRepo, running: list[Running]
) -> None:
    etcd = client_for(private_etcd.endpoint)
    try:
        d = Running(etcd, layout, repo.path, retry=0.2)
        running.append(d)
        wait_until(lambda: d.reports, what="the first pass")
        private_etcd.kill()
        repo.node("web-1", "print", "data:\n  v: 2\n")
        repo.commit("while etcd is down")
        wait_until(lambda: any(r.error for r in d.reports), what="a pass failing on etcd")
        private_etcd.start()
        wait_until(
            lambda: value_of(etcd, layout.node_key("web-1")) == b'{"Data":{"v":2},"Name":"print"}',
            timeout=60,
            what="the commit applied after etcd came back",
        )
    finally:
        running.pop().close()
        etcd.close()


def test_only_ref_moves_and_worktree_edits_count_as_checkout_changes(tmp_path: Path) -> None:
    git_dir = tmp_path / "ops" / ".git"
    watch = daemon.CheckoutWatch(tmp_path / "ops", git_dir, worktree=False)
    for rel in ("HEAD", "refs/heads/main", "refs/remotes/origin/main", "packed-refs", "logs/HEAD"):
        assert watch.relevant(f"{git_dir}/{rel}"), rel
    for rel in ("index", "objects/ab/cdef", "gleam-reconcile-manifests.cache", "FETCH_HEAD"):
        assert not watch.relevant(f"{git_dir}/{rel}"), rel
    assert not watch.relevant(f"{tmp_path}/ops/tasks/nodes/a.yaml")
    on_disk = daemon.CheckoutWatch(tmp_path / "ops", git_dir, worktree=True)
    assert on_disk.relevant(f"{tmp_path}/ops/tasks/nodes/a.yaml")


def test_with_worktree_the_daemon_applies_files_as_they_are_saved(
    etcd: Any, layout: keys.Layout, repo: OpsRepo, running: list[Running]
) -> None:
    d = Running(etcd, layout, repo.path, worktree=True)
    running.append(d)
    wait_until(lambda: d.reports, what="the first pass")
    repo.node("web-1", "print", "data:\n  v: saved, not committed\n")
    wait_until(
        lambda: (
            value_of(etcd, layout.node_key("web-1"))
            == b'{"Data":{"v":"saved, not committed"},"Name":"print"}'
        ),
        what="the saved file applied",
    )
    record = records.decode(values(etcd, layout.applied_key)[layout.applied_key])
    assert record.last is not None and record.last.source == "worktree"
