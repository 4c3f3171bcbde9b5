"""The benchmarks keep working: each workload runs at tiny sizes, as `python -m bench`
runs it (real etcd, real agent and reconciler subprocesses), and writes its table.
No timing is asserted here; speed targets are judged by the benchmark run itself."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.report import Better, Goal, Row, Stat
from bench.stats import Series, percentile

ROOT = Path(__file__).resolve().parent.parent

# Workload name on the command line -> its label in the table.
WORKLOADS = {
    "reconcile": "reconcile",
    "dispatch": "dispatch",
    "fanout": "fan-out",
    "throughput": "throughput",
    "commit": "commit → exec",
    "signing": "signing",
    "fleet": "fleet",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_bench_workload_runs_at_smoke_size_and_writes_its_rows(name: str, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    argv = [sys.executable, "-m", "bench", "--sizes", "smoke", "--reps", "1", "--only", name]
    done = subprocess.run(
        [*argv, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=150
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text(encoding="utf-8")
    assert "## Machine" in text and "| Cores |" in text and "| etcd |" in text
    rows = [line for line in text.splitlines() if line.startswith(f"| {WORKLOADS[name]} |")]
    assert rows, text
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        gleam = cells[3].split()[0].replace(",", "")
        assert math.isfinite(float(gleam)), line
        assert "error" not in line


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    with pytest.raises(ValueError):
        percentile([], 50)


@pytest.mark.parametrize(
    ("gleam", "baseline", "better", "goal", "met"),
    [
        ((1.0, 3.0, 2.0), None, Better.LOWER, Goal.at_most(2.0), True),
        ((1.0, 3.0, 2.5), None, Better.LOWER, Goal.at_most(2.0), False),
        ((10.0, 50.0), None, Better.LOWER, Goal.at_most(40.0, stat=Stat.MAX), False),
        ((1200.0,), (600.0,), Better.HIGHER, Goal.at_least(1000), True),
        ((1200.0,), (600.0,), Better.HIGHER, Goal.advantage(2.0), True),
        ((0.02,), (1.0,), Better.LOWER, Goal.advantage(100), False),
        ((0.01,), (1.0,), Better.LOWER, Goal.advantage(100), True),
    ],
)
def test_goal_verdicts(
    gleam: tuple[float, ...],
    baseline: tuple[float, ...] | None,
    better: Better,
    goal: Goal,
    met: bool,
) -> None:
    row = Row(
        "w", "case", "s", Series(gleam), Series(baseline) if baseline else None,
        better=better, goals=(goal,),
    )  # fmt: skip
    assert row.verdict() is met


def test_table_shows_median_spread_ratio_and_errors() -> None:
    rows = [
        Row("w", "fast", "s", Series((1.0, 2.0, 4.0)), Series((20.0,)), "loop",
            goals=(Goal.at_most(3.0),)),
        Row("w", "broken", "", None, error="agent exited with 1\ntraceback..."),
    ]  # fmt: skip
    text = report.table(rows)
    assert "| 2.00 (1.00–4.00) | 3 runs | 20.0 [1]: loop | 10.0× | ≤ 3 s | yes |" in text
    assert "error: agent exited with 1 |" in text and "**error**" in text


@pytest.mark.slow
def test_bench_metrics_variant_starts_agents_with_metrics_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    argv = [sys.executable, "-m", "bench", "--sizes", "smoke", "--reps", "1", "--only", "dispatch"]
    done = subprocess.run(
        [*argv, "--metrics", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| dispatch |")]
    assert rows and all("(agents: -metrics 127.0.0.1:0)" in line for line in rows)
