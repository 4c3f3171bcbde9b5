"""Text and JSON for gleam-client's output. Pure: values in, strings out.

Text is for people on call: aligned columns, one row per (key, agent) so that `grep
failed` keeps the key on the line. JSON carries the same content plus a `version`
field for scripts. Colour only when the caller says the output is a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gleam import client, invalid_records, keys, messages, provenance, status
from gleam.version import VERSION

# JSON documents carry this schema version (shared with `status.SCHEMA_VERSION`).
SCHEMA_VERSION = status.SCHEMA_VERSION

_COLOURS = {
    "ok": "\033[32m",
    "failed": "\033[31m",
    "pending": "\033[33m",
    "gone": "\033[2m",
    "invalid": "\033[31m",
    "unwatched": "\033[2m",
    "no answer": "\033[31m",
}
_RESET = "\033[0m"
_VALUE_WIDTH = 120  # longer results are cut in text output (JSON has them whole)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` safe for a terminal line: control and invisible characters (a newline, an
    escape sequence that would repaint the screen, a right-to-left override) are shown
    escaped. Cells come from etcd, which anyone with write access can fill."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    paint: Callable[[str, str], str] | None = None,
) -> list[str]:
    """Left-aligned columns two spaces apart; the last column is not padded; every cell
    made `printable`. `paint(header, padded_cell)` may decorate a cell after padding
    (for colour)."""
    all_rows = [list(headers), *[[printable(cell) for cell in r] for r in rows]]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(all_rows):
        cells = []
        for i, cell in enumerate(row):
            padded = cell if i == len(row) - 1 else cell.ljust(widths[i])
            if paint is not None and n > 0:
                padded = paint(headers[i], padded)
            cells.append(padded)
        lines.append("  ".join(cells).rstrip())
    return lines


def _painter(colour: bool, column: str) -> Callable[[str, str], str] | None:
    if not colour:
        return None

    def paint(header: str, cell: str) -> str:
        code = _COLOURS.get(cell.strip())
        return f"{code}{cell}{_RESET}" if header == column and code else cell

    return paint


def age(seconds: float | None) -> str:
    """3725 -> "1h2m": the largest two units, for an `up since` column."""
    if seconds is None:
        return "?"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return "".join(shown) or "0s"


def short_json(value: Any, width: int = _VALUE_WIDTH) -> str:
    text = messages.canonical_json(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def short_commit(commit: str | None) -> str:
    return commit[:12] if commit else "-"


def commit_cell(origin: provenance.Provenance) -> str:
    """The commit; `?` for a key the reconciler owns but whose commit is unknown (changed
    since its last apply); `-` for a key it does not own (sent by hand)."""
    if origin.commit:
        return short_commit(origin.commit)
    return "?" if origin.owner else "-"


# Status ---------------------------------------------------------------------------------


def invalid_text(record: invalid_records.InvalidRecord) -> str:
    """`(invalid) KEY: why`: a record that cannot be read, named by its key."""
    return f"(invalid) {record.key}: {record.error}"


def _row_detail(row: status.AgentRow, task: status.TaskStatus) -> str:
    if row.invalid is not None:
        return invalid_text(row.invalid)
    result = row.result
    if row.state is status.RowState.GONE:
        if result is None:
            return ""
        return f"last: {'ok' if result.ok else 'failed'} at rev {result.revision}" + (
            "" if result.revision >= task.revision else " (older)"
        )
    if row.state is status.RowState.FAILED:
        return row.error_line or "failed (no error text)"
    if row.state is status.RowState.PENDING:
        return f"last ran rev {result.revision}" if result is not None else "not run yet"
    if result is not None and result.result is not None:
        return short_json(result.result, 60)
    return ""


def status_text(fleet: status.FleetStatus, *, colour: bool = False) -> str:
    head = f"prefix {fleet.prefix}  etcd revision {fleet.revision}"
    if fleet.applied_commit or fleet.applied_time:
        head += f"  reconciler applied {short_commit(fleet.applied_commit)}"
        head += f" at {fleet.applied_time}" if fleet.applied_time else ""
    lines = [head, ""]
    bad = fleet.invalid_registrations
    if fleet.agents or bad:
        lines.append(
            f"AGENTS ({len(fleet.agents)} live" + (f", {len(bad)} invalid)" if bad else ")")
        )
        lines += table(
            ["ID", "HOST", "REGIONS", "VERSION", "UP SINCE"],
            [
                *(
                    [
                        a.info.id,
                        a.info.hostname or "-",
                        ",".join(a.info.regions) or "-",
                        a.info.version or "-",
                        f"{a.info.started or '?'} (up {age(a.up_seconds)})",
                    ]
                    for a in fleet.agents
                ),
                *([r.agent, "-", "-", "-", invalid_text(r)] for r in bad),
            ],
        )
    else:
        lines.append("AGENTS: none live")
    lines.append("")
    rows: list[list[str]] = []
    for task in fleet.tasks:
        head_cells = [
            task.key,
            task.function or "(invalid)",
            str(task.revision),
            commit_cell(task.provenance),
        ]
        if not task.rows:
            rows.append([*head_cells, "-", "unwatched", "no live agent watches this key"])
        for row in task.rows:
            rows.append([*head_cells, row.agent, row.state.value, _row_detail(row, task)])
        if task.invalid and not task.rows:
            rows[-1][-1] += f"; invalid message: {task.invalid}"
    if rows:
        lines.append(f"TASKS ({len(fleet.tasks)} keys)")
        lines += table(
            ["KEY", "FUNCTION", "REV", "COMMIT", "AGENT", "STATE", "DETAIL"],
            rows,
            paint=_painter(colour, "STATE"),
        )
    else:
        lines.append("TASKS: none")
    if fleet.rollouts:
        lines += ["", f"ROLLOUTS ({len(fleet.rollouts)})"]
        lines += table(
            ["REGION", "REV", "STATE", "WAVE", "OK", "FAILED", "PENDING", "HELD", "REASON"],
            [
                [r.region, str(r.gate.revision), r.state.value, f"{r.gate.wave}/{r.gate.waves}",
                 str(r.ok), str(r.failed), str(r.pending), str(r.held), r.gate.reason or "-"]
                for r in fleet.rollouts
            ],
        )  # fmt: skip
    c = fleet.counts
    held = f", {c.held} held" if c.held else ""
    invalid = f", {c.invalid} invalid" if c.invalid else ""
    invalid += f", {len(bad)} invalid registration(s)" if bad else ""
    lines += [
        "",
        f"{c.ok} ok, {c.failed} failed, {c.pending} pending{held}, {c.gone} gone, "
        f"{c.unwatched} unwatched{invalid}",
    ]
    return "\n".join(lines)


def _result_fields(result: messages.Result | None) -> dict[str, Any]:
    if result is None:
        return {"result_revision": None, "result": None, "error": None}
    return {
        "result_revision": result.revision,
        "result": result.result,
        "error": result.error,
        "started": result.started,
        "duration_ms": result.duration_ms,
    }


def status_document(fleet: status.FleetStatus) -> dict[str, Any]:
    c = fleet.counts
    return {
        "version": SCHEMA_VERSION,
        "gleam_version": VERSION,
        "prefix": fleet.prefix,
        "revision": fleet.revision,
        "applied_commit": fleet.applied_commit,
        "applied_time": fleet.applied_time,
        "exit_code": fleet.exit_code,
        "summary": {
            "ok": c.ok,
            "failed": c.failed,
            "pending": c.pending,
            "gone": c.gone,
            "unwatched": c.unwatched,
            "held": c.held,
            "invalid": c.invalid,
            "invalid_registrations": len(fleet.invalid_registrations),
        },
        "rollouts": [
            {
                "region": r.region,
                "key": r.gate.key,
                "revision": r.gate.revision,
                "state": r.state.value,
                "wave": r.gate.wave,
                "waves": r.gate.waves,
                "ok": r.ok,
                "failed": r.failed,
                "pending": r.pending,
                "held": r.held,
                "reason": r.gate.reason,
            }
            for r in fleet.rollouts
        ],
        "agents": [
            {
                "id": a.info.id,
                "hostname": a.info.hostname,
                "pid": a.info.pid,
                "regions": list(a.info.regions),
                "version": a.info.version,
                "started": a.info.started,
                "up_seconds": a.up_seconds,
                "script_dir": a.info.script_dir,
                "invalid": None,
            }
            for a in fleet.agents
        ]
        + [_invalid_agent(r) for r in fleet.invalid_registrations],
        "tasks": [
            {
                "key": t.key,
                "target": t.target,
                "function": t.function,
                "invalid": t.invalid,
                "revision": t.revision,
                "commit": t.provenance.commit,
                "owner": t.provenance.owner,
                "state": t.state.value,
                "agents": [
                    {
                        "agent": r.agent,
                        "live": r.live,
                        "state": r.state.value,
                        "outcome": r.outcome.value,
                        "error_line": r.error_line,
                        **_result_fields(r.result),
                        "invalid": _invalid_fields(r.invalid),
                    }
                    for r in t.rows
                ],
            }
            for t in fleet.tasks
        ],
    }


def _invalid_fields(record: invalid_records.InvalidRecord | None) -> dict[str, str] | None:
    return None if record is None else {"key": record.key, "error": record.error}


def _invalid_agent(record: invalid_records.InvalidRecord) -> dict[str, Any]:
    """A registration that cannot be read, in the place of an agent: its id from the key,
    `invalid` naming the key and why."""
    return {"id": record.agent, "invalid": _invalid_fields(record)}


# Sending and waiting ----------------------------------------------------------------------


def sent_text(task_keys: Sequence[str], revision: int) -> str:
    return "\n".join(f"wrote {key} at revision {revision}" for key in task_keys)


def _report_state(report: client.Report) -> str:
    return "no answer" if report.outcome is client.Outcome.PENDING else report.outcome.value


def _report_detail(report: client.Report, timeout: float) -> str:
    result = report.result
    if report.outcome is client.Outcome.INVALID:
        return f"(invalid) {report.invalid}"
    if report.outcome is client.Outcome.PENDING:
        seen = f" (last result: rev {result.revision})" if result is not None else ""
        return f"no result for revision {report.revision} within {timeout:g}s{seen}"
    assert result is not None  # OK and FAILED always carry the result that says so
    if report.outcome is client.Outcome.FAILED:
        return status.first_line(result.error or "") or "failed (no error text)"
    return short_json(result.result)


def reports_text(
    reports: Sequence[client.Report],
    *,
    timeout: float,
    unwatched: Sequence[str] = (),
    colour: bool = False,
) -> str:
    """Per agent: ok with the result, failed with the first line of the error, or no
    answer; then one line per written key no live agent watches."""
    lines = table(
        ["AGENT", "KEY", "STATE", "RESULT / ERROR"],
        [[r.agent, r.key, _report_state(r), _report_detail(r, timeout)] for r in reports],
        paint=_painter(colour, "STATE"),
    )
    if not reports:
        lines = []
    lines += [f"{key}: no live agent watches this key" for key in unwatched]
    return "\n".join(lines)


def send_document(
    task_keys: Sequence[str],
    revision: int,
    task: messages.Task,
    *,
    reports: Sequence[client.Report] | None = None,
    unwatched: Sequence[str] = (),
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "revision": revision,
        "keys": list(task_keys),
        "name": task.name,
        "data": task.data,
    }
    if reports is not None:
        doc["reports"] = [
            {
                "agent": r.agent,
                "key": r.key,
                "revision": r.revision,
                "outcome": r.outcome.value,
                **_result_fields(r.result),
                "invalid": r.invalid,
            }
            for r in reports
        ]
        doc["unwatched"] = list(unwatched)
    return doc


# Listings (the original's info, node and region subcommands) ----------------------------


def agents_text(
    agents: Sequence[messages.AgentInfo],
    layout: keys.Layout,
    invalid: Sequence[invalid_records.InvalidRecord] = (),
) -> str:
    """One line per live agent: its registration key and the registration as JSON; then
    one per registration that cannot be read: its key and `(invalid) why`."""
    rows = [[layout.info_key(a.id), messages.canonical_json(_info_dict(a))] for a in agents]
    rows += [[r.key, f"(invalid) {r.error}"] for r in invalid]
    return "\n".join(table(["KEY", "REGISTRATION"], rows) if rows else [])


def _info_dict(info: messages.AgentInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "hostname": info.hostname,
        "pid": info.pid,
        "regions": list(info.regions),
        "version": info.version,
        "started": info.started,
        "script_dir": info.script_dir,
    }


def agents_document(
    agents: Sequence[messages.AgentInfo], invalid: Sequence[invalid_records.InvalidRecord] = ()
) -> dict[str, Any]:
    return {
        "version": SCHEMA_VERSION,
        "agents": [{**_info_dict(a), "invalid": None} for a in agents]
        + [_invalid_agent(r) for r in invalid],
    }


def _value_text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def tasks_text(entries: Sequence[client.TaskEntry]) -> str:
    """One line per task key: key, revision, stored value."""
    if not entries:
        return ""
    return "\n".join(
        table(
            ["KEY", "REV", "VALUE"],
            [[e.key, str(e.revision), _value_text(e.value)] for e in entries],
        )
    )


def tasks_document(entries: Sequence[client.TaskEntry]) -> dict[str, Any]:
    tasks = []
    for e in entries:
        item: dict[str, Any] = {"key": e.key, "target": e.target.path, "revision": e.revision}
        try:
            task = e.decode()
            item.update(name=task.name, data=task.data, invalid=None)
        except messages.MessageError as exc:
            item.update(name=None, data=None, invalid=str(exc), value=_value_text(e.value))
        tasks.append(item)
    return {"version": SCHEMA_VERSION, "tasks": tasks}


def to_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=False, ensure_ascii=False)
