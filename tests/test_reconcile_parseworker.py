"""Parsing on two cores (reconciler/parseworker.py): the parent and a child process
together give exactly what one process gives, on a generated tree of a few thousand
manifests with invalid files, hostile files and duplicates among them; a child that is
killed or sends garbage only costs time, never a wrong result."""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import itertools
import logging
import marshal
import os
import posixpath
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import opsrepo
from gleam import keys
from reconciler import (
    desired,
    gitsource,
    launch,
    manifests,
    parsecache,
    parseworker,
    reconcile,
    records,
)
from tests.test_reconcile_hostile import BILLION_LAUGHS, deep_flow

LAYOUT = keys.Layout("/parse")
SIZE = 2500

# Files added to the generated tree in the second commit: every kind of per-file error,
# duplicates of one target at both ends of the listing, and shared blobs.
BROKEN = {
    "tasks/nodes/aaa-dup.yaml": "name: print\ndata: {a: 1}\n",
    "tasks/nodes/aaa-dup.yml": "name: print\ndata: {a: 2}\n",
    "tasks/nodes/bad-yaml.yaml": "name: [unclosed\n",
    "tasks/nodes/no-name.yaml": "data: {x: 1}\n",
    "tasks/nodes/bad name.yaml": "name: print\n",
    "tasks/nodes/deeper/misplaced.yaml": "name: print\n",
    "tasks/nodes/deep.yaml": deep_flow(300),
    "tasks/nodes/with-rollout.yaml": "name: print\nrollout: {waves: ['50%', '100%']}\n",
    "tasks/nodes/huge.yaml": "name: print\ndata: '" + "x" * (manifests.MAX_FILE_BYTES + 10) + "'\n",
    "tasks/nodes/same-1.yaml": "name: pkg::ensure\ndata: [nginx]\n",
    "tasks/nodes/same-2.yaml": "name: pkg::ensure\ndata: [nginx]\n",
    "tasks/nodes/same-3.yml": "name: pkg::ensure\ndata: [nginx]\n",
    "tasks/regions/laughs.yaml": BILLION_LAUGHS,
    "tasks/regions/staged.yaml": "name: print\nrollout: {waves: ['10%', '100%']}\n",
    "tasks/regions/zzz-dup.yaml": "name: print\n",
    "tasks/regions/zzz-dup.yml": "name: print\n",
    "tasks/README.md": "not a manifest\n",
}


@dataclass(frozen=True)
class Tree:
    source: gitsource.Source
    valid: str  # the generated manifests only
    broken: str  # the same plus BROKEN

    def blobs(self, commit: str) -> list[tuple[str, str]]:
        return list(self.source.list_tree(commit).blobs)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    path = tmp_path_factory.mktemp("parse") / "ops"
    opsrepo.generate(path, size=SIZE)
    # Two more files with the same contents as a generated one: a blob with three paths.
    first = sorted((path / "tasks" / "nodes").iterdir())[0]
    for copy in ("copy-1.yaml", "copy-2.yml"):
        (path / "tasks" / "nodes" / copy).write_bytes(first.read_bytes())
    opsrepo.git(path, "add", "--all")
    opsrepo.git(path, "commit", "--quiet", "--no-verify", "-m", "copies")
    valid = opsrepo.git(path, "rev-parse", "HEAD").strip()
    for rel, text in BROKEN.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text, encoding="utf-8")
    opsrepo.git(path, "add", "--all")
    opsrepo.git(path, "commit", "--quiet", "--no-verify", "-m", "broken")
    broken = opsrepo.git(path, "rev-parse", "HEAD").strip()
    return Tree(gitsource.Source(path), valid=valid, broken=broken)


def serial(source: gitsource.Source, blobs: list[tuple[str, str]]) -> list[parseworker.Result]:
    return [
        manifests.parse_file(path, raw) for paths, raw in source.read_blobs(blobs) for path in paths
    ]


def names(results: list[parseworker.Result]) -> list[str | None]:
    return [r.name if isinstance(r, manifests.Manifest) else None for r in results]


def assert_same(got: list[parseworker.Result], want: list[parseworker.Result]) -> None:
    assert len(got) == len(want)
    assert got == want
    assert names(got) == names(want)


# The parallel path against the serial one ---------------------------------------------


@pytest.mark.parametrize("commit", ["valid", "broken"])
def test_two_processes_parse_exactly_what_one_does(tree: Tree, commit: str, caplog: Any) -> None:
    blobs = tree.blobs(getattr(tree, commit))
    worker = parseworker.Worker.start()
    assert worker is not None
    with worker, caplog.at_level(logging.WARNING, logger="gleam.reconcile"):
        assert_same(worker.parse(tree.source, blobs), serial(tree.source, blobs))
    assert "stopped helping" not in caplog.text  # its results were used, not dropped
    assert worker.proc.returncode is not None  # stopped


def test_the_childs_own_results_are_all_right(tree: Tree) -> None:
    """The child's whole output (it parses from the back), whatever share the parent
    would have taken: every blob's results equal the serial parse's."""
    blobs = tree.blobs(tree.broken)
    jobs = gitsource.blob_order(blobs)
    request = io.BytesIO(parseworker.frame((str(tree.source.path), jobs)))
    reply = io.BytesIO()
    parseworker.serve(request, reply)
    frames = parseworker.unframe(bytearray(reply.getvalue()))
    items = [item for frame in frames for item in frame]
    assert [index for index, _ in items] == list(range(len(jobs) - 1, -1, -1))
    got: list[parseworker.Result] = []
    for index, raw in reversed(items):
        got += [parseworker.decode_result(p, r) for p, r in zip(jobs[index][1], raw, strict=True)]
    assert_same(got, serial(tree.source, blobs))


def _read_full(
    tree: Tree, commit: str, monkeypatch: pytest.MonkeyPatch, *, parallel: bool
) -> desired.Desired | manifests.InvalidManifests:
    monkeypatch.setattr(parseworker, "THRESHOLD", 1 if parallel else 10**9)
    monkeypatch.setattr(parseworker, "usable_cpus", lambda: 2)
    try:
        return desired.read_full(LAYOUT, tree.source, commit)
    except manifests.InvalidManifests as exc:
        return exc


def test_a_full_read_gives_the_same_errors_in_the_same_order(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    both = [_read_full(tree, tree.broken, monkeypatch, parallel=p) for p in (True, False)]
    one, two = both
    assert isinstance(one, manifests.InvalidManifests)
    assert isinstance(two, manifests.InvalidManifests)
    assert one.errors == two.errors
    text = "\n".join(str(e) for e in one.errors)
    for needle in (
        "tasks/nodes/aaa-dup.yml: tasks/nodes/aaa-dup.yaml already defines node/aaa-dup",
        "tasks/regions/zzz-dup.yml: tasks/regions/zzz-dup.yaml already defines region/zzz-dup",
        "nested deeper than",
        "billion laughs",
        "not valid YAML",
        "limit for a manifest",
        "a node manifest cannot have `rollout`",
        "misplaced.yaml: manifests go directly in tasks/nodes/",
    ):
        assert needle in text, needle


def test_a_full_read_gives_the_same_manifests_and_parse_cache(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = parsecache.path_for(tree.source.git_dir)
    got: list[tuple[desired.Desired, dict[str, bytes]]] = []
    for parallel in (True, False):
        cache.unlink(missing_ok=True)
        read = _read_full(tree, tree.valid, monkeypatch, parallel=parallel)
        assert isinstance(read, desired.Desired)
        got.append((read, parsecache.load(cache)))
    (one, one_cache), (two, two_cache) = got
    assert list(one.entries) == list(two.entries)
    assert one.entries == two.entries
    assert [m.name for m in one.entries.values()] == [m.name for m in two.entries.values()]
    assert one.values == two.values and one.digest == two.digest
    assert one_cache == two_cache and len(one_cache) == len(set(one_cache)) > SIZE // 2
    cache.unlink()


# A child that dies or misbehaves ---------------------------------------------------------


def _fallback(tree: Tree, worker: parseworker.Worker | None, caplog: Any) -> str:
    assert worker is not None
    worker.proc.wait()  # gone (or done writing) before the parent reads anything
    blobs = tree.blobs(tree.broken)
    with worker, caplog.at_level(logging.WARNING, logger="gleam.reconcile"):
        assert_same(worker.parse(tree.source, blobs), serial(tree.source, blobs))
    return caplog.text


def test_a_killed_worker_costs_only_time(tree: Tree, caplog: Any) -> None:
    worker = parseworker.Worker.start()
    assert worker is not None
    worker.proc.kill()
    log = _fallback(tree, worker, caplog)
    assert "the parse worker stopped helping: it exited" in log
    assert "parsing its share here" in log


def _child(*frames: bytes) -> list[str]:
    """A child that writes `frames` at once, without reading the request, and exits."""
    return [sys.executable, "-c", f"import sys; sys.stdout.buffer.write({b''.join(frames)!r})"]


@pytest.mark.parametrize(
    ("frames", "said"),
    [
        ((b"\x05" + b"\0" * 7 + b"junk!",), "an unreadable frame"),
        ((parseworker.frame([(0, [None])]),), "a reply for another blob than"),
        ((parseworker.frame("hello"),), "a reply that is not a list"),
        ((parseworker.frame([]),) * 1000, "an empty reply"),  # moves nothing on
        ((struct.pack("<Q", 3) + b"\0",), "it exited"),  # a frame cut short
        ((struct.pack("<Q", parseworker.MAX_FRAME + 1) + b"x",), "a frame of"),  # not buffered
    ],
)
def test_a_worker_that_sends_garbage_is_not_believed(
    tree: Tree, caplog: Any, frames: tuple[bytes, ...], said: str
) -> None:
    log = _fallback(tree, parseworker.Worker.start(_child(*frames)), caplog)
    assert said in log


@pytest.mark.parametrize(
    ("first", "said"),
    [
        ((parseworker.LISTED, 5), "it listed other files (digest ?)"),
        (("x", None), "it listed other files (digest ?)"),
        ((parseworker.LISTED, "\x1b[2Jforged"), "it listed other files (digest '\\x1b[2Jforged')"),
    ],
)
def test_a_listing_worker_whose_first_word_is_not_a_digest_is_not_believed(
    tree: Tree, caplog: Any, first: Any, said: str
) -> None:
    proc = subprocess.Popen(
        _child(parseworker.frame(first)), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    log = _fallback(tree, parseworker.Worker(proc, listed=True), caplog)
    assert said in log


def test_a_reply_for_the_right_blob_by_a_float_is_not_believed(tree: Tree, caplog: Any) -> None:
    """3.0 == 3, but a float cannot index the jobs: refused, not a TypeError."""
    jobs = gitsource.blob_order(tree.blobs(tree.broken))
    last = len(jobs) - 1
    reply = parseworker.frame([(float(last), [None] * len(jobs[last][1]))])
    log = _fallback(tree, parseworker.Worker.start(_child(reply)), caplog)
    assert f"a reply for another blob than #{last}" in log


def test_a_worker_that_lies_about_a_manifest_in_the_wrong_shape_is_not_believed(
    tree: Tree, caplog: Any
) -> None:
    """The last blob's reply in the right place but of the wrong shape."""
    jobs = gitsource.blob_order(tree.blobs(tree.broken))
    last = len(jobs) - 1
    paths = jobs[last][1]
    lie = parseworker.frame([(last, [(b"{}", 7)] * len(paths))])
    log = _fallback(tree, parseworker.Worker.start(_child(lie)), caplog)
    assert "a malformed manifest for" in log


def test_a_worker_that_answers_past_the_first_blob_is_not_believed(
    tree: Tree, caplog: Any, tmp_path: Path
) -> None:
    """Every blob's right results, then one for blob #-1 (which Python would have taken
    for the last one). Few blobs: the child's whole output fits in the pipe, and is
    there at the parent's first look."""
    blobs = tree.blobs(tree.broken)[:20]
    jobs = gitsource.blob_order(blobs)
    reply = io.BytesIO()
    parseworker.serve(io.BytesIO(parseworker.frame((str(tree.source.path), jobs))), reply)
    last = parseworker.unframe(bytearray(reply.getvalue()))[-1][-1]
    output = tmp_path / "replies"
    output.write_bytes(reply.getvalue() + parseworker.frame([(-1, last[1])]))
    copy = f"import shutil, sys; shutil.copyfileobj(open({str(output)!r}, 'rb'), sys.stdout.buffer)"
    worker = parseworker.Worker.start([sys.executable, "-c", copy])
    assert worker is not None and len(output.read_bytes()) < 1 << 16
    worker.proc.wait()
    with worker, caplog.at_level(logging.WARNING, logger="gleam.reconcile"):
        assert_same(worker.parse(tree.source, blobs), serial(tree.source, blobs))
    assert "a reply past the first blob" in caplog.text


def test_a_worker_that_writes_on_and_on_does_not_hold_the_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However fast the child writes, one look at its pipe reads about one largest
    frame, then judges what it read."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    jobs = [("1" * 40, ["tasks/nodes/a.yaml"])] * 4
    reads = itertools.count()

    def endless(fd: int, size: int) -> bytes:
        assert next(reads) < 2 * parseworker.MAX_FRAME >> 20, "still reading"
        return b"\0" * size  # frames of length 0: unreadable, once looked at

    with parseworker.Worker(proc):
        child = parseworker._Child(proc, jobs, None)
        results: list[list[parseworker.Result] | None] = [None] * len(jobs)
        with monkeypatch.context() as patched:
            patched.setattr(parseworker.os, "read", endless)
            assert child.collect(results, len(jobs), done=0) == len(jobs)
        assert not child.alive and len(child.buffer) <= parseworker.MAX_FRAME + (1 << 20)


# Pure pieces -------------------------------------------------------------------------------


def test_blob_order_reads_each_blob_once_with_all_its_paths() -> None:
    blobs = [("a", "1" * 40), ("b", "2" * 40), ("c", "1" * 40)]
    assert gitsource.blob_order(blobs) == [("1" * 40, ["a", "c"]), ("2" * 40, ["b"])]
    assert gitsource.blob_order([]) == []


NODE = "tasks/nodes/web-1.yaml"


@pytest.mark.parametrize(
    ("path", "result"),
    [
        (NODE, manifests.Manifest(NODE, keys.Target.node("web-1"), b"{}", name="print")),
        (NODE, [manifests.ManifestError(NODE, 3, "bad"), manifests.ManifestError(NODE, None, "x")]),
        ("tasks/README.md", None),
    ],
)
def test_results_cross_the_pipe_unchanged(path: str, result: parseworker.Result) -> None:
    raw = marshal.loads(marshal.dumps(parseworker.encode_result(result)))
    back = parseworker.decode_result(path, raw)
    assert back == result
    assert names([back]) == names([result])


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        (NODE, None),  # a manifest path with no result
        ("tasks/README.md", (b"{}", "print")),  # a manifest for a file that is none
        ("tasks/nodes/bad name.yaml", (b"{}", "print")),  # or for an invalid name
        (NODE, (b"{}",)),
        (NODE, ("{}", "print")),
        (NODE, []),
        (NODE, [(NODE, "3", "bad")]),
        (NODE, [(NODE, 3)]),
        (NODE, {"a": 1}),
    ],
)
def test_a_result_parse_file_could_not_give_is_refused(path: str, raw: Any) -> None:
    with pytest.raises(parseworker.Misbehaved):
        parseworker.decode_result(path, raw)


def test_frames_are_taken_only_when_complete() -> None:
    data = parseworker.frame([1, 2]) + parseworker.frame("x")
    buffer = bytearray(data[:5])
    assert parseworker.unframe(buffer) == [] and len(buffer) == 5
    buffer += data[5:-1]
    assert parseworker.unframe(buffer) == [[1, 2]]
    buffer += data[-1:]
    assert parseworker.unframe(buffer) == ["x"] and not buffer


def test_a_worker_is_worth_it_for_many_files_on_more_than_one_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parseworker, "usable_cpus", lambda: 2)
    assert parseworker.worth_it(parseworker.THRESHOLD)
    assert not parseworker.worth_it(parseworker.THRESHOLD - 1)
    monkeypatch.setattr(parseworker, "usable_cpus", lambda: 1)
    assert not parseworker.worth_it(10**6)


def test_gather_keeps_the_first_of_two_files_for_one_target() -> None:
    a = manifests.Manifest("tasks/nodes/w.yaml", keys.Target.node("w"), b"1")
    b = manifests.Manifest("tasks/nodes/w.yml", keys.Target.node("w"), b"2")
    with pytest.raises(manifests.InvalidManifests) as caught:
        manifests.gather([None, a, b, [manifests.ManifestError("x", 1, "bad")]])
    assert [str(e) for e in caught.value.errors] == [
        "tasks/nodes/w.yml: tasks/nodes/w.yaml already defines node/w",
        "x:1: bad",
    ]
    assert manifests.gather([a, None]) == {keys.Target.node("w"): a}


def test_parsing_leaves_no_cycles_for_the_paused_collector() -> None:
    """A pass pauses the cycle collector (reconcile.collector_paused), so a parse must
    free everything by reference counting: valid, invalid and hostile files alike."""
    files = [*BROKEN.items(), ("tasks/nodes/ok.yaml", "name: print\ndata: {a: [1, {b: 2}]}\n")]
    for path, text in files:
        manifests.parse_file(path, text.encode())  # imports and caches warmed first
    gc.collect()
    with reconcile.collector_paused():
        assert not gc.isenabled()
        for path, text in files:
            manifests.parse_file(path, text.encode())
            assert gc.collect() == 0, path
    assert gc.isenabled()


def test_a_file_names_stem_is_what_splitext_says() -> None:
    for size in range(6):
        for letters in itertools.product("a.b", repeat=size):
            for ext in manifests.EXTENSIONS:
                name = "".join(letters) + ext
                assert manifests._stem(name) == posixpath.splitext(name)[0], name


# A worker started before the imports (reconciler.launch) --------------------------------


def _listed_worker(tree: Tree) -> parseworker.Worker:
    command = launch.worker_command("--list", str(tree.source.path))
    return parseworker.Worker(launch.spawn_worker(command), listed=True)


def test_a_worker_that_listed_head_itself_parses_exactly_what_one_process_does(
    tree: Tree, caplog: Any
) -> None:
    worker = _listed_worker(tree)
    blobs = tree.blobs(tree.broken)  # HEAD
    with worker, caplog.at_level(logging.WARNING, logger="gleam.reconcile"):
        assert_same(worker.parse(tree.source, blobs), serial(tree.source, blobs))
    assert "stopped helping" not in caplog.text  # its listing matched: its results used


def test_the_listing_childs_first_word_is_the_digest_of_what_it_listed(tree: Tree) -> None:
    reply = io.BytesIO()
    parseworker.serve(None, reply, listed=tree.source.path)
    frames = parseworker.unframe(bytearray(reply.getvalue()))
    jobs = gitsource.blob_order(tree.blobs(tree.broken))
    assert frames[0] == (parseworker.LISTED, parseworker.jobs_digest(jobs))
    items = [item for frame in frames[1:] for item in frame]
    assert [index for index, _ in items] == list(range(len(jobs) - 1, -1, -1))


def test_a_worker_that_listed_another_commit_is_not_used(tree: Tree, caplog: Any) -> None:
    """HEAD moved between the launch and the pass (or the pass reads something else):
    the child's results are for other blobs, and none of them is taken."""
    worker = _listed_worker(tree)  # lists HEAD: the broken commit
    blobs = tree.blobs(tree.valid)
    with worker, caplog.at_level(logging.WARNING, logger="gleam.reconcile"):
        assert_same(worker.parse(tree.source, blobs), serial(tree.source, blobs))
    assert "it listed other files" in caplog.text


def test_the_digest_covers_every_blob_id_path_and_their_order() -> None:
    jobs = [("1" * 40, ["a", "b"]), ("2" * 40, ["c"])]
    digest = parseworker.jobs_digest(jobs)
    assert parseworker.jobs_digest([("1" * 40, ["a", "b"]), ("2" * 40, ["c"])]) == digest
    for other in (
        [("1" * 40, ["a"]), ("2" * 40, ["b", "c"])],
        [("1" * 40, ["b", "a"]), ("2" * 40, ["c"])],
        [("2" * 40, ["c"]), ("1" * 40, ["a", "b"])],
        [("1" * 40, ["a", "b"]), ("3" * 40, ["c"])],
        [("1" * 40, ["a", "b"])],
    ):
        assert parseworker.jobs_digest(other) != digest


def test_an_incremental_read_stops_a_prestarted_worker(tree: Tree) -> None:
    command = launch.worker_command("--list", str(tree.source.path))
    parseworker.adopt_prestarted(launch.spawn_worker(command))
    worker = parseworker._prestarted
    assert worker is not None
    applied = records.Apply("commit", tree.broken, "t", SIZE, "d")
    record = records.after(None, applied)
    got = desired.read_commit(LAYOUT, tree.source, tree.valid, record, mode=desired.INCREMENTAL)
    assert got.mode == desired.INCREMENTAL
    assert parseworker.take_prestarted() is None
    assert worker.proc.returncode is not None  # stopped, not left parsing


def test_a_full_read_takes_the_prestarted_worker(tree: Tree, monkeypatch: Any, caplog: Any) -> None:
    """The worker lists HEAD (the commit with broken files): a full read of HEAD uses
    its results, and reports the same errors as a read in one process."""
    monkeypatch.setattr(parseworker, "usable_cpus", lambda: 2)
    command = launch.worker_command("--list", str(tree.source.path))
    parseworker.adopt_prestarted(launch.spawn_worker(command))
    worker = parseworker._prestarted
    assert worker is not None
    with (
        caplog.at_level(logging.DEBUG, logger="gleam.reconcile"),
        pytest.raises(manifests.InvalidManifests) as got,
    ):
        desired.read_commit(LAYOUT, tree.source, tree.broken, None, mode=desired.FULL, cache=False)
    assert parseworker.take_prestarted() is None and worker.proc.returncode is not None
    assert "parsing with the worker started before the imports" in caplog.text
    assert "stopped helping" not in caplog.text
    monkeypatch.setattr(parseworker, "THRESHOLD", 10**9)
    with pytest.raises(manifests.InvalidManifests) as alone:
        desired.read_commit(LAYOUT, tree.source, tree.broken, None, mode=desired.FULL, cache=False)
    assert got.value.errors == alone.value.errors


# Who stops the worker: the read that holds it, once, whatever ends the read -------------


@dataclass(frozen=True)
class Spawned:
    """Every parse worker started while a test runs, and how often each was stopped."""

    procs: list[subprocess.Popen[bytes]]
    stops: collections.Counter[int]  # by pid

    def assert_each_stopped_once(self) -> None:
        assert self.procs, "no parse worker was started"
        for proc in self.procs:
            # stop() reaps the child: its status is known at once, and its pid goes.
            assert proc.returncode is not None, "left running"
            assert self.stops[proc.pid] == 1, f"stopped {self.stops[proc.pid]} times"
            assert _gone(proc.pid)


def _gone(pid: int, *, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _full(tree: Tree, commit: str, *, cache: bool = True) -> desired.Desired:
    return desired.read_commit(LAYOUT, tree.source, commit, None, mode=desired.FULL, cache=cache)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Spawned:
    seen = Spawned([], collections.Counter())
    spawn, stop = launch.spawn_worker, parseworker.Worker.stop

    def counted_spawn(argv: Any = None) -> subprocess.Popen[bytes]:
        proc = spawn(argv)
        seen.procs.append(proc)
        return proc

    def counted_stop(worker: parseworker.Worker) -> None:
        seen.stops[worker.proc.pid] += 1
        stop(worker)

    monkeypatch.setattr(launch, "spawn_worker", counted_spawn)
    monkeypatch.setattr(parseworker.Worker, "stop", counted_stop)
    # Every full read starts its worker early, before it knows the count.
    monkeypatch.setattr(parseworker, "usable_cpus", lambda: 2)
    monkeypatch.setattr(launch, "likely_full_parse", lambda git_dir, *, cache: True)
    return seen


def test_a_read_of_a_commit_git_cannot_list_stops_the_early_worker(
    tree: Tree, spawned: Spawned
) -> None:
    with pytest.raises(gitsource.GitError):
        _full(tree, "0" * 40, cache=False)
    spawned.assert_each_stopped_once()


def test_a_read_that_finds_invalid_manifests_stops_its_worker(
    tree: Tree, spawned: Spawned, caplog: Any
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="gleam.reconcile"),
        pytest.raises(manifests.InvalidManifests),
    ):
        _full(tree, tree.broken, cache=False)
    assert "in the parse worker" in caplog.text  # it was used
    spawned.assert_each_stopped_once()


def test_a_read_that_fails_while_parsing_stops_its_worker_once(
    tree: Tree, spawned: Spawned, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = itertools.count()
    parse_paths = manifests.parse_paths

    def failing(paths: list[str], raw: bytes) -> list[parseworker.Result]:
        if next(calls) == 100:
            raise RuntimeError("disk on fire")
        return parse_paths(paths, raw)

    monkeypatch.setattr(manifests, "parse_paths", failing)  # in this process, not the child
    with pytest.raises(RuntimeError, match="disk on fire"):
        _full(tree, tree.valid, cache=False)
    spawned.assert_each_stopped_once()


def test_a_read_with_everything_cached_stops_the_worker_it_did_not_need(
    tree: Tree, spawned: Spawned
) -> None:
    cache = parsecache.path_for(tree.source.git_dir)
    cache.unlink(missing_ok=True)
    first = _full(tree, tree.valid)
    spawned.procs.clear()
    again = _full(tree, tree.valid)  # nothing left to parse
    assert again.values == first.values
    spawned.assert_each_stopped_once()
    parsecache.load(cache)  # waits for the save
    cache.unlink()


def test_an_incremental_read_of_many_changes_stops_the_worker_it_started(
    tree: Tree, spawned: Spawned, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parseworker, "THRESHOLD", 1)
    applied = records.Apply("commit", tree.valid, "t", SIZE, "d")
    record = records.after(None, applied)
    with pytest.raises(manifests.InvalidManifests):
        desired.read_commit(LAYOUT, tree.source, tree.broken, record, mode=desired.INCREMENTAL)
    spawned.assert_each_stopped_once()


@pytest.mark.parametrize("fails", [False, True])
def test_a_prestarted_worker_no_pass_took_is_stopped_on_leaving(
    tree: Tree, spawned: Spawned, fails: bool
) -> None:
    command = launch.worker_command("--list", str(tree.source.path))
    with contextlib.suppress(RuntimeError), parseworker.offered(launch.spawn_worker(command)):
        assert parseworker._prestarted is not None
        if fails:
            raise RuntimeError("the pass failed before it read anything")
    assert parseworker._prestarted is None
    spawned.assert_each_stopped_once()


# The child's own input: its stdin and its flags -------------------------------------------


def _run_worker(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The worker's command as launch runs it, with its stderr kept."""
    return subprocess.run(
        launch.worker_command(*args), input=stdin, capture_output=True, timeout=120
    )


def test_a_worker_whose_parent_sends_nothing_exits_quietly() -> None:
    """stdin empty or closed at once: the parent died or dropped it before a word."""
    done = _run_worker(stdin=b"")
    assert done.returncode != 0
    assert done.stderr == b"" and done.stdout == b""


@pytest.mark.parametrize(
    ("stdin", "said"),
    [
        (b"\x05\0\0", "the request ends inside its length"),
        (b"\x05" + b"\0" * 7 + b"junk!", "the request cannot be read"),
        (struct.pack("<Q", 2**63 - 1), "the request ends after 0 of its"),  # not allocated
        (struct.pack("<Q", 2**40) + b"x" * 1000, "the request ends after 1000 of its"),
        (parseworker.frame(("/tmp", [("1" * 40, [5])])), "a job of the request is not"),
    ],
)
def test_a_worker_given_a_broken_request_says_so_in_one_line(stdin: bytes, said: str) -> None:
    done = _run_worker(stdin=stdin)
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.startswith(f"reconciler.parseworker: {said}".encode())
    assert b"Traceback" not in done.stderr and done.stderr.count(b"\n") == 1


@pytest.mark.parametrize("args", [["--list"], ["--list", ""], ["--list", "a", "b"], ["-x", "a"]])
def test_a_worker_given_other_flags_says_how_to_run_it(args: list[str]) -> None:
    done = _run_worker(*args, stdin=b"")
    assert done.returncode == 2
    assert done.stderr.startswith(b"reconciler.parseworker: usage:")
    assert b"Traceback" not in done.stderr


@pytest.mark.parametrize(
    "value",
    [
        None,
        ("/tmp",),
        ("/tmp", [], "more"),
        (b"/tmp", []),
        ("", []),
        ("/tmp\0/x", []),
        ("/tmp", ()),
        ("/tmp", [("1" * 40,)]),
        ("/tmp", [("1" * 40, [])]),
        ("/tmp", [(b"1" * 40, ["tasks/nodes/a.yaml"])]),
        ("/tmp", [("1" * 40, "tasks/nodes/a.yaml")]),
        ("/tmp", [("1" * 40, [b"tasks/nodes/a.yaml"])]),
        ("/tmp", [["1" * 40, ["tasks/nodes/a.yaml"]]]),
        ("/tmp", [("zz", ["tasks/nodes/a.yaml"])]),  # not a blob id: git would be asked
        ("/tmp", [("1" * 40 + "\n" + "2" * 40, ["tasks/nodes/a.yaml"])]),  # two of them
    ],
)
def test_a_request_of_any_other_shape_is_refused(value: Any) -> None:
    with pytest.raises(parseworker.BadRequest):
        parseworker.request_from(value)
    with pytest.raises(parseworker.BadRequest):
        parseworker.serve(io.BytesIO(parseworker.frame(value)), io.BytesIO())


def test_a_request_in_the_right_shape_is_taken() -> None:
    jobs = [("1" * 40, ["tasks/nodes/a.yaml", "tasks/nodes/b.yml"])]
    assert parseworker.request_from(("/tmp", jobs)) == (Path("/tmp"), jobs)
