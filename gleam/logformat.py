"""How log lines look, and the fields a JSON line carries.

`-log_format text` (the default) is one readable line per event. `-log_format json` is
one JSON object per line with `time`, `level`, `logger`, `message` and, where there is
one, `agent`, `key`, `revision`, `function`, `duration_ms`, `commit` (and `exception`
with the traceback). Those fields come from a log call's `extra=`, from `context` (a
thread's current task or pass: every line logged inside it, the Lua script's own
included, carries its fields), or from `set_process_fields` (the agent's id).

A `-log` file is reopened when it is moved or removed (logging's WatchedFileHandler), so
logrotate's default rename-and-create works with no signal and no copytruncate.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gleam import messages

FORMATS = ("text", "json")

# The optional fields of a JSON line, in the order they are written.
FIELDS = ("agent", "key", "revision", "function", "duration_ms", "commit")

_local = threading.local()
_process_fields: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Fields every line of this process carries (the agent's id)."""
    _process_fields.update({k: v for k, v in fields.items() if k in FIELDS})


def _stack() -> list[dict[str, Any]]:
    stack: list[dict[str, Any]] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Every line this thread logs inside the block carries `fields`."""
    stack = _stack()
    stack.append({k: v for k, v in fields.items() if k in FIELDS and v is not None})
    try:
        yield
    finally:
        stack.pop()


def add_to_context(**fields: Any) -> None:
    """Add fields to the innermost `context` block (a task's function, once it is known)."""
    stack = _stack()
    if stack:
        stack[-1].update({k: v for k, v in fields.items() if k in FIELDS and v is not None})


def current_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The optional fields for `record`: its own `extra=` first, then the thread's
    context, then the process's."""
    merged: dict[str, Any] = dict(_process_fields)
    for layer in _stack():
        merged.update(layer)
    for name in FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            merged[name] = value
    return {name: merged[name] for name in FIELDS if name in merged}


class JSONFormatter(logging.Formatter):
    """One JSON object per line. ASCII only (escapes), so that any bytes a script logs
    give a valid line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": messages.rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(current_fields(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=True, default=str)


def text_formatter(name: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s %(levelname)s {name}[%(process)d] %(name)s: %(message)s")


def formatter(kind: str | None, *, name: str) -> logging.Formatter:
    """The formatter for `-log_format`; ValueError for an unknown one."""
    kind = (kind or "text").strip().lower()
    if kind == "json":
        return JSONFormatter()
    if kind == "text":
        return text_formatter(name)
    raise ValueError(f"{kind!r} is not one of {', '.join(FORMATS)}")


def handler(path: str | None) -> logging.Handler:
    """Standard error, or the file at `path`, reopened when logrotate moves it away.
    Raises OSError when the file cannot be opened."""
    if not path:
        return logging.StreamHandler(sys.stderr)
    from logging.handlers import WatchedFileHandler  # only with -log: more than needed otherwise

    class LogFile(WatchedFileHandler):
        """Creates its file (at start and after a rotation) with mode 0640, less under a
        stricter umask: a log names hosts, keys and errors, which are not for every local
        user to read. A file that is already there keeps the mode it has."""

        def _open(self) -> io.TextIOWrapper:
            stream = open(  # noqa: SIM115 - the handler owns and closes the stream
                self.baseFilename,
                self.mode,
                encoding=self.encoding,
                errors=self.errors,
                opener=lambda name, flags: os.open(name, flags, 0o640),
            )
            assert isinstance(stream, io.TextIOWrapper)  # text mode, as FileHandler opens it
            return stream

    return LogFile(path, encoding="utf-8")
