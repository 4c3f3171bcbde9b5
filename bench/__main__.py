"""`python -m bench [--quick] [--only NAME] [--reps N]`: run the benchmarks, print the
table, and (for a complete full-size run, or with --out) write it to a Markdown file."""

from __future__ import annotations

import argparse
import compileall
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

from bench import (
    commit_to_exec,
    dispatch,
    fanout,
    fleet,
    harness,
    reconcile,
    report,
    rollout,
    signing,
    throughput,
)
from bench.processes import ROOT, BenchError, etcdctl_binary
from gleam import connection
from gleam.embedded import EtcdServer, find_etcd

WORKLOADS: dict[str, ModuleType] = {
    "reconcile": reconcile,
    "dispatch": dispatch,
    "fanout": fanout,
    "throughput": throughput,
    "commit": commit_to_exec,
    "signing": signing,
    "fleet": fleet,
    "rollout": rollout,
}
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PROFILE = RESULTS.with_name("PROFILE.md")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run Gleam's benchmarks against a real etcd, each beside its baseline.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes for a fast look (under a minute)"
    )
    parser.add_argument(
        "--sizes", choices=sorted(harness.PROFILES), help="size profile (default: full)"
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(WORKLOADS), metavar="NAME",
        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}",
    )  # fmt: skip
    parser.add_argument("--reps", type=int, help="repetitions per measurement")
    parser.add_argument(
        "--agents", type=int, metavar="N",
        help="agents in the large-fleet workload (default: 300 full, 30 quick)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path,
        help=f"write the results here (default: {RESULTS.relative_to(ROOT)} after a full "
        "run of every workload; nowhere otherwise)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work directory (repos, logs)")
    parser.add_argument(
        "--metrics", action="store_true",
        help="start every agent with -metrics 127.0.0.1:0 (compare with a run without)",
    )  # fmt: skip
    parser.add_argument(
        "--agent-arg", action="append", default=[], metavar="ARG",
        help="one more argument for every agent the workloads start (repeatable)",
    )  # fmt: skip
    return parser


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    sha = done.stdout.strip() or "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return f"{sha}{' + local changes' if dirty else ''}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_workloads(
    ctx: harness.Context, names: Sequence[str], *, progress: Callable[[str], None]
) -> list[report.Row]:
    """Run each named workload; a failure becomes an error row, the others still run."""
    rows: list[report.Row] = []
    for name in names:
        module = WORKLOADS[name]
        progress(f"== {name}: {module.TITLE}")
        started = time.perf_counter()
        try:
            new_rows = module.run(ctx)
        except (BenchError, Exception) as exc:  # noqa: BLE001 - reported in the table
            detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc()
            progress(f"   failed: {detail}")
            new_rows = [report.Row(name, "workload failed", "", None, error=str(exc) or repr(exc))]
        if ctx.agent_args and name != "reconcile":
            # Say in the table which agent flags this run measured.
            flags = " ".join(ctx.agent_args)
            new_rows = [replace(row, case=f"{row.case} (agents: {flags})") for row in new_rows]
        for row in new_rows:
            progress("   " + report.table([row]).splitlines()[-1])
        progress(f"   ({time.perf_counter() - started:.0f} s)")
        rows += new_rows
    return rows


def _byte_compile() -> None:
    """Gleam's own modules compiled to bytecode, as an installed package's are (pip
    compiles them at install time). An editable install writes them on first import,
    but not where PYTHONDONTWRITEBYTECODE is set (some CI images and sandboxes set it):
    every process measured would then compile the sources again, some 30 ms each."""
    root = Path(__file__).resolve().parent.parent
    for package in ("gleam", "agent", "reconciler"):
        compileall.compile_dir(root / package, quiet=1)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = harness.PROFILES[args.sizes or ("quick" if args.quick else "full")]
    if args.agents is not None:
        if args.agents < 1:
            _parser().error("--agents must be at least 1")
        sizes = replace(sizes, fleet_agents=args.agents)
    reps = args.reps or sizes.reps
    names = args.only or list(WORKLOADS)
    out: Path | None = args.out
    if out is None and sizes.name == harness.FULL.name and not args.only:
        out = RESULTS

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="gleam-bench-"))
    progress(f"work directory: {workdir}")
    _byte_compile()
    started, load_before = _now(), report.load_average()
    (workdir / "etcd").mkdir()
    server = EtcdServer(data_dir=str(workdir / "etcd"))
    try:
        server.start()
        etcd = connection.connect(connection.make_settings(server.endpoint))
        agent_args = (*(["-metrics", "127.0.0.1:0"] if args.metrics else []), *args.agent_arg)
        ctx = harness.Context(
            server.endpoint,
            etcd,
            workdir,
            sizes,
            reps,
            agent_args=tuple(agent_args),
            etcd_pid=server.proc.pid if server.proc else None,
        )
        try:
            rows = run_workloads(ctx, names, progress=progress)
        finally:
            etcd.close()
    finally:
        server.close()
    failed = any(row.error for row in rows)
    if args.keep or failed:
        progress(f"kept the work directory (repos, logs): {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    info = report.RunInfo(
        started=started,
        finished=_now(),
        command=" ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        mode=sizes.name,
        reps=reps,
        commit=_commit(),
        load_before=load_before,
        load_after=report.load_average(),
        machine=report.machine_details(etcd_binary=find_etcd(), etcdctl_binary=etcdctl_binary()),
        methods=tuple((WORKLOADS[n].TITLE, WORKLOADS[n].METHOD) for n in names),
        notes=PROFILE.name if PROFILE.is_file() else None,
    )
    print(report.table(rows))
    if out is not None:
        report.write(out, report.document(info, rows))
        progress(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
