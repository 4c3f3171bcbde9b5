"""The one module that talks to git (through GitPython): the manifests of a commit, the
paths changed between two commits, ancestry, and fetch plus fast-forward for `--pull`.

Reading 10,000 manifests takes two git processes, not 10,000: one `git ls-tree -r` lists
the blobs under tasks/, and one `git cat-file --batch` is fed every blob id at once and
streams all their contents back. Changed files are read the same way, by `<commit>:<path>`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import manifests

TASKS = manifests.TASKS_DIR


class GitError(Exception):
    """git could not do what was asked; the text says what and where."""


@dataclass(frozen=True)
class Snapshot:
    """Manifest files read from one commit (or the work tree, commit None)."""

    commit: str | None
    # The git tree id of tasks/ (None when reading the work tree or tasks/ is missing):
    # a digest of the desired state's source that git computes for free.
    tree: str | None
    files: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class ChangedPath:
    """A path under tasks/ that differs between two commits: status A, M or D."""

    status: str
    path: str


def _git() -> Any:
    import git  # GitPython: imported on first use, so `--worktree` runs never pay for it

    return git


class Source:
    """A git checkout that holds an ops tree under tasks/."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        git = _git()
        try:
            self.repo = git.Repo(path)
        except git.exc.NoSuchPathError:
            raise GitError(f"--repo {os.fspath(path)!r}: no such directory") from None
        except git.exc.InvalidGitRepositoryError:
            raise GitError(f"--repo {os.fspath(path)!r} is not a git repository") from None
        self.path = Path(self.repo.working_tree_dir or os.fspath(path))

    # Commits -------------------------------------------------------------------------
    def head(self) -> str:
        """HEAD's commit id."""
        try:
            return str(self.repo.head.commit.hexsha)
        except ValueError:
            raise GitError(f"{self.path}: HEAD has no commit yet") from None

    def describe(self, commit: str) -> str:
        """`abc1234 (subject)` for messages; just the short id if the commit is unknown."""
        try:
            found = self.repo.commit(commit)
        except (ValueError, _git().exc.BadName, _git().exc.GitCommandError):
            return commit[:12]
        subject = str(found.summary)
        return f"{commit[:12]} ({subject[:60]})" if subject else commit[:12]

    def is_ancestor(self, ancestor: str, commit: str) -> bool:
        """True when `ancestor` is `commit` or one of its ancestors. Raises GitError when
        `ancestor` is not in this repository (a shallow clone, another repository)."""
        try:
            return bool(self.repo.is_ancestor(ancestor, commit))
        except _git().exc.GitCommandError:
            # merge-base exits 1 for "no" (handled by GitPython) and 128 for an unknown
            # commit: the recorded one was never fetched here.
            raise GitError(
                f"commit {ancestor[:12]} is not in {self.path} (a shallow clone? fetch more "
                "history, e.g. fetch-depth: 0)"
            ) from None

    # Reading ---------------------------------------------------------------------------
    def list_tree(self, commit: str) -> tuple[str | None, list[tuple[str, str]]]:
        """(tree id of tasks/, [(path, blob id)] of its manifest files) at `commit`, from
        one `git ls-tree`."""
        listing = self._run("ls-tree", "-r", "-t", "-z", commit, "--", f"{TASKS}/")
        tree: str | None = None
        blobs: list[tuple[str, str]] = []
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, raw_path = entry.partition(b"\t")
            _mode, kind, sha = meta.decode("ascii").split(" ")
            path = raw_path.decode("utf-8", "surrogateescape")
            if kind == "tree" and path == TASKS:
                tree = sha
            elif kind == "blob" and manifests.classify(path) is not None:
                blobs.append((path, sha))
        return tree, blobs

    def read_blobs(self, blob_ids: Iterable[str]) -> dict[str, bytes]:
        """Contents by blob id, from one `git cat-file --batch`."""
        return {spec: entry[1] for spec, entry in self._cat_batch(blob_ids).items()}

    def read_all(self, commit: str) -> Snapshot:
        """Every manifest file under tasks/ at `commit`, in one ls-tree and one cat-file."""
        tree, blobs = self.list_tree(commit)
        contents = self.read_blobs(sha for _, sha in blobs)
        return Snapshot(commit=commit, tree=tree, files=tuple((p, contents[s]) for p, s in blobs))

    @property
    def git_dir(self) -> Path:
        return Path(self.repo.git_dir)

    def read_paths(self, commit: str, paths: Iterable[str]) -> Snapshot:
        """Those of the named files that exist at `commit`, plus the tasks/ tree id."""
        wanted = list(paths)
        specs = [f"{commit}:{TASKS}", *(f"{commit}:{p}" for p in wanted)]
        found = self._cat_batch(specs, allow_missing=True)
        tree_entry = found.get(f"{commit}:{TASKS}")
        files = []
        for path in wanted:
            entry = found.get(f"{commit}:{path}")
            if entry is not None and entry[2] == "blob":
                files.append((path, entry[1]))
        tree = tree_entry[0] if tree_entry is not None else None
        return Snapshot(commit=commit, tree=tree, files=tuple(files))

    def changed(self, old: str, new: str) -> list[ChangedPath]:
        """Paths under tasks/ that differ between two commits (renames as delete + add)."""
        out = self._run("diff", "--name-status", "-z", "--no-renames", old, new, "--", f"{TASKS}/")
        parts = out.split(b"\0")
        changes: list[ChangedPath] = []
        for status, raw_path in zip(parts[0::2], parts[1::2], strict=False):
            if not status:
                continue
            letter = status.decode("ascii")[0]
            changes.append(
                ChangedPath(
                    "M" if letter == "T" else letter, raw_path.decode("utf-8", "surrogateescape")
                )
            )
        return changes

    # --pull ------------------------------------------------------------------------------
    def pull(self) -> tuple[str, str]:
        """Fetch the branch's upstream and fast-forward to it: (old head, new head).
        Raises GitError if there is no upstream or the branch has diverged."""
        git = _git()
        before = self.head()
        try:
            branch = self.repo.active_branch
            tracking = branch.tracking_branch()
            if tracking is None:
                raise GitError(f"{self.path}: branch {branch.name} has no upstream to pull from")
            self.repo.remote(tracking.remote_name).fetch()
            self.repo.git.merge("--ff-only", tracking.name)
        except TypeError:
            raise GitError(f"{self.path}: HEAD is detached; --pull needs a branch") from None
        except git.exc.GitCommandError as exc:
            detail = (exc.stderr or str(exc)).strip().splitlines()
            raise GitError(f"--pull failed in {self.path}: {' '.join(detail)[:300]}") from None
        return before, self.head()

    # Plumbing ---------------------------------------------------------------------------
    def _run(self, *args: str) -> bytes:
        """Run one git command in the checkout; its stdout as bytes, untouched."""
        try:
            out = self.repo.git.execute(
                ["git", *args], stdout_as_string=False, strip_newline_in_stdout=False
            )
        except _git().exc.GitCommandError as exc:
            detail = exc.stderr if isinstance(exc.stderr, str) else str(exc)
            raise GitError(f"git {args[0]} failed in {self.path}: {detail.strip()[:300]}") from None
        assert isinstance(out, bytes)
        return out

    def _cat_batch(
        self, specs: Iterable[str], *, allow_missing: bool = False
    ) -> dict[str, tuple[str, bytes, str]]:
        """(object id, contents, object type) by spec (a blob id or `<commit>:<path>`) from one
        `git cat-file --batch` that is handed every spec at once."""
        unique = list(dict.fromkeys(specs))
        if not unique:
            return {}
        proc = self.repo.git.cat_file("--batch", as_process=True, istream=subprocess.PIPE)
        out, err = proc.proc.communicate("\n".join(unique).encode("utf-8") + b"\n")
        if proc.proc.returncode != 0:
            raise GitError(
                f"git cat-file failed in {self.path}: {err.decode('utf-8', 'replace')[:300]}"
            )
        found: dict[str, tuple[str, bytes, str]] = {}
        pos = 0
        view = memoryview(out)
        for spec in unique:
            eol = out.index(b"\n", pos)
            header = out[pos:eol].decode("utf-8", "surrogateescape")
            pos = eol + 1
            if header.endswith(" missing") or header.endswith(" ambiguous"):
                if allow_missing:
                    continue
                raise GitError(f"{spec} is missing from {self.path}")
            oid, kind, size_text = header.rsplit(" ", 2)
            size = int(size_text)
            found[spec] = (oid, bytes(view[pos : pos + size]), kind)
            pos += size + 1  # contents are followed by a newline
        return found


def read_worktree(root: str | os.PathLike[str]) -> Snapshot:
    """The manifest files under tasks/ as they are on disk (for `--worktree`)."""
    base = Path(root)
    tasks = base / TASKS
    files: list[tuple[str, bytes]] = []
    if tasks.is_dir():
        for dirpath, dirnames, filenames in os.walk(tasks):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                full = Path(dirpath) / name
                rel = full.relative_to(base).as_posix()
                if manifests.classify(rel) is None:
                    continue
                try:
                    files.append((rel, full.read_bytes()))
                except OSError as exc:
                    raise GitError(f"cannot read {rel}: {exc.strerror}") from None
    return Snapshot(commit=None, tree=None, files=tuple(files))
