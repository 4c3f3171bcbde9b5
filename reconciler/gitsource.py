"""The one module that talks to git (through GitPython): the manifests of a commit, the
paths changed between two commits, ancestry, and fetch plus fast-forward for `--pull`;
and the one that reads a work tree's manifests from disk (`--worktree`).

Reading 10,000 manifests takes two git processes, not 10,000: one `git ls-tree -r` lists
the blobs under tasks/, and one `git cat-file --batch` is fed every blob id at once and
streams all their contents back. A pass after a change lists only the changed paths
(`git diff --raw`) and reads those the same way.

Exact plumbing, because the repository is input from whoever can open a pull request:
every listing is NUL-separated (`-z`), blobs are asked for by object id only (never by a
path typed into a batch command, where a newline in a file name once shifted the
replies and published one file's contents under another's name), and each reply's
object id is checked against the one asked for. A path that is not valid UTF-8 or holds
a control character, a symbolic link (mode 120000) or a submodule under tasks/ is
reported as a manifest error naming it; nothing is read from it. Contents are read up to
manifests.MAX_FILE_BYTES + 1 bytes, so an oversized file is refused without holding it.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
import subprocess
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from reconciler import manifests

TASKS = manifests.TASKS_DIR
# More paths than this in one incremental pass: list the whole tree instead of passing
# them all on one command line.
MAX_LISTED_PATHS = 2000
# What is kept of a file: one byte more than a manifest may have, so that parse() sees
# it is too large without anyone holding the rest.
READ_LIMIT = manifests.MAX_FILE_BYTES + 1

# A git object id: SHA-1 or SHA-256, as git prints it.
OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# A `git ls-tree` entry for a regular file (not a link, a submodule or a tree).
_REGULAR_BLOB = re.compile(rb"(?:100644|100755) blob ([0-9a-f]{40}|[0-9a-f]{64})\t(.+)", re.DOTALL)
MODE_SYMLINK = "120000"
MODE_SUBMODULE = "160000"


class GitError(Exception):
    """git could not do what was asked; the text says what and where."""


@dataclass(frozen=True)
class WorktreeFiles:
    """Manifest files read from the work tree, and the paths refused while listing them."""

    files: tuple[tuple[str, bytes], ...]
    problems: tuple[manifests.ManifestError, ...] = ()


@dataclass(frozen=True)
class Listing:
    """Part of a commit's tasks/ tree: the tree id of tasks/, the manifest files as
    (path, blob id), and the entries refused (bad names, symbolic links, submodules)."""

    tree: str | None
    blobs: tuple[tuple[str, str], ...]
    problems: tuple[manifests.ManifestError, ...] = ()


class ChangedPath(NamedTuple):
    """A path under tasks/ that differs between two commits: status A, M or D."""

    status: str
    path: str


@dataclass(frozen=True)
class Changes:
    paths: tuple[ChangedPath, ...]
    problems: tuple[manifests.ManifestError, ...] = field(default=())


def entry_problem(raw_path: bytes, mode: str) -> str | manifests.ManifestError:
    """A tree entry's path as text, or the error that refuses it: a name that is not
    UTF-8 or holds a control character, a symbolic link or a submodule. Pure."""
    path = manifests.decode_path(raw_path)
    if isinstance(path, manifests.ManifestError):
        return path
    if mode == MODE_SYMLINK:
        return manifests.ManifestError(
            path,
            None,
            "is a symbolic link (git mode 120000); tasks/ may hold regular files only; not read",
        )
    if mode == MODE_SUBMODULE:
        return manifests.ManifestError(
            path, None, "is a git submodule; tasks/ may hold regular files only; not read"
        )
    return path


def parse_tree(listing: bytes) -> Listing:
    """`git ls-tree -r -t -z` output under tasks/ as a Listing. Pure."""
    tree: str | None = None
    blobs: list[tuple[str, str]] = []
    problems: list[manifests.ManifestError] = []
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        regular = _REGULAR_BLOB.fullmatch(entry)
        if regular is not None:
            # The common case in one match; the same outcome as the general one below.
            path = manifests.decode_path(regular[2])
            if isinstance(path, manifests.ManifestError):
                problems.append(path)
            elif manifests.classify(path) is not None:
                blobs.append((path, regular[1].decode("ascii")))
            continue
        meta, tab, raw_path = entry.partition(b"\t")
        fields = meta.decode("ascii", "replace").split(" ")
        if not tab or len(fields) != 3 or not OID.fullmatch(fields[2]):
            raise GitError(f"unexpected git ls-tree output: {manifests.display_path(entry[:200])}")
        mode, kind, oid = fields
        if kind == "tree":
            if raw_path == TASKS.encode():
                tree = oid
            continue
        path = entry_problem(raw_path, mode)
        if isinstance(path, manifests.ManifestError):
            problems.append(path)
        elif kind != "blob":
            problems.append(manifests.ManifestError(path, None, f"is a git {kind}; not read"))
        elif manifests.classify(path) is not None:
            blobs.append((path, oid))
    return Listing(tree=tree, blobs=tuple(blobs), problems=tuple(problems))


def parse_diff(raw: bytes) -> Changes:
    """`git diff --raw -z --no-renames` output as changed paths; a path present after
    the change (added, modified, type changed) with a refused name or mode is a problem
    instead. Pure."""
    parts = raw.split(b"\0")
    paths: list[ChangedPath] = []
    problems: list[manifests.ManifestError] = []
    for meta, raw_path in zip(parts[0::2], parts[1::2], strict=False):
        if not meta:
            continue
        fields = meta.decode("ascii", "replace").split(" ")
        if len(fields) != 5 or not fields[0].startswith(":") or not fields[4]:
            raise GitError(f"unexpected git diff output: {manifests.display_path(meta[:200])}")
        letter = fields[4][0]
        if letter == "D":
            path = manifests.decode_path(raw_path)
            if isinstance(path, str):
                paths.append(ChangedPath("D", path))
            continue
        checked = entry_problem(raw_path, fields[1])
        if isinstance(checked, manifests.ManifestError):
            problems.append(checked)
            continue
        paths.append(ChangedPath("M" if letter == "T" else letter, checked))
    return Changes(paths=tuple(paths), problems=tuple(problems))


def _git_env() -> dict[str, str]:
    """The environment for git: this process's as it is now (the CLI drops credentials
    from it once parsed), with git's messages in English, as GitPython has them."""
    return {**os.environ, "LANGUAGE": "C", "LC_ALL": "C"}


def _work_tree_top(path: str) -> Path | None:
    """The git directory of `path` when it is the top of a git work tree, else None
    (no such directory, not a repository, a subdirectory, a bare repository: cases
    that Source leaves to GitPython, which tells them apart as before)."""
    if not os.path.isdir(path):
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--is-inside-work-tree", "--show-prefix", "--absolute-git-dir"],
            cwd=path,
            env=_git_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    except OSError:
        return None
    lines = done.stdout.decode("utf-8", "surrogateescape").split("\n")
    if done.returncode != 0 or len(lines) != 4 or lines[:2] != ["true", ""] or lines[3]:
        return None
    return Path(lines[2])


def _git() -> Any:
    import git  # GitPython: imported on first use, so `--worktree` runs never pay for it

    return git


class Source:
    """A git checkout that holds an ops tree under tasks/.

    What a plain pass needs (HEAD, listings, blobs) runs git directly; GitPython, slow
    to import, is loaded only for the rest (describing and comparing commits, --pull),
    or to open a checkout that is not simply the top of a work tree."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        given = os.fspath(path)
        found = _work_tree_top(given)
        if found is not None:
            self.path, self._git_dir = Path(os.path.abspath(given)), found
            return
        git = _git()
        try:
            self.repo = git.Repo(path)
        except git.exc.NoSuchPathError:
            raise GitError(f"--repo {given!r}: no such directory") from None
        except git.exc.InvalidGitRepositoryError:
            raise GitError(f"--repo {given!r} is not a git repository") from None
        self.path = Path(self.repo.working_tree_dir or given)
        self._git_dir = Path(self.repo.git_dir)

    @functools.cached_property
    def repo(self) -> Any:
        """The GitPython repository (opened on first use)."""
        return _git().Repo(self.path)

    # Commits -------------------------------------------------------------------------
    def head(self) -> str:
        """HEAD's commit id."""
        found = self._git("rev-parse", "--verify", "--quiet", "HEAD^{commit}")
        oid = found.stdout.decode("ascii", "replace").strip()
        if found.returncode != 0 or not OID.fullmatch(oid):
            raise GitError(f"{self.path}: HEAD has no commit yet")
        return oid

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
        # merge-base exits 0 for "yes", 1 for "no", and 128 for an unknown commit: the
        # recorded one was never fetched here. Both are hex ids (records.decode checks
        # the recorded one), so neither can be taken for an option.
        done = self._git("merge-base", "--is-ancestor", ancestor, commit)
        if done.returncode in (0, 1):
            return done.returncode == 0
        raise GitError(
            f"commit {ancestor[:12]} is not in {self.path} (a shallow clone? fetch more "
            "history, e.g. fetch-depth: 0)"
        )

    # Reading ---------------------------------------------------------------------------
    def list_tree(self, commit: str) -> Listing:
        """Every entry under tasks/ at `commit`, from one `git ls-tree`."""
        return parse_tree(self._run("ls-tree", "-r", "-t", "-z", commit, "--", TASKS))

    def list_paths(self, commit: str, paths: Iterable[str]) -> Listing:
        """The named files (those that exist) at `commit`, and the tree id of tasks/."""
        wanted = list(dict.fromkeys(paths))
        if not wanted:
            return parse_tree(self._run("ls-tree", "-z", commit, "--", TASKS))
        if len(wanted) > MAX_LISTED_PATHS:
            full = self.list_tree(commit)
            keep = set(wanted)
            return Listing(
                tree=full.tree,
                blobs=tuple((p, oid) for p, oid in full.blobs if p in keep),
                problems=tuple(e for e in full.problems if e.path in keep),
            )
        # The paths are built from validated names; --literal-pathspecs makes sure that
        # git matches them as they are all the same.
        return parse_tree(
            self._run("--literal-pathspecs", "ls-tree", "-r", "-t", "-z", commit, "--", *wanted)
        )

    def read_blobs(self, blobs: Iterable[tuple[str, str]]) -> Iterator[tuple[list[str], bytes]]:
        """(paths, contents) for each blob of (path, blob id) pairs, with every path that
        holds it, from one `git cat-file --batch`, as they stream in, in blob_order's
        order: a blob's bytes are held only until the caller moves on. Contents are cut
        at READ_LIMIT bytes."""
        order = blob_order(blobs)
        contents = cat_blobs(self.path, [oid for oid, _paths in order])
        for (_oid, paths), (_same, data) in zip(order, contents, strict=True):
            yield paths, data

    @property
    def git_dir(self) -> Path:
        return self._git_dir

    def changed(self, old: str, new: str) -> Changes:
        """Paths under tasks/ that differ between two commits (renames as delete + add).
        `tasks` itself is in the pathspec, so that tasks/ turned into a symbolic link is
        seen too."""
        return parse_diff(
            self._run("diff", "--raw", "-z", "--no-renames", "--no-abbrev", old, new, "--", TASKS)
        )

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
        command = next(a for a in args if not a.startswith("-"))
        done = self._git(*args)
        if done.returncode != 0:
            # Worded as GitPython's errors were.
            stderr = done.stderr.decode("utf-8", "replace").rstrip("\n")
            detail = f"stderr: '{stderr}'" if stderr else f"exit code {done.returncode}"
            raise GitError(f"git {command} failed in {self.path}: {detail.strip()[:300]}")
        return done.stdout

    def _git(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(
                ["git", *args],
                cwd=self.path,
                env=_git_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        except OSError as exc:
            raise GitError(f"cannot run git in {self.path}: {exc}") from None


def blob_order(blobs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(blob id, its paths) for (path, blob id) pairs: each blob once, in the order of
    its first path, with every path that holds it. Pure."""
    by_oid: dict[str, list[str]] = {}
    for path, oid in blobs:
        by_oid.setdefault(oid, []).append(path)
    return list(by_oid.items())


def cat_blobs(checkout: Path, oids: list[str]) -> Generator[tuple[str, bytes], None, None]:
    """(blob id, contents cut at READ_LIMIT) for each id, in order, from one `git
    cat-file --batch` run in `checkout`. Every reply's header must name the id asked
    for, as a blob. Closing the iterator early stops git."""
    if not oids:
        return
    for oid in oids:
        if not OID.fullmatch(oid):
            raise GitError(f"not a git object id: {oid[:80]!r}")
    try:
        popen = subprocess.Popen(
            ["git", "cat-file", "--batch"],
            cwd=checkout,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError as exc:
        raise GitError(f"cannot run git cat-file in {checkout}: {exc}") from None
    assert popen.stdin is not None and popen.stdout is not None
    # A thread feeds the ids while this one reads, so neither pipe can fill up and
    # stall the other.
    feeder = threading.Thread(
        target=_feed, args=(popen.stdin, oids), name="git-cat-file-feed", daemon=True
    )
    feeder.start()
    try:
        for oid in oids:
            yield oid, read_reply(popen.stdout, oid, where=checkout)
    finally:
        # git first: a reader that stopped early leaves git blocked on a full pipe,
        # and the feeder blocked behind it.
        if popen.poll() is None:
            popen.kill()
        popen.stdout.close()
        popen.wait()
        feeder.join(timeout=5)


def read_reply(out: IO[bytes], oid: str, *, where: Path) -> bytes:
    """One `git cat-file --batch` reply for `oid`: its contents cut at READ_LIMIT."""
    header = out.readline()
    fields = header.rstrip(b"\n").decode("ascii", "replace").split(" ")
    if not header.endswith(b"\n"):
        raise GitError(f"git cat-file stopped before answering for {oid} in {where}")
    if fields[-1] == "missing" and fields[0] == oid:
        raise GitError(f"object {oid} is missing from {where}")
    if len(fields) != 3 or fields[0] != oid or fields[1] != "blob" or not fields[2].isdigit():
        raise GitError(
            f"git cat-file answered {manifests.display_path(header[:120])!r} when asked "
            f"for blob {oid} in {where}; refusing to read on"
        )
    size = int(fields[2])
    contents = _read_exactly(out, min(size, READ_LIMIT))
    _skip(out, size - len(contents))
    if out.read(1) != b"\n":
        raise GitError(f"git cat-file's reply for {oid} in {where} is cut short")
    return contents


def _feed(stdin: IO[bytes], oids: list[str]) -> None:
    try:
        stdin.write("".join(f"{oid}\n" for oid in oids).encode("ascii"))
        stdin.close()
    except OSError:
        pass  # git exited early; the reader reports what is missing


def _read_exactly(out: IO[bytes], size: int) -> bytes:
    data = out.read(size)
    if len(data) != size:
        raise GitError("git cat-file's output ended in the middle of an object")
    return data


def _skip(out: IO[bytes], size: int) -> None:
    while size > 0:
        chunk = out.read(min(size, 1 << 20))
        if not chunk:
            raise GitError("git cat-file's output ended in the middle of an object")
        size -= len(chunk)


def read_worktree(root: str | os.PathLike[str]) -> WorktreeFiles:
    """The manifest files under tasks/ as they are on disk (for `--worktree`).

    Only regular files are read: a symbolic link (which could point outside the
    repository, or at /dev/zero), a FIFO (which would block), a device or a socket
    anywhere under tasks/ is a problem naming it, and so is tasks/ itself being one.
    Directories whose name starts with a dot are skipped, as before."""
    base = Path(root)
    files: list[tuple[str, bytes]] = []
    problems: list[manifests.ManifestError] = []
    try:
        top = os.lstat(base / TASKS)
    except FileNotFoundError:
        return WorktreeFiles(files=())
    except OSError as exc:
        raise GitError(f"cannot read {TASKS}: {exc.strerror}") from None
    if not stat.S_ISDIR(top.st_mode):
        problems.append(
            manifests.ManifestError(TASKS, None, f"is {_kind(top.st_mode)}, not a directory")
        )
        return WorktreeFiles(files=(), problems=tuple(problems))
    pending = [os.fsencode(TASKS)]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(os.path.join(os.fsencode(base), rel_dir)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise GitError(
                f"cannot read {manifests.display_path(rel_dir)}: {exc.strerror}"
            ) from None
        subdirs = []
        for entry in entries:
            raw = rel_dir + b"/" + entry.name
            path = manifests.decode_path(raw)
            if entry.is_dir(follow_symlinks=False):
                if not entry.name.startswith(b"."):
                    subdirs.append(raw)
                continue
            if isinstance(path, manifests.ManifestError):
                problems.append(path)
                continue
            mode = entry.stat(follow_symlinks=False).st_mode
            if not stat.S_ISREG(mode):
                problems.append(_not_regular(path, mode))
                continue
            if manifests.classify(path) is None:
                continue
            contents = _read_regular(os.path.join(os.fsencode(base), raw), path)
            if isinstance(contents, manifests.ManifestError):
                problems.append(contents)
            else:
                files.append((path, contents))
        pending.extend(reversed(subdirs))
    files.sort()
    return WorktreeFiles(files=tuple(files), problems=tuple(problems))


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def _not_regular(path: str, mode: int) -> manifests.ManifestError:
    return manifests.ManifestError(
        path, None, f"is {_kind(mode)}; tasks/ may hold regular files only; not read"
    )


def _read_regular(full: bytes, path: str) -> bytes | manifests.ManifestError:
    """A regular file's first READ_LIMIT bytes. Opened without following a link and
    without blocking, then checked again on the open file: what was checked with lstat
    may have been swapped for something else since."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(full, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _not_regular(path, stat.S_IFLNK)
        return manifests.ManifestError(path, None, f"cannot be read: {exc.strerror}")
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return _not_regular(path, mode)
        chunks: list[bytes] = []
        left = READ_LIMIT
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        return manifests.ManifestError(path, None, f"cannot be read: {exc.strerror}")
    finally:
        os.close(fd)
