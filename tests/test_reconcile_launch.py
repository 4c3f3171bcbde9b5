"""gleam-reconcile's entry point (reconciler.launch): the parse worker it starts before
the imports, and how the process leaves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import opsrepo
from gleam import keys
from reconciler import desired, gitsource, launch, manifests, parsecache, parseworker

SIZE = 2100  # just over the parse worker's threshold


def _checkout(
    path: Path,
    *,
    index_bytes: int,
    cache: bool = False,
    manifest: str | None = "tasks/nodes/a.yaml",
) -> Path:
    """A directory that looks like a checkout to launch: a .git with an index of
    `index_bytes` bytes (launch looks at its size only), maybe a parse cache, and a
    manifest in the work tree (launch looks for one)."""
    (path / ".git").mkdir(parents=True)
    (path / ".git" / "index").write_bytes(b"\0" * index_bytes)
    if cache:
        (path / ".git" / launch.CACHE_FILE).write_bytes(b"")
    if manifest is not None:
        (path / manifest).parent.mkdir(parents=True)
        (path / manifest).write_bytes(b"name: print\n")
    return path


BIG = launch.MIN_FILES * launch.INDEX_BYTES_PER_FILE


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "usable_cpus", lambda: 2)


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize(
    "argv",
    [
        ["--once", "--repo", "{repo}"],
        ["-once", "-repo", "{repo}"],
        ["--repo={repo}", "--dry-run"],
        ["-repo={repo}", "-dry_run", "--prune"],
        ["--repo", "elsewhere", "--once", "--repo", "{repo}"],  # the last one counts
    ],
)
def test_a_pass_over_a_big_uncached_checkout_gets_a_worker_before_the_imports(
    tmp_path: Path, argv: list[str]
) -> None:
    repo = str(_checkout(tmp_path / "ops", index_bytes=BIG))
    assert launch.prestart_checkout([a.format(repo=repo) for a in argv], {}) == repo


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize("argv", [["--once", "--repo="], ["--once", "--repo", ""]])
def test_an_empty_repo_is_the_working_directory_as_the_cli_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.chdir(_checkout(tmp_path / "ops", index_bytes=BIG))
    assert launch.prestart_checkout(argv, {}) == "."  # not "", which the worker refuses


@pytest.mark.usefixtures("two_cpus")
def test_the_checkout_may_come_from_the_environment(tmp_path: Path) -> None:
    repo = str(_checkout(tmp_path / "ops", index_bytes=BIG))
    assert launch.prestart_checkout(["--once"], {"GLEAM_REPO": repo}) == repo


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize(
    "argv",
    [
        ["--repo", "{repo}"],  # the daemon: its first pass may pull, or be incremental
        ["--once", "--repo", "{repo}", "--worktree"],
        ["--once", "--repo", "{repo}", "-config", "x.yaml"],  # may name another repo
        ["--once", "--repo", "{repo}", "--help"],
        ["--once", "--repo", "{repo}/missing"],
        ["--once", "--repo"],  # no value: argparse will say so
    ],
)
def test_other_command_lines_get_none(tmp_path: Path, argv: list[str]) -> None:
    repo = str(_checkout(tmp_path / "ops", index_bytes=BIG))
    assert launch.prestart_checkout([a.format(repo=repo) for a in argv], {}) is None


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize("environ", [{"GLEAM_WORKTREE": "1"}, {"GLEAM_CONFIG": "x.yaml"}])
def test_worktree_or_config_from_the_environment_get_none(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    """A worker would parse HEAD for a pass that reads the work tree, or another
    repository named in the config file (and be dropped with a warning)."""
    repo = str(_checkout(tmp_path / "ops", index_bytes=BIG))
    assert launch.prestart_checkout(["--once", "--repo", repo], {}) == repo
    assert launch.prestart_checkout(["--once", "--repo", repo], environ) is None


@pytest.mark.usefixtures("two_cpus")
def test_a_small_or_cached_checkout_gets_none_unless_the_cache_is_off(tmp_path: Path) -> None:
    small = str(_checkout(tmp_path / "small", index_bytes=BIG - 1))
    cached = str(_checkout(tmp_path / "cached", index_bytes=BIG, cache=True))
    assert launch.prestart_checkout(["--once", "--repo", small], {}) is None
    assert launch.prestart_checkout(["--once", "--repo", cached], {}) is None
    assert launch.prestart_checkout(["--once", "--repo", cached, "--no-cache"], {}) == cached


@pytest.mark.usefixtures("two_cpus")
def test_a_repo_path_the_system_refuses_gets_none_and_no_traceback(tmp_path: Path) -> None:
    long = str(tmp_path / ("x" * 5000))  # ENAMETOOLONG from every stat
    assert launch.prestart_checkout(["--once", "--repo", long], {}) is None
    assert launch.prestart_checkout(["--once"], {"GLEAM_REPO": long}) is None
    assert not launch.likely_full_parse(Path(long) / ".git", cache=True)


def test_the_worker_gets_no_gleam_variable_and_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It may start before the flags are read (the credentials still in the
    environment), from inside the ops checkout (a `json.py` there is anyone's code)."""
    monkeypatch.setenv("GLEAM_PASSWORD", "secret")
    monkeypatch.setenv("GLEAM_USER", "root")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "json.py").write_text("raise SystemExit('imported from the working directory')\n")
    show = "import json, os, sys; print(sorted(k for k in os.environ if k.startswith('GLEAM')))"
    command = launch.worker_command()
    child = launch.spawn_worker([*command[:-2], "-c", show])  # the same flags, this code
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.decode().strip() == "[]"
    assert command[1:] == ["-P", "-m", "reconciler.parseworker"]


def test_one_cpu_gets_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "usable_cpus", lambda: 1)
    repo = str(_checkout(tmp_path / "ops", index_bytes=BIG))
    assert launch.prestart_checkout(["--once", "--repo", repo], {}) is None


def test_the_cache_file_is_the_parse_caches() -> None:
    assert parsecache.path_for(Path("/g")) == Path("/g") / launch.CACHE_FILE


def test_the_manifest_places_are_the_manifest_modules() -> None:
    assert launch.EXTENSIONS == manifests.EXTENSIONS
    dirs = tuple(f"{manifests.TASKS_DIR}/{kind}" for kind in manifests.KIND_DIRS)
    assert dirs == launch.MANIFEST_DIRS


def _no_manifests(path: Path, shape: str) -> Path:
    """A big checkout with no manifest in its work tree, in one of several shapes."""
    repo = _checkout(path, index_bytes=BIG * 10, manifest=None)
    if shape == "tasks is a file":
        (repo / "tasks").write_bytes(b"")
    elif shape == "tasks is a FIFO":
        os.mkfifo(repo / "tasks")
    elif shape != "no tasks":
        (repo / "tasks" / "nodes").mkdir(parents=True)
        (repo / "tasks" / "regions").mkdir()
        if shape == "only other files":
            (repo / "tasks" / "nodes" / "README.md").write_bytes(b"")
            (repo / "tasks" / "regions" / ".keep").write_bytes(b"")
            os.symlink("loop", repo / "tasks" / "regions" / "loop")
    return repo


NO_MANIFEST_SHAPES = [
    "no tasks", "empty tasks", "only other files", "tasks is a file", "tasks is a FIFO"
]  # fmt: skip


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize("shape", NO_MANIFEST_SHAPES)
def test_a_big_checkout_without_manifests_gets_no_worker(tmp_path: Path, shape: str) -> None:
    """A large index, but nothing for a worker to parse: no process started for it."""
    repo = str(_no_manifests(tmp_path / "ops", shape))
    assert launch.prestart_checkout(["--once", "--repo", repo], {}) is None


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize("where", ["tasks/nodes/web-1.yaml", "tasks/regions/eu.yml"])
def test_one_manifest_anywhere_is_enough_to_prestart(tmp_path: Path, where: str) -> None:
    repo = str(_checkout(tmp_path / "ops", index_bytes=BIG, manifest=where))
    assert launch.prestart_checkout(["--once", "--repo", repo], {}) == repo


def test_the_look_for_a_manifest_stops_after_enough_other_files(tmp_path: Path) -> None:
    nodes = tmp_path / "tasks" / "nodes"
    nodes.mkdir(parents=True)
    for n in range(launch.MIN_FILES):
        (nodes / f"notes-{n}.txt").write_bytes(b"")
    assert not launch.has_manifests(tmp_path)
    (nodes / "one-more.txt").write_bytes(b"")
    assert launch.has_manifests(tmp_path)  # without reading on through every entry


def test_a_pass_in_a_big_repository_without_manifests_starts_no_worker_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass's own early worker (no prestarted one: gleam-reconcile run another way)
    makes the same check."""
    repo = tmp_path / "monorepo"
    (repo / "src").mkdir(parents=True)
    for n in range(launch.MIN_FILES + 100):
        (repo / "src" / f"module_{n:05}.py").write_bytes(b"")
    opsrepo.git(repo, "init", "--quiet")
    opsrepo.git(repo, "add", "--all")
    monkeypatch.setattr(parseworker, "usable_cpus", lambda: 2)
    started: list[object] = []
    monkeypatch.setattr(parseworker.Worker, "start", lambda *a: started.append(a))
    source = gitsource.Source(repo)
    assert launch.likely_full_parse(source.git_dir, cache=True)  # a big index
    assert desired.early_worker(source, cache=True) is None and not started
    (repo / "tasks" / "nodes").mkdir(parents=True)
    (repo / "tasks" / "nodes" / "web-1.yaml").write_bytes(b"name: print\n")
    desired.early_worker(source, cache=True)
    assert len(started) == 1


# Leaving -------------------------------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_leaving_loses_no_output_and_keeps_the_status() -> None:
    done = _run(
        """
        import logging, sys
        from reconciler import launch
        logging.basicConfig(stream=sys.stderr)
        print("x" * 200000, end="")
        logging.getLogger("t").warning("last words")
        launch.leave(3)
        """
    )
    assert done.returncode == 3
    assert done.stdout == "x" * 200000
    assert "last words" in done.stderr


def test_leaving_waits_for_a_thread_that_is_not_a_daemon() -> None:
    done = _run(
        """
        import threading
        from reconciler import launch
        go = threading.Event()
        def late():
            go.wait(10)
            print("the thread finished", flush=True)
        threading.Thread(target=late).start()
        threading.Timer(0.2, go.set).start()
        launch.leave(4)
        """
    )
    assert done.returncode == 4
    assert "the thread finished" in done.stdout


# End to end ----------------------------------------------------------------------------


def test_gleam_reconcile_parses_with_the_worker_it_started_first(
    tmp_path: Path, etcd_server: object, layout: keys.Layout
) -> None:
    ops = tmp_path / "ops"
    opsrepo.generate(ops, size=SIZE)
    log = tmp_path / "reconcile.log"
    argv = [
        sys.executable, "-m", "reconciler.launch", "--repo", str(ops), "--once",
        "-etcd", etcd_server.endpoint, "-prefix", layout.prefix,  # type: ignore[attr-defined]
        "-log", str(log), "-log_level", "debug",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{SIZE} created" in done.stdout.splitlines()[-1]
    text = log.read_text()
    assert "parsing with the worker started before the imports" in text
    assert "stopped helping" not in text
    shares = re.search(r"parsed (\d+) blobs here and (\d+) in the parse worker", text)
    assert shares is not None and int(shares[2]) > 0
