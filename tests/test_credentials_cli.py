"""gleam-reconcile and gleam-client drop etcd credentials from their environment once the
flags are read, as the agent does: a password given as GLEAM_PASSWORD is not readable in
/proc/<pid>/environ while the program works, nor inherited by the git it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gleam import keys, messages
from gleam.embedded import EtcdServer
from tests.reconcile_support import OpsRepo
from tests.support import ROOT, wait_until
from tests.test_agent_faults import enable_auth

LAYOUT = keys.Layout("/gleam")
PASSWORD = "pw-that-must-not-leak"

pytestmark = pytest.mark.usefixtures("no_gleam_environment")


@pytest.fixture
def root(private_etcd: EtcdServer) -> Iterator[Any]:
    """A client logged in as root, on an etcd whose auth is on (password PASSWORD)."""
    client = enable_auth(private_etcd, PASSWORD)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def started(
    module: str, args: Sequence[str], *, log: Path, path: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m module args` with root's credentials in its environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLEAM_")}
    env |= {"GLEAM_USER": "root", "GLEAM_PASSWORD": PASSWORD}
    if path is not None:
        env["PATH"] = path
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def assert_no_credentials(pid: int) -> None:
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert PASSWORD.encode() not in environ
    assert b"GLEAM_PASSWORD=" not in environ and b"GLEAM_USER=" not in environ
    assert b"PATH=" in environ  # the rest is still there


def test_a_reconcile_daemon_holds_no_password_in_its_environment_nor_gives_it_to_git(
    private_etcd: EtcdServer, root: Any, tmp_path: Path
) -> None:
    repo = OpsRepo(tmp_path / "ops")
    repo.node("web-1", "print")
    repo.commit("first")
    # A git that writes down the environment it was given, then runs the real one.
    real_git, wrappers, seen = shutil.which("git"), tmp_path / "bin", tmp_path / "git-environ"
    wrappers.mkdir()
    (wrappers / "git").write_text(f'#!/bin/sh\nenv >> "{seen}"\nexec "{real_git}" "$@"\n')
    (wrappers / "git").chmod(0o755)
    args = ["-etcd", private_etcd.endpoint, "-prefix", LAYOUT.prefix, "--repo", str(repo.path),
            "--interval", "60"]  # fmt: skip
    path = f"{wrappers}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    log = tmp_path / "reconcile.log"
    with started("reconciler.cli", args, log=log, path=path) as daemon:
        key = LAYOUT.node_key("web-1")
        wait_until(lambda: root.get(key)[0], what=f"the daemon's first pass ({log})")
        assert daemon.poll() is None, log.read_text()
        assert_no_credentials(daemon.pid)
    git_environ = seen.read_text()
    assert "PATH=" in git_environ  # the daemon did run git
    assert PASSWORD not in git_environ and "GLEAM_USER=" not in git_environ


def test_gleam_client_waiting_for_results_holds_no_password_in_its_environment(
    private_etcd: EtcdServer, root: Any, tmp_path: Path
) -> None:
    # A registered agent that watches node/web-1: the client waits for its result.
    info = messages.AgentInfo("web-1", "host", 1, [], "1", "2026-11-30T07:00:00Z", "/s")
    root.put(LAYOUT.info_key("web-1"), info.encode())
    target = keys.Target(keys.Kind.NODE, "web-1")
    key = LAYOUT.task_key(target)
    args = ["-etcd", private_etcd.endpoint, "-prefix", LAYOUT.prefix, "-target", "node/web-1",
            "-fn", "print", "-wait", "120"]  # fmt: skip
    log = tmp_path / "client.log"
    with started("gleam.cli", args, log=log) as client:
        written = wait_until(lambda: root.get(key)[1], what=f"the task written ({log})")
        assert client.poll() is None, log.read_text()
        assert_no_credentials(client.pid)
        result = messages.Result("web-1", key, int(written.mod_revision), "print", ok=True)
        root.put(LAYOUT.result_key("web-1", target), result.encode())
        assert client.wait(timeout=60) == 0, log.read_text()
