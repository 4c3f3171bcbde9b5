"""Reconcile: `gleam-reconcile --once` on generated ops repos, against a loop of
`etcdctl put` per manifest."""

from __future__ import annotations

import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from pyetcd import etcdrpc

from bench import opsrepo
from bench.harness import Context, count_keys
from bench.processes import BenchError, etcdctl_binary, reconcile_argv, run_timed
from bench.report import Goal, Row
from bench.stats import Series
from gleam import keys

TITLE = "Reconcile (workload 1)"
METHOD = """
An ops repository of N manifests is generated (85 % node files, 15 % region files; each a
function name and 10 to 40 nested values: config files with variables, package lists,
users, service settings) and committed with git. Each repetition makes a fresh local
clone of it (not timed), as a CI job would have, and times whole commands from process
start to exit, each into a fresh key prefix so that it sees an empty etcd:

- *full apply, fresh clone*: `gleam-reconcile --repo CLONE --once`, the first run on the
  clone (nothing cached in the checkout: the CI case);
- *full apply, checkout read before*: the same command again into another empty prefix
  (what the reconciler keeps in the checkout, such as parsed manifests, is warm: the
  case of a daemon's checkout);
- *`--full` re-check*: then `--full` with nothing changed (reads every manifest at HEAD,
  compares with etcd, writes nothing);
- *one manifest changed*: one manifest is edited and committed, then `--once` runs (it
  diffs only what changed since the commit recorded in etcd).

After each full apply the number of task keys in etcd is checked, and after the change
the changed key's value. Baseline: the CI-script alternative, a bash loop running one
`etcdctl put KEY VALUE` per manifest over a 1,000-manifest repo (the values are converted
to JSON beforehand and not timed, which favours the baseline); it is extrapolated per
manifest to other sizes.
"""

LOOP = """#!/usr/bin/env bash
# The CI-script alternative to gleam-reconcile: one etcdctl put per manifest.
set -euo pipefail
etcdctl=$1 endpoint=$2 pairs=$3
while IFS=$'\\t' read -r key value; do
  "$etcdctl" --endpoints="$endpoint" put "$key" "$value" >/dev/null
done < "$pairs"
"""


def _task_count(ctx: Context, layout: keys.Layout) -> int:
    return count_keys(ctx.etcd, layout.tasks_prefix(keys.Kind.NODE)) + count_keys(
        ctx.etcd, layout.tasks_prefix(keys.Kind.REGION)
    )


def _baseline(ctx: Context, repo: opsrepo.OpsRepo) -> Series:
    """Wall seconds of the etcdctl loop over every manifest of `repo`, per repetition."""
    script = ctx.dir("baseline") / "put-loop.sh"
    script.write_text(LOOP)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    times = []
    # A repetition of the loop takes about a minute per 1,000 manifests; three give a
    # median and a spread without doubling the run's length.
    for rep in range(min(ctx.reps, 3)):
        layout = ctx.layout("putloop")
        pairs = ctx.dir("baseline") / f"pairs-{rep}.tsv"
        with open(pairs, "w", encoding="utf-8") as out:
            for manifest in repo.manifests:
                value = manifest.task.encode().decode("utf-8")
                out.write(f"{layout.task_key(manifest.target)}\t{value}\n")
        argv = ["bash", str(script), etcdctl_binary(), ctx.endpoint, str(pairs)]
        times.append(run_timed(argv, log_path=ctx.log_dir / "put-loop.log"))
        _expect_count(ctx, layout, len(repo.manifests), "etcdctl loop")
    return Series.of(times)


def _expect_count(ctx: Context, layout: keys.Layout, expected: int, what: str) -> None:
    found = _task_count(ctx, layout)
    if found != expected:
        raise BenchError(f"{what} left {found} task keys under {layout.prefix}, not {expected}")


COMPACT_TIMEOUT_S = 300  # 400,000 keys' revisions after a 100,000-manifest repetition


def forget(ctx: Context, *layouts: keys.Layout) -> None:
    """Delete what a repetition wrote and compact, so that every size and repetition
    writes into an etcd of about the same size: one etcd serves the whole run, and the
    largest size alone writes 400,000 keys a repetition."""
    for layout in layouts:
        ctx.etcd.delete_prefix(layout.prefix + "/")
    revision = int(ctx.etcd.put("/bench-compaction-marker", b"x").header.revision)
    # Physical: wait until etcd has removed the old revisions from its database. etcd
    # compacts in the background otherwise (batches of 1,000 keys with pauses between),
    # and the next repetition's timed apply would share the machine with it.
    etcd = ctx.etcd
    etcd.kvstub.Compact(
        etcdrpc.CompactionRequest(revision=revision, physical=True),
        COMPACT_TIMEOUT_S,
        credentials=etcd.call_credentials,
        metadata=etcd.metadata,
    )


@dataclass(frozen=True)
class Timings:
    """Wall seconds per repetition for one repo size."""

    cold_apply: Series  # fresh clone: nothing parsed before, as in a CI job
    warm_apply: Series  # same checkout again, into another empty prefix
    full_check: Series  # --full with nothing changed
    one_changed: Series  # one manifest changed since the recorded commit


def _gleam(ctx: Context, repo: opsrepo.OpsRepo) -> Timings:
    size = len(repo.manifests)
    log = ctx.log_dir / f"reconcile-{size}.log"
    cold, warm, full, one = [], [], [], []
    for rep in range(ctx.reps):
        # A fresh clone per repetition, as a CI job gets: whatever the reconciler keeps
        # in a checkout (caches) starts empty. Cloning is not timed.
        clone = ctx.workdir / f"clone-{size}-{rep}"
        opsrepo.clone(repo.path, clone)

        def argv(layout: keys.Layout, *extra: str, clone: Path = clone) -> list[str]:
            cmd = reconcile_argv(repo=clone, endpoint=ctx.endpoint, prefix=layout.prefix)
            return [*cmd, *extra]

        first = ctx.layout(f"reconcile{size}-cold")
        cold.append(run_timed(argv(first), log_path=log))
        _expect_count(ctx, first, size, "gleam-reconcile")
        layout = ctx.layout(f"reconcile{size}")
        warm.append(run_timed(argv(layout), log_path=log))
        _expect_count(ctx, layout, size, "gleam-reconcile")
        full.append(run_timed(argv(layout, "--full"), log_path=log))
        # Change a different manifest each time, always to a value not seen before.
        manifest = repo.manifests[(rep * 7919) % size]
        data = {"bench_change": rep, "previous": manifest.task.data}
        opsrepo.commit_change(clone, manifest.path, name=manifest.task.name, data=data)
        one.append(run_timed(argv(layout), log_path=log))
        value, _meta = ctx.etcd.get(layout.task_key(manifest.target))
        if value is None or b'"bench_change":%d' % rep not in value:
            raise BenchError(f"the changed manifest {manifest.path} did not reach etcd")
        shutil.rmtree(clone, ignore_errors=True)
        forget(ctx, first, layout)
    return Timings(Series.of(cold), Series.of(warm), Series.of(full), Series.of(one))


# The targets, by size (process start included, on the 2-core machine).
APPLY_TARGET_S = {10_000: 1.0, 100_000: 10.0}
PER_MANIFEST_TARGET_MS = {100_000: 0.1}
FULL_CHECK_TARGET_S = {100_000: 2.5}
ONE_CHANGE_TARGET_S = 0.5  # at every size


def _goal(targets: dict[int, float], size: int) -> tuple[Goal, ...]:
    return (Goal.at_most(targets[size]),) if size in targets else ()


def run(ctx: Context) -> list[Row]:
    sizes = ctx.sizes
    base_repo = opsrepo.generate(
        ctx.dir(f"ops-{sizes.reconcile_baseline}-baseline"), size=sizes.reconcile_baseline
    )
    baseline = _baseline(ctx, base_repo)
    per_manifest_ms = baseline.scaled(1000 / sizes.reconcile_baseline)
    loop = f"etcdctl put loop, {sizes.reconcile_baseline:,} manifests"
    rows: list[Row] = []
    results = {}
    for size in sizes.reconcile:
        repo = opsrepo.generate(ctx.dir(f"ops-{size}"), size=size)
        results[size] = _gleam(ctx, repo)
        shutil.rmtree(repo.path, ignore_errors=True)  # 100,000 manifests: 700 MB of repo
    for size in sizes.reconcile:
        measured = size == sizes.reconcile_baseline
        rows.append(
            Row(
                "reconcile",
                f"full apply, empty etcd, fresh clone, {size:,} manifests",
                "s",
                results[size].cold_apply,
                baseline if measured else per_manifest_ms.scaled(size / 1000),
                loop if measured else f"{loop}, extrapolated",
                goals=_goal(APPLY_TARGET_S, size),
            )
        )
    # One row per size, so that a cost per manifest that grows with the size shows.
    for size in sizes.reconcile:
        rows.append(
            Row(
                "reconcile",
                f"full apply per manifest, fresh clone, {size:,} manifests",
                "ms",
                results[size].cold_apply.scaled(1000 / size),
                per_manifest_ms,
                loop,
                goals=_goal(PER_MANIFEST_TARGET_MS, size),
            )
        )
    one_change = dict.fromkeys(sizes.reconcile, ONE_CHANGE_TARGET_S)
    plain: tuple[tuple[str, str, dict[int, float]], ...] = (
        ("full apply, empty etcd, checkout read before", "warm_apply", {}),
        ("--full re-check, nothing changed", "full_check", FULL_CHECK_TARGET_S),
        ("one manifest changed", "one_changed", one_change),
    )
    for case, field, targets in plain:
        for size in sizes.reconcile:
            series = getattr(results[size], field)
            rows.append(
                Row("reconcile", f"{case}, {size:,} manifests", "s", series,
                    goals=_goal(targets, size))
            )  # fmt: skip
    return rows
