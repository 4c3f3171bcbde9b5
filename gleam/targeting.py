"""Which task keys a `-target` value means: explicit forms and bare names.

`node/<id>` and `region/<name>` are explicit. A bare name is looked up among the live
agents: an agent id means that node, a region some live agent watches means the region.
A name that is both, or neither, is refused with the explicit forms to use instead: the
original never defined the rule, and guessing wrong in operations writes a task to the
wrong hosts. Pure: the caller passes the live agents in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from gleam import keys, messages


class TargetError(ValueError):
    """One or more `-target` values that cannot be resolved; `problems` says why, one
    line each, naming the target and the explicit form(s) to use."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def split_specs(values: Iterable[str]) -> list[str]:
    """`["web-1:eu", "node/a,region/b"]` -> `["web-1", "eu", "node/a", "region/b"]`.

    Several targets are split by `:` as in the seed README; commas work too, and the
    flag may be repeated. Ids and regions can hold neither character."""
    out: list[str] = []
    for value in values:
        out.extend(part.strip() for part in re.split(r"[:,]", value) if part.strip())
    return out


def resolve_one(spec: str, agents: Sequence[messages.AgentInfo]) -> keys.Target:
    """One target string -> a Target; raises TargetError with one problem."""
    if "/" in spec:
        try:
            return keys.Target.parse(spec)
        except keys.InvalidName as exc:
            raise TargetError([f"-target {spec!r}: {exc}"]) from None
    try:
        keys.validate_name(spec, what="target")
    except keys.InvalidName as exc:
        raise TargetError([f"-target {spec!r}: {exc}"]) from None
    is_node = any(a.id == spec for a in agents)
    region_members = sorted(a.id for a in agents if spec in a.regions)
    if is_node and region_members:
        raise TargetError(
            [
                f"-target {spec!r} is ambiguous: it is a live agent's id and a region watched "
                f"by {', '.join(region_members)}; write node/{spec} or region/{spec}"
            ]
        )
    if is_node:
        return keys.Target.node(spec)
    if region_members:
        return keys.Target.region(spec)
    raise TargetError(
        [
            f"-target {spec!r} is neither a live agent's id nor a region a live agent "
            f"watches; write node/{spec} or region/{spec} to send it anyway"
        ]
    )


def resolve(specs: Sequence[str], agents: Iterable[messages.AgentInfo]) -> tuple[keys.Target, ...]:
    """Target strings (already split) -> distinct Targets in the order given.

    Every problem is collected, so one run of the command shows them all; any problem
    means no target at all (the caller must write nothing)."""
    agent_list = list(agents)
    if not specs:
        raise TargetError(["-target: no target given"])
    targets: dict[keys.Target, None] = {}
    problems: list[str] = []
    for spec in specs:
        try:
            targets[resolve_one(spec, agent_list)] = None
        except TargetError as exc:
            problems.extend(exc.problems)
    if problems:
        raise TargetError(problems)
    return tuple(targets)


def needs_agents(specs: Iterable[str]) -> bool:
    """Whether resolving these specs needs the live agents (some are bare names)."""
    return any("/" not in spec for spec in specs)
