"""The wire format: task messages, results and agent registrations as JSON.

Task messages keep the original's shape, `{"Name": ..., "Data": ...}`. Results and
registrations are JSON objects with lower-case keys. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeAlias

from gleam import keys

# JSON values as Python sees them after json.loads.
JSON: TypeAlias = None | bool | int | float | str | list[Any] | dict[str, Any]

# etcd refuses requests over 1.5 MiB by default; a task message is capped below that so
# that a message, its result and the transaction around it always fit.
MAX_MESSAGE_BYTES = 1024 * 1024

# Arrays and objects nested inside a task's data (or a result's value): the agent's Lua
# results have the same cap. Deeper values would reach Python's recursion limit in the
# encoder, the diff or the renderers, so every decoder and the encoder refuse them.
MAX_DEPTH = 200

# Python refuses to turn longer digit strings into an int (sys.get_int_max_str_digits);
# json.loads then raises a plain ValueError, which is turned into a MessageError here.
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300


class MessageError(ValueError):
    """A value that is not a valid Gleam message; the text says why."""


# One encoder for every call: json.dumps with options builds a new one each time, which
# costs a third of encoding a small message (signing and checking encode one per task).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# Task.encode's: canonical, and NaN and infinity refused.
_TASK_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: the same value always gives the same bytes."""
    return _CANONICAL.encode(value)


class _Refused(Exception):
    """Raised from inside json.loads by the hooks below; carries the reason."""


def _no_constant(word: str) -> NoReturn:
    raise _Refused(f"holds {word}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"holds the number {_clip(text)}, too large for a float")
    return value


def _clip(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): only then can a decoded string hold
# a lone surrogate, which cannot be encoded as UTF-8 (printing it, or writing it to etcd
# or to Lua, would fail far from here).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_TOO_DEEP = f"is nested deeper than {MAX_DEPTH} levels"


def _tree_problem(value: Any, *, start: int, surrogates: bool) -> str | None:
    """Why a JSON value is unusable (more than MAX_DEPTH arrays and objects nested, the
    value itself being at depth `start`: -1 for a record whose fields hold the data, 0
    for the data; or, when `surrogates`, a lone surrogate in a string), or None.
    Iterative: a deep value must not hit the recursion limit here either."""
    stack: list[tuple[Any, int]] = [(value, start)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_DEPTH:
                return _TOO_DEEP
            if surrogates and any(_SURROGATE.search(k) for k in item):
                return "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                return _TOO_DEEP
            stack.extend((v, depth + 1) for v in item)
        elif surrogates and isinstance(item, str) and _SURROGATE.search(item):
            return "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
    return None


def _could_nest(raw: bytes) -> bool:
    """False when `raw` cannot hold more than MAX_DEPTH arrays and objects nested: it has
    no more brackets than that (counted in C, so that most values skip the walk)."""
    return raw.count(b"[") + raw.count(b"{") > MAX_DEPTH


def load_json(raw: bytes | str, *, what: str) -> Any:
    """Strict JSON: any input gives a value or a MessageError, never another exception.
    Refused: invalid UTF-8, lone surrogates, NaN and Infinity (and numbers that overflow
    to them), integers longer than MAX_INT_DIGITS, and data (the values inside the
    record's object) nested more than MAX_DEPTH deep."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError(f"{what} holds a lone UTF-16 surrogate, which is not text") from None
    try:
        value = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float
        )
    except UnicodeDecodeError as exc:
        raise MessageError(f"{what} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MessageError(f"{what} is not JSON: {exc}") from None
    except _Refused as exc:
        raise MessageError(f"{what} {exc}") from None
    except RecursionError:
        raise MessageError(f"{what} {_TOO_DEEP}") from None
    except MemoryError:
        raise MessageError(f"{what} is too large to decode") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise MessageError(
                f"{what} holds an integer of more than {MAX_INT_DIGITS} digits"
            ) from None
        raise MessageError(f"{what} is not usable JSON: {exc}") from None
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    if surrogates or _could_nest(raw):
        problem = _tree_problem(value, start=-1, surrogates=surrogates)
        if problem is not None:
            raise MessageError(f"{what} {problem}")
    return value


@dataclass(frozen=True)
class Task:
    """A function to run and the data to give it."""

    name: str
    data: JSON = None
    # The normalised rollout section of a staged region task (gleam.rollout), or None.
    rollout: dict[str, Any] | None = None

    def encode(self) -> bytes:
        """The canonical message bytes, as the reconciler and the client write them.
        Raises MessageError for data that decode_task would refuse (so nothing that
        agents reject is ever written): NaN or infinity, a lone surrogate, an integer
        past MAX_INT_DIGITS, nesting past MAX_DEPTH, a value that holds itself, or a
        message over MAX_MESSAGE_BYTES."""
        keys.validate_function(self.name)
        doc: dict[str, Any] = {"Name": self.name, "Data": self.data}
        if self.rollout is not None:
            doc["Rollout"] = self.rollout
        try:
            raw = _TASK_ENCODER.encode(doc).encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError(
                "task data holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
            ) from None
        except RecursionError:
            raise MessageError(f"task data {_TOO_DEEP}") from None
        except (TypeError, ValueError) as exc:
            raise MessageError(f"task data {_unencodable(exc)}") from None
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageError(
                f"task message is {len(raw)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"
            )
        if _could_nest(raw):
            problem = _tree_problem(self.data, start=0, surrogates=False)
            if problem is not None:
                raise MessageError(f"task data {problem}")
        return raw


def _unencodable(exc: Exception) -> str:
    """Why json.dumps refused a value, in words."""
    text = str(exc)
    if "Out of range float" in text:
        return "holds NaN or infinity (.nan or .inf in YAML), which is not JSON"
    if "integer string conversion" in text:
        return f"holds an integer of more than {MAX_INT_DIGITS} digits"
    if "Circular reference" in text:
        return "holds itself (a value that contains itself cannot be JSON)"
    return f"is not JSON-serialisable: {text}"


def decode_task(raw: bytes | str) -> Task:
    """Parse a task message; any bytes give a Task or a MessageError, never a crash."""
    return decode_task_message(raw)[0]


def decode_task_message(raw: bytes | str) -> tuple[Task, dict[str, Any]]:
    """`decode_task`, and the decoded message object with the fields a Task does not
    hold (an agent with -trust checks its "Sig" without decoding the bytes again)."""
    size = len(raw)
    if size > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    if not raw.strip():
        raise MessageError("message is empty")
    value = load_json(raw, what="message")
    if value is None:
        raise MessageError('message is JSON null, not an object {"Name": ..., "Data": ...}')
    if not isinstance(value, dict):
        raise MessageError(
            f'message is a JSON {_json_type(value)}, not an object {{"Name": ..., "Data": ...}}'
        )
    if "Name" not in value:
        raise MessageError('message has no "Name"')
    name = value["Name"]
    if not isinstance(name, str):
        raise MessageError(f'message "Name" is a JSON {_json_type(name)}, not a string')
    try:
        keys.validate_function(name)
    except keys.InvalidName as exc:
        raise MessageError(str(exc)) from None
    rollout = value.get("Rollout")
    task = Task(
        name=name, data=value.get("Data"), rollout=rollout if isinstance(rollout, dict) else None
    )
    return task, value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _Record:
    """A record written as canonical JSON of its fields (subclasses are dataclasses)."""

    def encode(self) -> bytes:
        fields: Any = self  # a dataclass instance; mypy cannot see that from here
        return canonical_json(asdict(fields)).encode("utf-8")


@dataclass(frozen=True)
class Result(_Record):
    """What one agent recorded after running one task key's value.

    `revision` is the task key's mod_revision that ran; it is how the agent knows at
    start-up what it has already done, and how waiters match a result to a write.
    """

    agent: str
    key: str
    revision: int
    name: str | None
    ok: bool
    result: JSON = None
    error: str | None = None
    started: str = ""
    duration_ms: float = 0.0
    # Revisions of this key that were superseded before they could run.
    skipped: list[int] = field(default_factory=list)


def decode_result(raw: bytes | str) -> Result:
    """Parse a result record; any bytes give a Result or a MessageError."""
    value = _json_object(raw, what="result")
    try:
        return Result(
            agent=str(value["agent"]),
            key=str(value["key"]),
            revision=int(value["revision"]),
            name=_optional_text(value.get("name"), "name"),
            ok=_boolean(value["ok"], "ok"),
            result=value.get("result"),
            error=_optional_text(value.get("error"), "error"),
            started=str(value.get("started", "")),
            duration_ms=float(value.get("duration_ms", 0.0)),
            skipped=[int(r) for r in _array(value.get("skipped"), "skipped")],
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MessageError(f"result is missing or has a bad field: {exc}") from None


def _json_object(raw: bytes | str, *, what: str) -> dict[str, Any]:
    value = load_json(raw, what=what)
    if not isinstance(value, dict):
        raise MessageError(f"{what} is not a JSON object")
    return value


def _optional_text(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{name} is a JSON {_json_type(value)}, not a string")


def _boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError(f"{name} is a JSON {_json_type(value)}, not true or false")


def _array(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    raise TypeError(f"{name} is a JSON {_json_type(value)}, not an array")


@dataclass(frozen=True)
class AgentInfo(_Record):
    """An agent's registration at `<prefix>/info/<id>`, bound to its lease."""

    id: str
    hostname: str
    pid: int
    regions: list[str]
    version: str
    started: str
    script_dir: str


def decode_agent_info(raw: bytes | str) -> AgentInfo:
    """Parse an agent's registration; any bytes give an AgentInfo or a MessageError."""
    value = _json_object(raw, what="registration")
    try:
        return AgentInfo(
            id=str(value["id"]),
            hostname=str(value.get("hostname", "")),
            pid=int(value.get("pid", 0)),
            regions=[str(r) for r in _array(value.get("regions"), "regions")],
            version=str(value.get("version", "")),
            started=str(value.get("started", "")),
            script_dir=str(value.get("script_dir", "")),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MessageError(f"registration is missing or has a bad field: {exc}") from None


def rfc3339(timestamp: float) -> str:
    """A Unix time as RFC 3339 UTC with milliseconds, `2026-11-28T22:50:01.123Z`: the one
    time format of Gleam's records (results, registrations, the applied record) and of
    its JSON log lines."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
