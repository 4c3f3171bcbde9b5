"""gleam-reconcile -verify_commits: only a HEAD signed by an allowed SSH signer is applied
(commits signed through git with ssh-keygen-made keys; real etcd)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gleam import keys
from gleam.embedded import EtcdServer
from reconciler import commitsig
from tests.reconcile_support import OpsRepo, run_cli, values
from tests.support import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="no ssh-keygen on this machine (openssh-client)"
)


def ssh_key(directory: Path, name: str) -> Path:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
                   check=True, timeout=30)  # fmt: skip
    return path


def signed_commit(repo: OpsRepo, key: Path | None, message: str) -> str:
    repo.git("add", "-A")
    sign = (
        ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-S"]
        if key
        else ["commit"]
    )
    repo.git(*sign, "-q", "--allow-empty", "-m", message)
    return repo.head()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[OpsRepo, Path, Path, Path]:
    good, stranger = ssh_key(tmp_path, "ops"), ssh_key(tmp_path, "stranger")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"test@gleam.invalid {Path(f'{good}.pub').read_text()}")
    repo = OpsRepo(tmp_path / "ops-repo")
    repo.node("web-1", "print", "data:\n  n: 1\n")
    return repo, good, stranger, allowed


def test_unsigned_and_wrongly_signed_heads_are_refused_and_a_good_one_applied(
    capsys: Any,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    setup: tuple[OpsRepo, Path, Path, Path],
) -> None:
    repo, good, stranger, allowed = setup
    flag = ("-verify_commits", str(allowed))

    unsigned = signed_commit(repo, None, "unsigned")
    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, *flag)
    assert code == 1
    assert f"commit {unsigned[:12]} refused by -verify_commits: it is not signed" in err
    assert values(etcd, layout.prefix + "/") == {}

    wrong = signed_commit(repo, stranger, "signed by a stranger")
    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, *flag)
    assert code == 1
    assert f"commit {wrong[:12]} refused by -verify_commits: its signer is not in the " in err
    assert "nothing was written" in err
    assert values(etcd, layout.prefix + "/") == {}

    signed_commit(repo, good, "signed by ops")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, *flag)
    assert code == 0, err
    assert layout.node_key("web-1") in values(etcd, layout.prefix + "/")

    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, *flag, "--worktree")
    assert code == 1 and "does not go with --worktree" in err


def test_the_reason_is_read_from_git_and_a_missing_file_is_named(tmp_path: Path) -> None:
    assert (
        commitsig.reason("") == commitsig.reason("error: no signature found") == "it is not signed"
    )
    assert "not in the allowed signers" in commitsig.reason(
        'Good "git" signature with ED25519 key SHA256:x\nNo principal matched.\n'
    )
    with pytest.raises(commitsig.CommitRefused, match="is not a readable file"):
        commitsig.verify(tmp_path, "HEAD", allowed_signers=tmp_path / "missing")


def test_the_daemon_logs_a_refused_commit_and_applies_the_next_signed_one(
    etcd: Any, layout: keys.Layout, setup: tuple[OpsRepo, Path, Path, Path]
) -> None:
    import threading

    from reconciler import daemon, reconcile, sync

    repo, good, _stranger, allowed = setup
    unsigned = signed_commit(repo, None, "unsigned")
    reports: list[daemon.PassReport] = []
    stop = threading.Event()
    running = daemon.Daemon(
        sync.Store.over(etcd, layout),
        reconcile.Options(repo=repo.path, lock_timeout=60, verify_commits=allowed),
        daemon.LoopSettings(interval=60.0, debounce=0.05, full_every=1000),
        stop=stop,
        on_pass=reports.append,
    )
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: reports, what="the first pass")
        assert reports[0].error is not None
        assert f"commit {unsigned[:12]} refused by -verify_commits" in reports[0].error
        assert values(etcd, layout.prefix + "/") == {}
        signed_commit(repo, good, "signed")
        wait_until(lambda: layout.node_key("web-1") in values(etcd, layout.prefix + "/"),
                   what="the signed commit applied")  # fmt: skip
    finally:
        stop.set()
        thread.join(timeout=30)
