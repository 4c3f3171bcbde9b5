"""gleam-reconcile's entry point (the console script), and what it decides before it
imports the rest.

A full apply from a fresh clone spends its first 0.15-0.2 s importing gRPC, protobuf
and the etcd client on one core while the other does nothing, and then parses YAML on
both (reconciler.parseworker). So before those imports, when the command line asks for
one pass over a checkout that looks like a big tree with no parse cache (a large git
index, a manifest in its work tree's tasks/), the parse worker is started here and told
to list HEAD itself: it parses while this process imports. The guess costs nothing
when wrong: the worker's first word is a digest of the blobs it listed, and a pass that
reads anything else (another commit, only the changes since the last apply, a work
tree) drops it and parses as it would have.

The decision reads the command line loosely (a flag it does not see only loses the
head start); the real parsing is reconciler.cli's. This module imports nothing heavy.

After the pass the process leaves with os._exit once its output is flushed: the
interpreter's teardown (freeing every module and object, gRPC's shutdown) is 40-60 ms
of work the kernel does for free, and nothing is pending by then (every etcd write of a
pass has been answered, the lock released, the parse cache saved).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

# logging and typing (some 10 ms) are not imported before the worker is started: the
# one is loaded by the time leave() runs, the other is for annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

# Fewer files to parse than this: one process is as fast (a child costs about 0.1 s of
# CPU to start). reconciler.parseworker's threshold.
MIN_FILES = 2000
# A git index holds one entry per file of the checkout: some 60 bytes plus the path.
INDEX_BYTES_PER_FILE = 80
# The parse cache's file in the git directory (reconciler.parsecache).
CACHE_FILE = "gleam-reconcile-manifests.cache"
# Where manifests live, and their extensions (reconciler.manifests: not imported here).
MANIFEST_DIRS = ("tasks/nodes", "tasks/regions")
EXTENSIONS = (".yaml", ".yml")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def likely_full_parse(git_dir: Path, *, cache: bool) -> bool:
    """Whether a full read of this checkout will probably parse enough files for a
    worker: no parse cache to take them from, and a git index large enough."""
    try:
        if cache and (git_dir / CACHE_FILE).exists():
            return False
        index_size = (git_dir / "index").stat().st_size
    except OSError:  # a name too long, a directory that cannot be searched: no guess
        return False
    return index_size >= MIN_FILES * INDEX_BYTES_PER_FILE


def has_manifests(work_tree: Path) -> bool:
    """Whether the work tree holds a manifest: a large index alone may be a repository
    whose files are all elsewhere, with no tasks/ (or an empty one), where a worker
    would be started only to find nothing to parse. Stops at the first one found, the
    first entry in a fleet's tree (counting up to MIN_FILES would tell more, but cost
    about a millisecond on every run); the work tree stands for HEAD, as it does in a
    CI checkout. Looks at MIN_FILES entries at most: past that many other files, there
    is surely something to do (the look stays under a millisecond)."""
    for name in MANIFEST_DIRS:
        try:
            with os.scandir(work_tree / name) as entries:
                for seen, entry in enumerate(entries):
                    if seen >= MIN_FILES or entry.name.endswith(EXTENSIONS):
                        return True
        except OSError:  # no such directory, not one, one that cannot be read
            continue
    return False


def worker_command(*args: str) -> list[str]:
    """`python -m reconciler.parseworker ARGS...` for this interpreter. -P: the working
    directory is not put first on the child's module path (it may well be the ops
    checkout, whose files anyone who can open a pull request writes)."""
    return [sys.executable, "-P", "-m", "reconciler.parseworker", *args]


def spawn_worker(argv: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
    """A child running `argv` (by default worker_command()) with pipes on stdin and
    stdout, this checkout of Gleam on its path, and none of the GLEAM_ variables: it
    needs no setting, and a child started before the flags are parsed would otherwise
    hold the etcd credentials (raises OSError)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {name: value for name, value in os.environ.items() if not name.startswith("GLEAM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        list(argv if argv is not None else worker_command()),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def _spellings(name: str) -> set[str]:
    dashed = name.replace("_", "-")
    return {f"-{name}", f"--{name}", f"-{dashed}", f"--{dashed}"}


ONE_PASS = _spellings("once") | _spellings("dry_run")
NOT_HEAD = _spellings("worktree") | _spellings("config") | {"-h", "--help", "-help"}
NO_CACHE = _spellings("no_cache")
REPO = _spellings("repo")
# The same switches from the environment (reconciler.cli reads GLEAM_<NAME> as well).
NOT_HEAD_ENV = ("GLEAM_WORKTREE", "GLEAM_CONFIG")


def prestart_checkout(argv: Sequence[str], environ: Mapping[str, str]) -> str | None:
    """The checkout to list and parse ahead, when the command line is one pass over
    HEAD (`--once` or `--dry-run`, no `--worktree`, no `-config` file that could name
    another repository, nor either from the environment) of a checkout likely to need a
    parse worker (pure but for the checkout's stat calls)."""
    words = set(argv)
    if not words & ONE_PASS or words & NOT_HEAD or usable_cpus() < 2:
        return None
    if any(environ.get(name) for name in NOT_HEAD_ENV):  # set at all: no guess
        return None
    repo = environ.get("GLEAM_REPO") or "."
    for index, word in enumerate(argv):
        name, equals, value = word.partition("=")
        if name in REPO:
            if equals:
                repo = value
            elif index + 1 < len(argv):
                repo = argv[index + 1]
    repo = repo or "."  # as reconciler.cli reads an empty --repo
    git_dir = Path(repo) / ".git"
    try:
        is_checkout = git_dir.is_dir()
    except OSError:  # cli reports the --repo it cannot use
        return None
    if not is_checkout or not likely_full_parse(git_dir, cache=not words & NO_CACHE):
        return None
    return repo if has_manifests(Path(repo)) else None


def _prestart(argv: Sequence[str]) -> subprocess.Popen[bytes] | None:
    checkout = prestart_checkout(argv, os.environ)
    if checkout is None:
        return None
    try:
        return spawn_worker(worker_command("--list", checkout))
    except OSError:
        return None  # the pass starts its own worker, or parses alone, and says why


def leave(status: int) -> NoReturn:
    """Exit with `status` without the interpreter's teardown, once the output is out;
    with a normal exit if a thread that is not a daemon still runs (it would be waited
    for)."""
    import logging

    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        status = status or 120  # what Python exits with when it cannot flush stdout
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        sys.exit(status)
    os._exit(status)


def main() -> NoReturn:
    argv = sys.argv[1:]
    early = _prestart(argv)
    # The heavy imports, while the worker parses; without the cycle collector, which
    # would sweep the young modules' objects several times over for nothing.
    gc.disable()
    from reconciler import cli, parseworker

    gc.enable()
    with parseworker.offered(early):
        status = cli.main(argv)
    leave(status)


if __name__ == "__main__":
    main()
