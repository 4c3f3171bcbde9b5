"""gleam-reconcile's side of rollouts: start the gates of the staged region tasks a pass
wrote (right after its transactions), and for `--once --wait` drive them to the end.
The rules are in gleam.rollout, the etcd reads and guarded writes in gleam.rollout_driver."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gleam import keys, rollout, rollout_cli, rollout_driver


def staged_written(
    layout: keys.Layout, revisions: Mapping[str, int], values: Mapping[str, bytes]
) -> list[str]:
    """The regions whose staged task this pass wrote."""
    regions = layout.tasks_prefix(keys.Kind.REGION)
    out = []
    for key in sorted(k for k in revisions if k.startswith(regions)):
        value = values.get(key)
        # Values are this reconciler's canonical messages, where a rollout section is
        # always spelled `"Rollout":`: most can be skipped without decoding them.
        if value is None or b'"Rollout":' not in value:
            continue
        target = layout.parse_task_key(key)
        if target is not None and rollout.staged(value) is not None:
            out.append(target.name)
    return out


def start(
    etcd: Any, layout: keys.Layout, regions: list[str], *, say: Callable[[str], None]
) -> tuple[rollout_driver.Driver, dict[str, rollout.Gate | None]]:
    """Write the first gate of each region's new rollout: the driver, and the gates."""
    driver = rollout_driver.Driver.over(etcd, layout, say=say)
    return driver, driver.step_all(regions)


def exit_ok(gates: Mapping[str, rollout.Gate | None]) -> bool:
    return all(g is not None and g.state is rollout.State.COMPLETE for g in gates.values())


def as_json(gates: Mapping[str, rollout.Gate | None]) -> list[dict[str, Any]]:
    """The rollouts for `--output json`, as `gleam-client rollout status` gives them."""
    return [rollout_cli.gate_json(region, gate) for region, gate in sorted(gates.items())]
