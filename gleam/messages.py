"""The wire format: task messages, results and agent registrations as JSON.

Task messages keep the original's shape, `{"Name": ..., "Data": ...}`. Results and
registrations are JSON objects with lower-case keys. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

from gleam import keys

# JSON values as Python sees them after json.loads.
JSON: TypeAlias = None | bool | int | float | str | list[Any] | dict[str, Any]

# etcd refuses requests over 1.5 MiB by default; a task message is capped below that so
# that a message, its result and the transaction around it always fit.
MAX_MESSAGE_BYTES = 1024 * 1024


class MessageError(ValueError):
    """A value that is not a valid Gleam message; the text says why."""


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _loads(raw: bytes | str, *, what: str) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise MessageError(f"{what} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MessageError(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise MessageError(f"{what} is nested too deeply") from None


@dataclass(frozen=True)
class Task:
    """A function to run and the data to give it."""

    name: str
    data: JSON = None
    # The normalised rollout section of a staged region task (gleam.rollout), or None.
    rollout: dict[str, Any] | None = None

    def encode(self) -> bytes:
        """The canonical message bytes, as the reconciler and the client write them."""
        keys.validate_function(self.name)
        doc: dict[str, Any] = {"Name": self.name, "Data": self.data}
        if self.rollout is not None:
            doc["Rollout"] = self.rollout
        try:
            raw = canonical_json(doc).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise MessageError(f"task data is not JSON-serialisable: {exc}") from None
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageError(
                f"task message is {len(raw)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit"
            )
        return raw


def decode_task(raw: bytes | str) -> Task:
    """Parse a task message; any bytes give a Task or a MessageError, never a crash."""
    size = len(raw)
    if size > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    if not raw.strip():
        raise MessageError("message is empty")
    value = _loads(raw, what="message")
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
    return Task(
        name=name, data=value.get("Data"), rollout=rollout if isinstance(rollout, dict) else None
    )


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


@dataclass(frozen=True)
class Result:
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

    def encode(self) -> bytes:
        return canonical_json(asdict(self)).encode("utf-8")


def decode_result(raw: bytes | str) -> Result:
    value = _loads(raw, what="result")
    if not isinstance(value, dict):
        raise MessageError("result is not a JSON object")
    try:
        return Result(
            agent=str(value["agent"]),
            key=str(value["key"]),
            revision=int(value["revision"]),
            name=value.get("name"),
            ok=bool(value["ok"]),
            result=value.get("result"),
            error=value.get("error"),
            started=str(value.get("started", "")),
            duration_ms=float(value.get("duration_ms", 0.0)),
            skipped=[int(r) for r in value.get("skipped") or []],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"result is missing or has a bad field: {exc}") from None


@dataclass(frozen=True)
class AgentInfo:
    """An agent's registration at `<prefix>/info/<id>`, bound to its lease."""

    id: str
    hostname: str
    pid: int
    regions: list[str]
    version: str
    started: str
    script_dir: str

    def encode(self) -> bytes:
        return canonical_json(asdict(self)).encode("utf-8")


def decode_agent_info(raw: bytes | str) -> AgentInfo:
    value = _loads(raw, what="registration")
    if not isinstance(value, dict):
        raise MessageError("registration is not a JSON object")
    try:
        return AgentInfo(
            id=str(value["id"]),
            hostname=str(value.get("hostname", "")),
            pid=int(value.get("pid", 0)),
            regions=[str(r) for r in value.get("regions") or []],
            version=str(value.get("version", "")),
            started=str(value.get("started", "")),
            script_dir=str(value.get("script_dir", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"registration is missing or has a bad field: {exc}") from None
