"""Result records and registrations that cannot be decoded: found and named, not dropped.

`gleam.client`'s listings skip such a record, so that one bad value cannot fail a listing
or a wait; alone, that would show an agent whose result is garbage as `pending` and hide
a garbage registration. `decode` (pure) sorts the records of one read into those that
decode and those that do not, which `gleam-client status`, `info` and `-wait` show as
`(invalid)` with their key; `gleam.client.read_snapshot` carries them for scripts (the
README's Python API).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from gleam import keys, messages


class RecordKind(StrEnum):
    RESULT = "result"
    REGISTRATION = "registration"


@dataclass(frozen=True)
class InvalidRecord:
    """A record under `<prefix>/result/` or `<prefix>/info/` that does not decode."""

    key: str  # the etcd key that holds it
    kind: RecordKind
    agent: str  # the agent id its key names
    task_key: str | None  # a result's task key (from its key); None for a registration
    error: str  # why it cannot be read


@dataclass(frozen=True)
class Decoded:
    """The registrations and result records among some (key, value) items, each decoded
    once: those that decode (in the items' order) and those that do not (by key)."""

    agents: tuple[messages.AgentInfo, ...]
    results: tuple[messages.Result, ...]
    invalid: tuple[InvalidRecord, ...]


def decode(items: Iterable[tuple[str, bytes]], layout: keys.Layout) -> Decoded:
    """Pure: see Decoded. Keys that are neither records (a task key, a result key with
    no task after the agent id) are left alone, as the readers leave them."""
    agents: list[messages.AgentInfo] = []
    results: list[messages.Result] = []
    found = []
    for key, value in items:
        if key.startswith(layout.info_prefix):
            agent = key[len(layout.info_prefix) :]
            try:
                agents.append(_registration(agent, value))
            except messages.MessageError as exc:
                found.append(InvalidRecord(key, RecordKind.REGISTRATION, agent, None, str(exc)))
            continue
        parsed = layout.parse_result_key(key)
        if parsed is None:
            continue
        agent, target = parsed
        task_key = layout.task_key(target)
        try:
            results.append(_result(agent, task_key, value))
        except messages.MessageError as exc:
            found.append(InvalidRecord(key, RecordKind.RESULT, agent, task_key, str(exc)))
    return Decoded(tuple(agents), tuple(results), tuple(sorted(found, key=lambda r: r.key)))


def _result(agent: str, task_key: str, value: bytes) -> messages.Result:
    """The result stored under `<prefix>/result/<agent>/<target>`, if it decodes and is
    that agent's for that task key (raises MessageError). Readers index results by what
    the record says, and an agent may write only under its own result prefix: a record
    naming another agent (or task) would let one agent answer for another."""
    result = messages.decode_result(value)
    if result.agent != agent or result.key != task_key:
        raise messages.MessageError(
            f"result is for agent {result.agent[:80]!r} at {result.key[:200]!r}, not "
            f"{agent!r} at {task_key!r} as its key says"
        )
    return result


def _registration(agent: str, value: bytes) -> messages.AgentInfo:
    """The registration stored under `<prefix>/info/<agent>`, if it decodes and is that
    agent's, as agents write it (raises MessageError). One stored by hand under another
    key would be listed as a second registration of the agent it names (or targeted as
    it), and under a key it is not at."""
    info = messages.decode_agent_info(value)
    if info.id != agent:
        raise messages.MessageError(
            f"registration is for agent id {info.id!r}, not {agent!r} as its key says"
        )
    try:
        keys.validate_name(agent, what="agent id")
    except keys.InvalidName as exc:
        raise messages.MessageError(f"registration: {exc}") from None
    return info
