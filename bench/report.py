"""The results table: rows with targets, the machine's details, and RESULTS.md.

Rows and goals are plain values; rendering is pure. Only `machine_details` and
`write` touch the system.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from bench.stats import Series


class Better(StrEnum):
    LOWER = "lower"  # times, memory
    HIGHER = "higher"  # rates


class GoalKind(StrEnum):
    AT_MOST = "at_most"
    AT_LEAST = "at_least"
    # Gleam's advantage over the baseline (see Row.advantage) at least this factor.
    ADVANTAGE = "advantage"


class Stat(StrEnum):
    MEDIAN = "median"
    MAX = "max"


@dataclass(frozen=True)
class Goal:
    kind: GoalKind
    limit: float
    # Which summary of the series the target applies to: the median, or the worst
    # value ("every agent under 40 MB").
    stat: Stat = Stat.MEDIAN

    @classmethod
    def at_most(cls, limit: float, *, stat: Stat = Stat.MEDIAN) -> Goal:
        return cls(GoalKind.AT_MOST, limit, stat)

    @classmethod
    def at_least(cls, limit: float) -> Goal:
        return cls(GoalKind.AT_LEAST, limit)

    @classmethod
    def advantage(cls, factor: float) -> Goal:
        return cls(GoalKind.ADVANTAGE, factor)

    def met(self, row: Row) -> bool | None:
        """True or False, or None when the row has no numbers to judge."""
        if row.gleam is None:
            return None
        if self.kind is GoalKind.ADVANTAGE:
            advantage = row.advantage
            return None if advantage is None else advantage >= self.limit
        value = row.gleam.high if self.stat is Stat.MAX else row.gleam.median
        if self.kind is GoalKind.AT_MOST:
            return value <= self.limit
        return value >= self.limit

    def describe(self, unit: str) -> str:
        if self.kind is GoalKind.ADVANTAGE:
            return f"≥ {self.limit:,g}× baseline"
        sign = "≤" if self.kind is GoalKind.AT_MOST else "≥"
        who = "max " if self.stat is Stat.MAX else ""
        return f"{who}{sign} {self.limit:,g} {unit}"


@dataclass(frozen=True)
class Row:
    """One line of the table: a measured quantity for Gleam, and the plain alternative's
    value for the same quantity when there is one."""

    workload: str
    case: str
    unit: str
    gleam: Series | None
    baseline: Series | None = None
    baseline_label: str = ""
    better: Better = Better.LOWER
    goals: tuple[Goal, ...] = ()
    # What one value of the series is: "run of 500 tasks", "agent", "commit".
    per: str = "run"
    note: str = ""
    error: str | None = None

    @property
    def advantage(self) -> float | None:
        """How many times better Gleam is than the baseline (> 1: Gleam wins): baseline
        over Gleam for times and memory, Gleam over baseline for rates."""
        if self.gleam is None or self.baseline is None:
            return None
        g, b = self.gleam.median, self.baseline.median
        if self.better is Better.LOWER:
            return b / g if g > 0 else None
        return g / b if b > 0 else None

    def verdict(self) -> bool | None:
        """All goals met (True), any missed (False), nothing to judge (None)."""
        results = [goal.met(self) for goal in self.goals]
        if False in results:
            return False
        if not results or None in results:
            return None
        return True


def number(value: float) -> str:
    """Three significant figures without scientific notation; thousands separated."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude == 0:
        return "0"
    return f"{value:#.3g}"


def cell(series: Series | None) -> str:
    if series is None:
        return "—"
    if len(series) == 1:
        return number(series.median)
    return f"{number(series.median)} ({number(series.low)}–{number(series.high)})"


def _verdict_text(row: Row) -> str:
    if row.error:
        return "**error**"
    verdict = row.verdict()
    if verdict is None:
        return "—"
    return "yes" if verdict else "**no**"


HEADER = (
    "| Workload | Case | Unit | Gleam: median (min–max) | n | Baseline: median (min–max) "
    "| Gleam's advantage | Target | Met |"
)
RULE = "|---|---|---|---:|---:|---:|---:|---|---|"


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (it reads as plain text in a terminal too)."""
    lines = [HEADER, RULE]
    for row in rows:
        if row.error:
            # The first line only, and no pipe that would split the Markdown cell.
            gleam = "error: " + row.error.splitlines()[0][:160].replace("|", "\\|")
        else:
            gleam = cell(row.gleam)
        n = f"{len(row.gleam)} {row.per}{'s' if len(row.gleam) != 1 else ''}" if row.gleam else ""
        baseline = cell(row.baseline)
        if (
            row.baseline is not None
            and row.gleam is not None
            and len(row.baseline) != len(row.gleam)
        ):
            baseline = f"{baseline} [{len(row.baseline)}]"
        if row.baseline is not None and row.baseline_label:
            baseline = f"{baseline}: {row.baseline_label}"
        advantage = row.advantage
        adv = "—" if advantage is None else f"{number(advantage)}×"
        target = "; ".join(goal.describe(row.unit) for goal in row.goals) or "—"
        case = f"{row.case} ({row.note})" if row.note else row.case
        lines.append(
            f"| {row.workload} | {case} | {row.unit} | {gleam} | {n} | {baseline} | {adv} "
            f"| {target} | {_verdict_text(row)} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    memory_gib: float
    system: str
    python: str
    etcd: str
    etcdctl: str


@dataclass(frozen=True)
class RunInfo:
    started: str
    finished: str
    command: str
    mode: str
    reps: int
    commit: str
    load_before: str
    load_after: str
    machine: Machine
    methods: tuple[tuple[str, str], ...] = field(default=())
    # Hand-written profiling notes for missed targets, linked when present.
    notes: str | None = None


def document(info: RunInfo, rows: Sequence[Row]) -> str:
    """RESULTS.md: what ran where, the table, and how each number was measured."""
    m = info.machine
    missed = [r for r in rows if r.verdict() is False or r.error]
    met = [r for r in rows if r.verdict() is True]
    parts = [
        "# Gleam benchmarks",
        "",
        f"Generated by `{info.command}` ({info.mode} sizes, {info.reps} repetitions) "
        f"from commit `{info.commit}`, {info.started} to {info.finished}.",
        "Every workload runs against a real etcd (started for the run on loopback, default "
        "settings, data on local disk) with real subprocesses, and runs its plain "
        "alternative (the baseline) in the same run.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m.cpu} |",
        f"| Cores | {m.cores} |",
        f"| Memory | {m.memory_gib:.1f} GiB |",
        f"| System | {m.system} |",
        f"| Python | {m.python} |",
        f"| etcd | {m.etcd} (etcdctl {m.etcdctl}) |",
        f"| Load average (1, 5, 15 min) | before: {info.load_before}; after: {info.load_after} |",
        "",
        "## Results",
        "",
        f"Targets met: {len(met)}; missed or failed: {len(missed)}. "
        "Each cell is the median with the min–max spread over the n values named in "
        "its row; a baseline measured a different number of times gives its count in "
        'brackets. "Gleam\'s advantage" is baseline ÷ Gleam for times and memory and '
        "Gleam ÷ baseline for rates: above 1, Gleam is better.",
        "",
        table(rows),
        "",
    ]
    if info.notes:
        parts += [
            f"Why targets were missed, with profiles and suggested fixes: [{info.notes}]"
            f"({info.notes}).",
            "",
        ]
    if info.methods:
        parts += ["## How each number is measured", ""]
        for title, text in info.methods:
            parts += [f"### {title}", "", text.strip(), ""]
    return "\n".join(parts)


# --- the system -------------------------------------------------------------------------


def _first_match(pattern: str, text: str, default: str = "unknown") -> str:
    found = re.search(pattern, text, re.MULTILINE)
    return found.group(1).strip() if found else default


def _run_text(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return ""


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine_details(*, etcd_binary: str, etcdctl_binary: str) -> Machine:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        cpuinfo = meminfo = ""
    mem_kib = float(_first_match(r"^MemTotal:\s+(\d+)", meminfo, "0"))
    return Machine(
        cpu=_first_match(r"^model name\s*:\s*(.+)$", cpuinfo, platform.processor() or "unknown"),
        cores=os.cpu_count() or 0,
        memory_gib=mem_kib / 1024 / 1024,
        system=f"{platform.system()} {platform.release()}",
        python=f"{platform.python_implementation()} {platform.python_version()}",
        etcd=_first_match(r"^etcd Version:\s*(\S+)", _run_text([etcd_binary, "--version"])),
        etcdctl=_first_match(r"^etcdctl version:\s*(\S+)", _run_text([etcdctl_binary, "version"])),
    )


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
