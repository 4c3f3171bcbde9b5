"""Plans, results, errors and wait reports as text for people and JSON for machines.
Pure: values in, strings out."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gleam import client, messages
from gleam import client_render as gleam_render
from reconciler import diff, manifests, reconcile

JSON_VERSION = 1
SYMBOLS = {
    diff.Action.CREATE: "+",
    diff.Action.UPDATE: "~",
    diff.Action.DELETE: "-",
    diff.Action.ADOPT: "=",
    diff.Action.FORGET: "-",
}
SHOWN_ORPHANS = 5


def _short(value: Any, width: int = 70) -> str:
    text = messages.canonical_json(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _field_line(change: diff.FieldChange) -> str:
    # Paths and old values come from etcd too (a value written by hand): shown escaped.
    if change.added:
        line = f"{change.path}: (added) {_short(change.new)}"
    elif change.removed:
        line = f"{change.path}: {_short(change.old)} (removed)"
    else:
        line = f"{change.path}: {_short(change.old)} -> {_short(change.new)}"
    return gleam_render.printable(line)


def _name(change: diff.Change, known: Mapping[str, manifests.Manifest] | None = None) -> str:
    """The function name of the change's new value (its old one for a delete). A value
    that is the key's manifest's own bytes gives the name the parse found, without
    decoding the message again; any other value is decoded."""
    raw = change.new if change.new is not None else change.old
    if raw is None:
        return ""
    manifest = known.get(change.key) if known is not None else None
    if manifest is not None and manifest.name is not None and _written_from(raw, manifest.value):
        return manifest.name
    try:
        return messages.decode_task(raw).name
    except messages.MessageError:
        return "(not a task message)"


def _written_from(raw: bytes, value: bytes) -> bool:
    """Whether `raw` is the manifest's message `value` as this pass wrote it: the same
    bytes, or signed (-sign_key: the same bytes with `,"Sig":{...}` before the closing
    brace, as gleam.signing.sign_encoded makes them; the pass made `raw` itself, so the
    name the parse found is its name)."""
    return raw == value or (
        raw.startswith(value[:-1]) and raw[len(value) - 1 :].startswith(b',"Sig":')
    )


def _commit(result: reconcile.Pass) -> str:
    d = result.desired
    if d.source == "worktree":
        return "the work tree" + (f" (on {d.commit[:12]})" if d.commit else "")
    return f"commit {d.commit[:12]}" if d.commit else "HEAD"


def change_lines(
    change: diff.Change, known: Mapping[str, manifests.Manifest] | None = None
) -> list[str]:
    """A change as lines; `known` is the pass's manifests by key (see _name)."""
    symbol = SYMBOLS[change.action]
    name = _name(change, known)
    if change.action is diff.Action.ADOPT:
        return [f"{symbol} {change.key}  {name}  (already as wanted; now owned)"]
    if change.action is diff.Action.FORGET:
        return [f"{symbol} {change.key}  (already gone; ownership record dropped)"]
    head = f"{symbol} {change.key}  {name}".rstrip()
    if change.action is diff.Action.UPDATE:
        suffix = "" if change.owned else "  (written by hand before; now owned)"
        return [head + suffix] + [
            f"    {_field_line(f)}" for f in diff.describe(change.old, change.new)
        ]
    return [head]


def _counts(changes: Sequence[diff.Change]) -> dict[str, int]:
    out = {a.value: 0 for a in diff.Action}
    for c in changes:
        out[c.action.value] += 1
    return out


def summary(result: reconcile.Pass) -> str:
    counts = _counts(result.changes)
    d = result.desired
    scope = f"{d.mode} pass, {d.total} manifest(s)"
    if not result.changes:
        verb = "Nothing to do" if result.dry_run else "No changes"
        return f"{verb}: etcd matches {_commit(result)} ({scope})."
    parts = [
        f"{counts['create']} {'to create' if result.dry_run else 'created'}",
        f"{counts['update']} {'to update' if result.dry_run else 'updated'}",
        f"{counts['delete'] + counts['forget']} {'to delete' if result.dry_run else 'deleted'}",
    ]
    if counts["adopt"]:
        parts.append(f"{counts['adopt']} {'to adopt' if result.dry_run else 'adopted'}")
    parts.append(f"{result.plan.unchanged} unchanged")
    head = "Plan for" if result.dry_run else "Applied"
    tail = " Dry run: nothing written." if result.dry_run else ""
    replans = f", re-planned {result.replans}x" if result.replans else ""
    return f"{head} {_commit(result)}: {', '.join(parts)} ({scope}{replans}).{tail}"


def text(result: reconcile.Pass) -> str:
    lines: list[str] = []
    known = result.desired.entries
    for change in result.changes:
        lines += change_lines(change, known)
    lines.append(summary(result))
    orphans = result.plan.orphans
    if orphans:
        shown = ", ".join(orphans[:SHOWN_ORPHANS]) + (
            ", ..." if len(orphans) > SHOWN_ORPHANS else ""
        )
        lines.append(
            f"{len(orphans)} owned key(s) have no manifest any more and were kept "
            f"(--prune deletes them): {shown}"
        )
    return "\n".join(lines)


def change_json(
    change: diff.Change,
    revision: int | None,
    known: Mapping[str, manifests.Manifest] | None = None,
) -> dict[str, Any]:
    name = _name(change, known)
    out: dict[str, Any] = {"action": change.action.value, "key": change.key, "name": name}
    if change.action is diff.Action.UPDATE:
        out["fields"] = [
            {"path": f.path, "old": f.old, "new": f.new, "added": f.added, "removed": f.removed}
            for f in diff.describe(change.old, change.new)
        ]
        out["was_owned"] = change.owned
    if revision is not None:
        out["revision"] = revision
    return out


def as_json(
    result: reconcile.Pass, *, reports: Sequence[client.Report] | None = None, ok: bool = True
) -> dict[str, Any]:
    d = result.desired
    previous = result.previous.commit if result.previous else None
    return {
        "version": JSON_VERSION,
        "ok": ok,
        "dry_run": result.dry_run,
        "source": d.source,
        "commit": d.commit,
        "previous_commit": previous,
        "mode": d.mode,
        "manifests": d.total,
        "digest": d.digest,
        "changes": [change_json(c, result.revisions.get(c.key), d.entries) for c in result.changes],
        "summary": {**_counts(result.changes), "unchanged": result.plan.unchanged},
        "orphans": list(result.plan.orphans),
        "replans": result.replans,
        "recorded": result.recorded,
        "wait": None if reports is None else [report_json(r) for r in reports],
    }


def errors_json(errors: Sequence[manifests.ManifestError]) -> dict[str, Any]:
    return {
        "version": JSON_VERSION,
        "ok": False,
        "errors": [{"file": e.path, "line": e.line, "message": e.message} for e in errors],
    }


def failure_json(message: str) -> dict[str, Any]:
    return {"version": JSON_VERSION, "ok": False, "error": message}


def dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False)


# --wait ----------------------------------------------------------------------------------


def report_json(report: client.Report) -> dict[str, Any]:
    return {
        "agent": report.agent,
        "key": report.key,
        "revision": report.revision,
        "outcome": report.outcome.value,
        "error": report.error,
        "result": report.result.result if report.result is not None else None,
        "invalid": report.invalid,
    }


def report_lines(
    reports: Sequence[client.Report], *, timeout: float, written: int = 1
) -> list[str]:
    if not written:
        return ["--wait: nothing was written, so there is nothing to wait for."]
    if not reports:
        return ["--wait: no live agent watches the changed keys."]
    lines = []
    for r in reports:
        if r.outcome is client.Outcome.OK:
            lines.append(f"ok      {r.agent}  {r.key} @{r.revision}")
        elif r.outcome is client.Outcome.FAILED:
            lines.append(f"failed  {r.agent}  {r.key} @{r.revision}: {r.error or 'failed'}")
        elif r.outcome is client.Outcome.INVALID:
            lines.append(f"invalid {r.agent}  {r.key} @{r.revision}: (invalid) {r.invalid}")
        else:
            lines.append(f"no answer in {timeout:g}s  {r.agent}  {r.key} @{r.revision}")
    ok = sum(1 for r in reports if r.outcome is client.Outcome.OK)
    lines.append(f"--wait: {ok} of {len(reports)} agent result(s) ok.")
    return lines
