"""The desired state: what the manifests in git HEAD (or the work tree) say etcd should
hold, read in full or, when the applied record allows it, only the manifests changed
since the last applied commit.

`choose_mode` (full or incremental) and `Desired.merge` are pure; reading goes through
gitsource and the parse cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gleam import keys
from reconciler import gitsource, launch, manifests, parsecache, parseworker, records

log = logging.getLogger("gleam.reconcile")

FULL = "full"
INCREMENTAL = "incremental"


@dataclass(frozen=True)
class Desired:
    """The desired state for the keys in scope (all keys when `scope` is None)."""

    entries: dict[str, manifests.Manifest]
    scope: frozenset[str] | None
    source: str  # "commit" or "worktree"
    commit: str | None
    digest: str
    total: int  # manifests in the whole tree
    mode: str  # FULL or INCREMENTAL

    @property
    def values(self) -> dict[str, bytes]:
        return {key: m.value for key, m in self.entries.items()}

    def merge(self, newer: Desired, *, base_commit: str | None) -> Desired | None:
        """The whole desired state after `newer`, read from git on top of this one.
        A full read replaces it; an incremental one (read as the changes since
        `base_commit`) replaces the keys in its scope, when this state is that commit's.
        None when the two cannot be merged (or `newer` is a work tree's, which the
        daemon does not keep): read everything next time."""
        if newer.scope is None:
            return newer if newer.source == "commit" else None
        if self.commit != base_commit:
            return None
        entries = {k: m for k, m in self.entries.items() if k not in newer.scope}
        entries.update(newer.entries)
        return dataclasses.replace(
            newer, entries=entries, scope=None, total=len(entries), mode=FULL
        )


def choose_mode(
    record: records.Record | None, *, full: bool, prune: bool, force: bool, rules: str
) -> str:
    """Read only the manifests changed since the recorded commit (INCREMENTAL) when the
    last apply came from git, with the same validation rules, and covered every owned
    key a --prune pass must look at; otherwise FULL."""
    last = record.last if record is not None else None
    if record is None or record.commit is None or last is None or force or full:
        return FULL
    if last.from_git and (last.pruned or not prune) and last.rules == rules:
        return INCREMENTAL
    return FULL


def worktree_digest(values: Mapping[str, bytes]) -> str:
    h = hashlib.sha256()
    for key in sorted(values):
        h.update(key.encode("utf-8") + b"\0" + values[key] + b"\n")
    return f"sha256:{h.hexdigest()}"


def _keyed(
    layout: keys.Layout, loaded: Mapping[keys.Target, manifests.Manifest]
) -> dict[str, manifests.Manifest]:
    """The manifests by target as the etcd keys they become."""
    return {layout.task_key(target): m for target, m in loaded.items()}


def read_worktree(layout: keys.Layout, repo: Path, source: gitsource.Source | None) -> Desired:
    """Every manifest as the files are on disk; `commit` is the HEAD they sit on, if
    any, for information only."""
    snapshot = gitsource.read_worktree(repo)
    entries = _keyed(layout, manifests.load(snapshot.files, problems=snapshot.problems))
    head = None
    if source is not None:
        try:
            head = source.head()
        except gitsource.GitError:
            head = None
    return Desired(
        entries=entries,
        scope=None,
        source="worktree",
        commit=head,
        digest=worktree_digest({k: m.value for k, m in entries.items()}),
        total=len(entries),
        mode=FULL,
    )


def read_commit(
    layout: keys.Layout,
    source: gitsource.Source,
    head: str,
    record: records.Record | None,
    *,
    mode: str,
    cache: bool = True,
) -> Desired:
    """The desired state at `head`: every manifest (FULL), or only the manifests
    changed since the record's commit (INCREMENTAL). Raises manifests.InvalidManifests
    or gitsource.GitError."""
    if mode == FULL or record is None or record.commit is None or record.last is None:
        return read_full(layout, source, head, cache=cache)
    parseworker.discard_prestarted()  # it would parse the whole tree
    # Paths refused by name or mode (a newline in a name, a symbolic link) are reported
    # as errors like any invalid manifest, before anything is read.
    changed = source.changed(record.commit, head)
    targets: dict[keys.Target, None] = {}
    problems = list(changed.problems)
    delta = 0
    for entry in changed.paths:
        target = manifests.classify(entry.path)
        if isinstance(target, keys.Target):
            targets[target] = None
            delta += {"A": 1, "D": -1}.get(entry.status, 0)
        elif isinstance(target, manifests.ManifestError) and entry.status != "D":
            problems.append(target)
    paths = [path for t in targets for path in manifests.paths_for(t)]
    listing = source.list_paths(head, paths)
    with _Parser(source) as parser:
        parsed = parser.parse(list(listing.blobs))
    # A refused path may be reported by two listings (the diff and the tree): once.
    loaded = manifests.gather(parsed, problems=dict.fromkeys([*problems, *listing.problems]))
    return Desired(
        entries=_keyed(layout, loaded),
        scope=frozenset(layout.task_key(t) for t in targets),
        source="commit",
        commit=head,
        digest=f"git-tree:{listing.tree or 'none'}",
        total=record.last.keys + delta,
        mode=INCREMENTAL,
    )


def read_full(
    layout: keys.Layout,
    source: gitsource.Source,
    commit: str,
    *,
    cache: bool = True,
) -> Desired:
    """Every manifest at `commit`. Blobs parsed before come from the parse cache; only
    the others are read from git and parsed, many of them on two cores (parseworker),
    with a worker started before the listing (early_worker)."""
    with _Parser(source, early_worker(source, cache=cache)) as parser:
        listing = source.list_tree(commit)
        blobs = listing.blobs
        cache_path = parsecache.path_for(source.git_dir)
        cached = parsecache.load(cache_path) if cache else {}
        keyed = [(path, sha, manifests.cache_key(path, sha)) for path, sha in blobs]
        known = [(path, cached[key]) for path, _sha, key in keyed if key in cached]
        missing = [(path, sha) for path, sha, key in keyed if key not in cached]
        parsed = parser.parse(missing)
    loaded = manifests.gather(
        itertools.chain(manifests.cached(known), parsed), problems=listing.problems
    )
    entries = _keyed(layout, loaded)
    if cache and missing:

        def cached_now() -> dict[str, bytes]:
            by_path = {m.path: m.value for m in loaded.values()}
            return {key: by_path[path] for path, _sha, key in keyed if path in by_path}

        parsecache.save_soon(cache_path, cached_now)
    log.debug(
        "read %d manifests at %s (%d parsed, %d cached)",
        len(entries),
        commit[:12],
        len(missing),
        len(known),
    )
    return Desired(
        entries=entries,
        scope=None,
        source="commit",
        commit=commit,
        digest=f"git-tree:{listing.tree or 'none'}",
        total=len(entries),
        mode=FULL,
    )


class _Parser:
    """How one read parses its files, and the one holder of its parse worker (one
    started early, or one started here for many files): the worker is stopped when
    the `with` block ends, whatever ends it (results, an exception, a read that had too
    few files to use it). A read ends the block once it has the results, so that the
    child, which may still be parsing blobs this process has done, is not left to run
    beside the rest of the pass."""

    def __init__(self, source: gitsource.Source, worker: parseworker.Worker | None = None) -> None:
        self.source = source
        self.worker = worker

    def __enter__(self) -> _Parser:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.worker is not None:
            self.worker.stop()

    def parse(self, missing: list[tuple[str, str]]) -> Iterable[parseworker.Result]:
        """parse_file's result for each (path, blob id), in read_blobs' order: on two
        cores when there are many (all there when this returns), else as the blobs
        stream in (a generator of this process's own, which needs no worker and may be
        read after the block)."""
        if parseworker.worth_it(len(missing)):
            if self.worker is None:
                self.worker = parseworker.Worker.start()
            if self.worker is not None:
                return self.worker.parse(self.source, missing)
        return (
            result
            for paths, raw in self.source.read_blobs(missing)
            for result in manifests.parse_paths(paths, raw)
        )


def early_worker(source: gitsource.Source, *, cache: bool) -> parseworker.Worker | None:
    """A parse worker started before the tree is listed: the one reconciler.launch
    started before the imports, if any, else a new one when a full read will likely
    parse enough files for one (launch.likely_full_parse, launch.has_manifests). Its
    start-up then overlaps the listing; read_full decides with the exact count."""
    prestarted = parseworker.take_prestarted()
    if prestarted is not None:
        log.debug("parsing with the worker started before the imports")
        return prestarted
    likely = launch.likely_full_parse(source.git_dir, cache=cache)
    if parseworker.usable_cpus() < 2 or not likely or not launch.has_manifests(source.path):
        return None
    return parseworker.Worker.start()
