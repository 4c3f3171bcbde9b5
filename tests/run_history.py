"""What agents ran, from their own logs, checked against the result records in etcd.

The agent logs every run ("running NAME from KEY at revision N", or "KEY at revision N:
bad task message"). After the faults have healed, each result record must name the
revision its agent last ran for that key: never an older one (a late write that undid a
newer result), never one it did not run. Used by the fault tests and the fault soak."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gleam import keys, messages

_RUN = re.compile(
    r"running \S+ from (?P<key>\S+) at revision (?P<rev>\d+)\b"
    r"|(?P<bad>\S+) at revision (?P<badrev>\d+): bad task message"
)


def runs(log_text: str) -> list[tuple[str, int]]:
    """Pure: (task key, revision) of every run in one agent process's log, in order."""
    found = []
    for line in log_text.splitlines():
        match = _RUN.search(line)
        if match is None:
            continue
        if match["key"] is not None:
            found.append((match["key"], int(match["rev"])))
        else:
            found.append((match["bad"], int(match["badrev"])))
    return found


def last_runs(logs: Iterable[str]) -> dict[str, int]:
    """Pure: task key -> the revision last run, over one agent's process logs in order."""
    last: dict[str, int] = {}
    for text in logs:
        for key, revision in runs(text):
            last[key] = revision
    return last


def duplicates(log_text: str) -> list[tuple[str, int]]:
    """Pure: runs of one (key, revision) more than once in one process (never allowed)."""
    counts = Counter(runs(log_text))
    return sorted(run for run, n in counts.items() if n > 1)


@dataclass(frozen=True)
class Mismatch:
    key: str
    ran: int
    recorded: int | None


def mismatches(last: Mapping[str, int], recorded: Mapping[str, int]) -> list[Mismatch]:
    """Pure: task keys whose record does not name the revision last run."""
    return [
        Mismatch(key, ran, recorded.get(key))
        for key, ran in sorted(last.items())
        if recorded.get(key) != ran
    ]


def recorded(etcd: Any, layout: keys.Layout, agent_id: str) -> dict[str, int]:
    """Task key -> the revision named by this agent's result record for it."""
    found = {}
    for value, meta in etcd.get_prefix(layout.agent_results_prefix(agent_id)):
        parsed = layout.parse_result_key(meta.key.decode())
        if parsed is not None:
            found[layout.task_key(parsed[1])] = messages.decode_result(value).revision
    return found


def check(etcd: Any, layout: keys.Layout, agent_id: str, logs: Sequence[str]) -> list[Mismatch]:
    return mismatches(last_runs(logs), recorded(etcd, layout, agent_id))
