"""Helpers for the reconciler's tests: a real git ops repository in a temp dir, and
running gleam-reconcile's main() in-process."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gleam import keys
from reconciler import cli


class OpsRepo:
    """A git repository with a tasks/ tree, committed with the git CLI."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.name", "Gleam Test")
        self.git("config", "user.email", "test@gleam.invalid")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str) -> str:
        proc = subprocess.run(
            ["git", *args], cwd=self.path, capture_output=True, text=True, check=True
        )
        return proc.stdout.strip()

    def write(self, rel: str, text: str) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")

    def node(self, name: str, function: str = "print", data: str = "") -> None:
        self.write(f"tasks/nodes/{name}.yaml", f"name: {function}\n{data}")

    def region(self, name: str, function: str = "print", data: str = "") -> None:
        self.write(f"tasks/regions/{name}.yaml", f"name: {function}\n{data}")

    def remove(self, rel: str) -> None:
        self.git("rm", "-q", rel)

    def commit(self, message: str = "change") -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")


def first_commit(path: Path, data: str) -> OpsRepo:
    """A repository whose first commit holds node web-1 with `data` (YAML lines)."""
    repo = OpsRepo(path)
    repo.node("web-1", "print", data)
    repo.commit("first")
    return repo


def run_cli(
    capsys: pytest.CaptureFixture[str],
    endpoint: str,
    layout: keys.Layout,
    repo: OpsRepo | Path,
    *args: str,
    once: bool = True,
) -> tuple[int, str, str]:
    """gleam-reconcile's main() in this process: (exit code, stdout, stderr)."""
    path = repo.path if isinstance(repo, OpsRepo) else repo
    argv = ["-etcd", endpoint, "-prefix", layout.prefix, "--repo", str(path)]
    argv += ["--once"] if once else []
    # main() points the root logger at this test's captured stderr; put it back after,
    # so later tests do not log into a closed stream.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = cli.main([*argv, *args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def values(etcd: Any, prefix: str) -> dict[str, bytes]:
    return {m.key.decode(): v for v, m in etcd.get_prefix(prefix)}


def revisions(etcd: Any, prefix: str) -> dict[str, int]:
    return {m.key.decode(): int(m.mod_revision) for _v, m in etcd.get_prefix(prefix)}
