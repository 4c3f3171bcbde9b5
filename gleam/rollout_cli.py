"""gleam-client's rollout commands: `rollout status [REGION]`, `rollout promote REGION`,
`rollout abort REGION`, and `-rollout WAVES` on a send (a staged region task written by
hand, whose gate this client starts, and drives while it waits with -wait)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gleam import client, client_render, keys, messages, rollout, rollout_driver, signing

EXIT_OK, EXIT_FAILURE, EXIT_PENDING = 0, 1, 2
USAGE = "rollout status [REGION] | rollout promote REGION | rollout abort REGION"


class RolloutUsage(ValueError):
    pass


def read_gates(etcd: Any, layout: keys.Layout) -> dict[str, rollout.Gate]:
    """Every decodable gate record, by region."""
    gates: dict[str, rollout.Gate] = {}
    head = layout.rollout_prefix
    for value, meta in etcd.get_prefix(head):
        try:
            gates[meta.key.decode("utf-8", "replace")[len(head) :]] = rollout.decode_gate(value)
        except rollout.RolloutError:
            continue
    return gates


def staged_task(function: str, data: messages.JSON, waves: str) -> messages.Task:
    try:
        plan = rollout.Plan(waves=rollout.parse_waves_flag(waves))
    except rollout.RolloutError as exc:
        raise RolloutUsage(f"-rollout: {exc}") from None
    return messages.Task(function, data, rollout=plan.to_json())


def gate_line(region: str, gate: rollout.Gate) -> str:
    line = (
        f"{region}  {gate.key} @{gate.revision}  {gate.state.value}  wave {gate.wave}/{gate.waves}"
    )
    admitted = "all" if gate.admitted == rollout.ALL else str(len(gate.admitted))
    line += f"  admitted {admitted}/{len(gate.members)}"
    return line + (f"  {gate.reason}" if gate.reason else "")


def gate_json(region: str, gate: rollout.Gate | None) -> dict[str, Any]:
    if gate is None:
        return {"region": region, "state": None}
    return {
        "region": region,
        "key": gate.key,
        "revision": gate.revision,
        "state": gate.state.value,
        "wave": gate.wave,
        "waves": gate.waves,
        "members": list(gate.members),
        "admitted": gate.admitted if gate.admitted == rollout.ALL else list(gate.admitted),
        "failed": list(gate.failed),
        "reason": gate.reason,
    }


def exit_code(gates: Mapping[str, rollout.Gate | None]) -> int:
    states = {g.state for g in gates.values() if g is not None}
    if rollout.State.HALTED in states:
        return EXIT_FAILURE
    if states & {rollout.State.PROGRESSING, rollout.State.PAUSED}:
        return EXIT_PENDING
    return EXIT_OK


def _printable(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say` for text lines: gate records and the lines about them hold what etcd holds
    (a region from a key, a gate's key, reason and members, a member's error), which
    anyone with write access can fill with escape sequences (client_render.printable)."""
    return lambda line: say(client_render.printable(line))


def run(
    words: Sequence[str], etcd: Any, layout: keys.Layout, *, json_output: bool,
    say: Callable[[str], None],
) -> int:  # fmt: skip
    if not words or words[0] not in ("status", "promote", "abort"):
        raise RolloutUsage(f"rollout: expected {USAGE}")
    verb, rest = words[0], list(words[1:])
    if len(rest) > 1 or (verb != "status" and len(rest) != 1):
        raise RolloutUsage(f"rollout {verb}: expected {USAGE}")
    for region in rest:
        try:
            keys.validate_name(region, what="region")
        except keys.InvalidName as exc:
            raise RolloutUsage(f"rollout {verb}: {exc}") from None
    gates: dict[str, rollout.Gate | None]
    if verb == "status":
        found = read_gates(etcd, layout)
        gates = {r: found.get(r) for r in rest} if rest else dict(sorted(found.items()))
    else:
        driver = rollout_driver.Driver.over(
            etcd, layout, say=_printable(say) if not json_output else lambda _: None
        )
        try:
            move = driver.promote if verb == "promote" else driver.abort
            gates = {rest[0]: move(rest[0])}
        except rollout_driver.RolloutRefused as exc:
            why = client_render.printable(str(exc))  # may name the gate's key, from etcd
            print(f"gleam-client: rollout {verb}: {why}", file=sys.stderr)
            return EXIT_FAILURE
    if json_output:
        say(client_render.to_json({"rollouts": [gate_json(r, g) for r, g in gates.items()]}))
    else:
        for region, gate in gates.items():
            line = gate_line(region, gate) if gate is not None else f"{region}  no rollout"
            _printable(say)(line)
        if not gates:
            say(f"no rollout under {layout.rollout_prefix}")
    return exit_code(gates) if verb == "status" else EXIT_OK


def send(
    etcd: Any, layout: keys.Layout, targets: Sequence[keys.Target], task: messages.Task, *,
    wait: float | None, json_output: bool, say: Callable[[str], None],
    signer: signing.Signer | None,
) -> int:  # fmt: skip
    """Write a staged task to region targets, start their rollouts, and with `wait`
    drive them until each is complete (0) or halted, aborted or out of time (1)."""
    if any(t.kind is not keys.Kind.REGION for t in targets):
        raise RolloutUsage("-rollout: every -target must be a region (region/NAME)")
    revision = client.send_tasks(etcd, layout, targets, task, signer=signer)
    regions = sorted(t.name for t in targets)
    lines: list[str] = []
    driver_say = lines.append if json_output else _printable(say)
    driver = rollout_driver.Driver.over(etcd, layout, say=driver_say)
    gates = driver.step_all(regions)
    if not json_output:
        say(f"sent {', '.join(layout.task_key(t) for t in targets)} @{revision} (rollout)")
    if wait is not None:
        gates = rollout_driver.drive(driver, regions, timeout=wait)
    if json_output:
        say(
            client_render.to_json(
                {"revision": revision, "rollouts": [gate_json(r, g) for r, g in gates.items()]}
            )
        )
    if wait is None:
        return EXIT_OK
    done = all(g is not None and g.state is rollout.State.COMPLETE for g in gates.values())
    return EXIT_OK if done else EXIT_FAILURE
