"""A hostile or broken ops repository, against real git repositories and a real etcd:
every case is a clear error line naming the file, bounded in time and memory, and
nothing is written (issue 9). The attacker here can open a pull request."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gleam import keys
from gleam.embedded import EtcdServer
from reconciler import daemon, gitsource, manifests, reconcile, records, sync
from tests.reconcile_support import OpsRepo, first_commit, run_cli, values
from tests.support import ROOT

BILLION_LAUGHS = (
    "\n".join(
        [
            "name: print",
            "data:",
            "  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]",
            *(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)),
        ]
    )
    + "\n"
)


def deep_flow(levels: int) -> str:
    return "name: print\ndata: " + "[" * levels + "]" * levels + "\n"


def deep_block(levels: int) -> str:
    lines = ["name: print", "data:"]
    lines += [" " * (2 * (i + 1)) + f"k{i}:" for i in range(levels)]
    return "\n".join(lines) + " 1\n"


def deep_json(levels: int) -> str:
    # JSON is YAML: a manifest written in JSON goes through the same loader.
    return '{"name": "print", "data": ' + "[" * levels + "]" * levels + "}\n"


@pytest.fixture
def repo(tmp_path: Path) -> OpsRepo:
    return first_commit(tmp_path / "ops", "data:\n  msg: hello\n")


def refused_on_every_pass(
    capsys: Any, endpoint: str, layout: keys.Layout, repo: OpsRepo, *needles: str
) -> str:
    """Run an incremental pass, a --dry-run and a --full pass: each exits 1 with every
    needle in its error lines and no traceback. Returns everything they printed."""
    printed = ""
    for extra in ((), ("--dry-run",), ("--full",)):
        code, out, err = run_cli(capsys, endpoint, layout, repo, *extra)
        assert code == 1, (extra, out, err)
        for needle in needles:
            assert needle in err, (extra, err)
        assert "nothing was written" in err and "Traceback" not in out + err
        printed += out + err
    return printed


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str
    seconds: float
    max_rss_mib: float


# Runs a command and writes its peak resident memory (ru_maxrss, KiB on Linux) to a
# file. It runs in a small process of its own: a child forked straight from this test
# process would count this process's (large) memory, copied at fork, as its own peak.
MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_pid, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(endpoint: str, layout: keys.Layout, repo: Path, *args: str) -> Run:
    """gleam-reconcile --once as a real process, with its peak resident memory. Output
    goes to files, so that the child never blocks on a full pipe."""
    argv = [sys.executable, "-m", "reconciler.cli", "-etcd", endpoint, "-prefix", layout.prefix]
    argv += ["--repo", str(repo), "--once", *args]
    out_path, err_path = repo.parent / "out.txt", repo.parent / "err.txt"
    rss_path = repo.parent / "maxrss.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, str(rss_path), *argv],
            cwd=ROOT,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        seconds = time.monotonic() - started
    return Run(
        proc.returncode,
        out_path.read_text(),
        err_path.read_text(),
        seconds,
        int(rss_path.read_text()) / 1024,
    )


def assert_refused(run: Run, *needles: str) -> None:
    assert run.code == 1, (run.out, run.err)
    assert "Traceback" not in run.out + run.err
    for needle in needles:
        assert needle in run.err, run.err
    assert "nothing was written" in run.err


def snapshot(etcd: Any, layout: keys.Layout) -> dict[str, bytes]:
    return values(etcd, layout.prefix + "/")


# Exact git plumbing ------------------------------------------------------------------


def _review_bypass(repo: OpsRepo) -> tuple[str, bytes]:
    """The attack from issue 9: a blob that exists only on a deleted branch, and a commit
    that adds a reviewed, harmless web-2.yaml beside a file whose name holds a newline,
    that blob's id and another newline. Returns (the odd name, the blob id)."""
    repo.git("checkout", "-q", "-b", "unreviewed")
    repo.node("web-2", "t::envdump", "data:\n  all: true\n")
    repo.commit("never reviewed")
    blob = repo.git("rev-parse", "HEAD:tasks/nodes/web-2.yaml")
    repo.git("checkout", "-q", "main")
    repo.git("branch", "-q", "-D", "unreviewed")
    repo.node("web-2", "print", "data:\n  harmless: true\n")
    odd = f"tasks/nodes/z\n{blob}\n.yaml"
    (repo.path / odd).write_text("name: print\n", encoding="utf-8")
    repo.commit("add web-2")
    return odd, blob.encode()


def test_review_bypass_commit_is_refused_on_the_incremental_pass_naming_the_odd_file(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    before = snapshot(etcd, layout)
    odd, blob = _review_bypass(repo)
    shown = odd.replace("\n", "\\n")
    needle = f"{shown}: file name holds a control or invisible character"
    refused_on_every_pass(capsys, etcd_server.endpoint, layout, repo, needle)
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--output", "json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert [e["file"] for e in doc["errors"]] == [shown]
    # Nothing was published: not the harmless web-2, and never the unreviewed blob.
    after = snapshot(etcd, layout)
    assert after == before
    assert not any(b"envdump" in v for v in after.values())
    record = records.decode(after[layout.applied_key])
    assert record.commit == repo.git("rev-parse", "HEAD~1")
    assert blob  # the blob is still in the repository: only the name kept it out


def test_a_file_name_that_is_not_utf8_is_an_error_naming_it_on_both_passes(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    before = snapshot(etcd, layout)
    with open(os.path.join(os.fsencode(repo.path), b"tasks/nodes/\xff.yaml"), "wb") as fh:
        fh.write(b"name: print\n")
    repo.commit("odd bytes")
    needle = "tasks/nodes/\\xff.yaml: file name is not valid UTF-8"
    refused_on_every_pass(capsys, etcd_server.endpoint, layout, repo, needle)
    assert snapshot(etcd, layout) == before


def test_git_symlinks_and_submodules_under_tasks_are_errors_that_say_so(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    before = snapshot(etcd, layout)
    repo.write("secret.yaml", "name: print\ndata: {db_password: hunter2}\n")
    os.symlink("../../secret.yaml", repo.path / "tasks/nodes/web-2.yaml")
    repo.git("add", "-A")
    head = repo.head()
    repo.git("update-index", "--add", "--cacheinfo", f"160000,{head},tasks/nodes/vendored")
    repo.git("commit", "-q", "-m", "link and submodule")
    printed = refused_on_every_pass(
        capsys,
        etcd_server.endpoint,
        layout,
        repo,
        "tasks/nodes/web-2.yaml: is a symbolic link (git mode 120000)",
        "tasks/nodes/vendored: is a git submodule",
    )
    assert "hunter2" not in printed
    assert snapshot(etcd, layout) == before


def test_tasks_itself_as_a_symbolic_link_in_git_is_an_error(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert run_cli(capsys, etcd_server.endpoint, layout, repo)[0] == 0
    repo.git("rm", "-q", "-r", "tasks")
    (repo.path / "elsewhere/nodes").mkdir(parents=True)
    (repo.path / "elsewhere/nodes/web-1.yaml").write_text("name: print\n")
    os.symlink("elsewhere", repo.path / "tasks")
    repo.commit("tasks is a link")
    needle = "tasks: is a symbolic link (git mode 120000)"
    refused_on_every_pass(capsys, etcd_server.endpoint, layout, repo, needle)


def test_a_cat_file_reply_for_another_object_is_refused(repo: OpsRepo) -> None:
    source = gitsource.Source(repo.path)
    asked = "1" * 40
    reply = io.BytesIO(f"{'2' * 40} blob 3\nabc\n".encode())
    with pytest.raises(gitsource.GitError, match="refusing to read on"):
        gitsource.read_reply(reply, asked, where=source.path)
    # The right id reads, and an oversized blob is cut at the read limit, rest skipped.
    size = gitsource.READ_LIMIT + 10
    big = io.BytesIO(f"{asked} blob {size}\n".encode() + b"x" * size + b"\n")
    assert len(gitsource.read_reply(big, asked, where=source.path)) == gitsource.READ_LIMIT
    assert big.read() == b""


# Bounded parsing ---------------------------------------------------------------------


def test_billion_laughs_is_refused_in_well_under_a_second_and_100_mb(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    assert len(BILLION_LAUGHS.encode()) < 600
    repo.write("tasks/nodes/web-2.yaml", BILLION_LAUGHS)
    repo.commit("laughs")
    run = run_process(etcd_server.endpoint, layout, repo.path)
    assert_refused(run, "tasks/nodes/web-2.yaml:", "billion laughs")
    # The whole process, Python and gRPC included, stayed small (it took 1.47 GB).
    assert run.max_rss_mib < 100, run.max_rss_mib
    assert run.seconds < 30  # process start included; generous on a loaded machine
    # The refusal itself, timed in this process (it took 22 s).
    started = time.perf_counter()
    result = manifests.parse("w.yaml", BILLION_LAUGHS.encode(), keys.Target.node("w"))
    assert time.perf_counter() - started < 1.0
    assert isinstance(result, list) and "billion laughs" in result[0].message
    assert snapshot(etcd, layout) == {}


# A block mapping 10,000 levels deep would be a 100 MB file (refused for its size).
DEEP_CASES = [
    (shape, levels)
    for shape in (deep_flow, deep_block, deep_json)
    for levels in (201, 995, 10_000)
    if not (shape is deep_block and levels > 995)
]


@pytest.mark.parametrize(("shape", "levels"), DEEP_CASES)
def test_deep_nesting_is_a_clean_error_per_file(
    capsys: Any,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    repo: OpsRepo,
    shape: Any,
    levels: int,
) -> None:
    repo.write("tasks/nodes/deep.yaml", shape(levels))
    repo.commit("deep")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 1 and "Traceback" not in out + err
    assert "tasks/nodes/deep.yaml:" in err
    assert "nested deeper than 200 levels" in err or "maximum nesting depth" in err, err
    assert snapshot(etcd, layout) == {}


def test_data_nested_exactly_200_levels_is_accepted(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    repo.write("tasks/nodes/deep.yaml", deep_flow(200))
    repo.commit("deep but allowed")
    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0, err
    assert snapshot(etcd, layout)[layout.node_key("deep")].startswith(b'{"Data":[[[[')


@pytest.mark.parametrize("worktree", [False, True])
def test_an_oversized_manifest_is_refused_before_it_is_parsed(
    capsys: Any,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    repo: OpsRepo,
    worktree: bool,
) -> None:
    filler = "# " + "x" * 1022 + "\n"
    repo.write("tasks/nodes/huge.yaml", "name: print\n" + filler * (8 * 1024))  # 8 MiB
    repo.commit("huge")
    extra = ("--worktree",) if worktree else ()
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, *extra)
    assert code == 1 and "Traceback" not in out + err
    assert "tasks/nodes/huge.yaml: file is over the 2 MiB limit for a manifest; not parsed" in err
    assert snapshot(etcd, layout) == {}


def test_a_huge_integer_and_nan_in_a_manifest_are_errors_naming_the_file(
    capsys: Any, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, repo: OpsRepo
) -> None:
    repo.write("tasks/nodes/big.yaml", "name: print\ndata: " + "1" * 5000 + "\n")
    repo.write("tasks/nodes/hex.yaml", "0x" + "f" * 5000 + "\n")  # also never printable
    repo.write("tasks/nodes/nan.yaml", "name: print\ndata: [1.0e+999]\n")
    repo.write("tasks/nodes/loop.yaml", "name: print\ndata: &me [*me]\n")
    repo.commit("numbers")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 1 and "Traceback" not in out + err
    assert "tasks/nodes/big.yaml:2: holds an integer of more than 4300 digits" in err
    assert "tasks/nodes/hex.yaml:1: holds an integer of more than 4300 digits" in err
    assert "tasks/nodes/nan.yaml:2: task data holds NaN or infinity" in err
    assert "tasks/nodes/loop.yaml:2: an alias refers to a node that contains it" in err
    assert snapshot(etcd, layout) == {}


# --worktree reads regular files only --------------------------------------------------


def _worktree(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    (root / "tasks/nodes").mkdir(parents=True)
    (root / "tasks/nodes/web-1.yaml").write_text("name: print\n")
    (root / "secret.yaml").write_text("name: print\ndata: {db_password: hunter2}\n")
    return root


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: os.symlink("../../secret.yaml", p), "a symbolic link"),
        (lambda p: os.symlink("/dev/zero", p), "a symbolic link"),
        (os.mkfifo, "a FIFO"),
    ],
    ids=["link-outside", "link-to-dev-zero", "fifo"],
)
def test_worktree_refuses_links_and_fifos_at_once(
    tmp_path: Path, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, make: Any, kind: str
) -> None:
    root = _worktree(tmp_path)
    make(root / "tasks/nodes/web-2.yaml")
    run = run_process(etcd_server.endpoint, layout, root, "--worktree")
    assert_refused(run, f"tasks/nodes/web-2.yaml: is {kind}; tasks/ may hold regular files only")
    assert "hunter2" not in run.out + run.err
    assert run.seconds < 30  # a FIFO blocked forever, /dev/zero ran to 1.5 GB
    assert snapshot(etcd, layout) == {}


def test_worktree_refuses_tasks_as_a_link_and_a_linked_directory(
    capsys: Any, tmp_path: Path, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    root = _worktree(tmp_path)
    (root / "outside").mkdir()
    os.symlink("../../outside", root / "tasks/regions")
    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, root, "--worktree")
    assert code == 1 and "tasks/regions: is a symbolic link" in err, err
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(root / "tasks", other / "tasks")
    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, other, "--worktree")
    assert code == 1 and "tasks: is a symbolic link, not a directory" in err, err
    assert snapshot(etcd, layout) == {}


def test_worktree_file_name_with_a_newline_is_an_error_naming_it(
    capsys: Any, tmp_path: Path, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    root = _worktree(tmp_path)
    (root / "tasks/nodes/a\nb.yaml").write_text("name: print\n")
    (root / "tasks/README\x1b[2J.md").write_text("hello\n")
    code, out, err = run_cli(
        capsys, etcd_server.endpoint, layout, root, "--worktree", "--output", "json"
    )
    assert code == 1
    files = [e["file"] for e in json.loads(out)["errors"]]
    assert files == ["tasks/README\\x1b[2J.md", "tasks/nodes/a\\nb.yaml"]
    assert snapshot(etcd, layout) == {}


# The daemon logs every refusal as lines and keeps running ----------------------------


def test_the_daemon_logs_a_hostile_commit_as_lines_and_applies_the_next_good_one(
    etcd: Any, layout: keys.Layout, repo: OpsRepo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gleam.reconcile")
    options = reconcile.Options(repo=repo.path, lock_timeout=60)
    d = daemon.Daemon(sync.Store.over(etcd, layout), options, daemon.LoopSettings(full_every=1000))
    d.source = gitsource.Source(repo.path)
    assert d.one_pass(daemon.Reason.START)
    before = snapshot(etcd, layout)
    _review_bypass(repo)
    repo.write("tasks/nodes/web-3.yaml", BILLION_LAUGHS)
    repo.commit("laughs")
    assert not d.one_pass(daemon.Reason.CHANGE)
    assert snapshot(etcd, layout) == before
    assert "billion laughs" in caplog.text and "file name holds a control" in caplog.text
    assert not any(r.exc_info for r in caplog.records)
    repo.git("rm", "-q", "--cached", "-r", "tasks/nodes")
    for path in (repo.path / "tasks/nodes").iterdir():
        path.unlink()
    repo.node("web-1", "print", "data:\n  msg: again\n")
    repo.commit("clean up")
    assert d.one_pass(daemon.Reason.CHANGE)
    assert snapshot(etcd, layout)[layout.node_key("web-1")] == (
        b'{"Data":{"msg":"again"},"Name":"print"}'
    )


# The last line of defence: Python's own limits end as a line, never a traceback --------


@pytest.mark.parametrize("error", [MemoryError, RecursionError])
def test_memory_and_recursion_errors_end_a_pass_as_one_line(
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    repo: OpsRepo,
    caplog: pytest.LogCaptureFixture,
    error: type[BaseException],
) -> None:
    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise error()

    monkeypatch.setattr(manifests, "gather", explode)  # every read ends there
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 1 and "Traceback" not in out + err
    assert err.startswith("gleam-reconcile: the pass ") and err.count("\n") == 1, err
    code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--output", "json")
    assert code == 1 and json.loads(out)["error"].startswith("the pass ")
    caplog.set_level(logging.INFO, logger="gleam.reconcile")
    d = daemon.Daemon(
        sync.Store.over(etcd, layout), reconcile.Options(repo=repo.path), daemon.LoopSettings()
    )
    d.source = gitsource.Source(repo.path)
    assert not d.one_pass(daemon.Reason.START)
    assert "the pass " in caplog.text and not any(r.exc_info for r in caplog.records)
    assert snapshot(etcd, layout) == {}
