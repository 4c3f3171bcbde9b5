"""The rollout rules (gleam.rollout), the agent's hold (agent.holding with agent.pending)
and the manifest section: pure table tests, no etcd."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import holding, pending
from gleam import keys, messages, rollout
from reconciler import manifests

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LAYOUT = keys.Layout()


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"waves": [1, "25%", "100%"]}, None),
        ({"waves": ["100%"], "first": ["web-7"], "max_failed": 2, "bake": 1.5}, None),
        ([1], "rollout must be a mapping"),
        ({}, "rollout.waves must be a non-empty list"),
        ({"waves": []}, "rollout.waves must be a non-empty list"),
        ({"waves": [1, 2]}, 'the last wave must be "100%"'),
        ({"waves": [2, 1, "100%"]}, "waves must strictly increase"),
        ({"waves": ["50%", "25%", "100%"]}, "waves must strictly increase"),
        ({"waves": ["50%", 3, "100%"]}, "waves must strictly increase"),
        ({"waves": [0, "100%"]}, "is not a positive count"),
        ({"waves": [True, "100%"]}, "neither a count"),
        ({"waves": ["0%", "100%"]}, "neither a count"),
        ({"waves": ["101%"]}, "neither a count"),
        ({"waves": [1.5, "100%"]}, "neither a count"),
        ({"waves": ["100%"], "first": "web-1"}, "rollout.first must be a list"),
        ({"waves": ["100%"], "first": ["../x"]}, "rollout.first[0]"),
        ({"waves": ["100%"], "first": ["a", "a"]}, "names an agent twice"),
        ({"waves": ["100%"], "max_failed": -1}, "rollout.max_failed"),
        ({"waves": ["100%"], "max_failed": "1"}, "rollout.max_failed"),
        ({"waves": ["100%"], "bake": -1}, "rollout.bake"),
        ({"waves": ["100%"], "bake": float("nan")}, "rollout.bake"),
        ({"waves": ["100%"], "timeout": 0}, "rollout.timeout"),
        ({"waves": ["100%"], "manual": "yes"}, "rollout.manual"),
        ({"waves": ["100%"], "wave": 1}, "unknown key 'wave'"),
        ({"waves": ["100%"] * 101}, "more than 100 waves"),
    ],
)
def test_rollout_sections_are_checked(section: Any, error: str | None) -> None:
    if error is None:
        rollout.parse_plan(section)
        return
    with pytest.raises(rollout.RolloutError, match=None) as caught:
        rollout.parse_plan(section)
    assert error in str(caught.value)


def test_a_section_is_normalised_with_every_field() -> None:
    plan = rollout.parse_plan({"waves": [1, " 25%", "100%"], "bake": 30})
    assert plan.to_json() == {
        "waves": [1, "25%", "100%"],
        "first": [],
        "max_failed": 0,
        "bake": 30,
        "timeout": 600,
        "manual": False,
    }
    assert rollout.parse_waves_flag("1,25%,100%") == (1, "25%", "100%")


@pytest.mark.parametrize(
    ("waves", "members", "sizes"),
    [
        ((1, "25%", "100%"), 20, [1, 5, 20]),
        ((1, "25%", "100%"), 2, [1, 1, 2]),
        ((5, "100%"), 3, [3, 3]),
        (("10%", "100%"), 3, [1, 3]),
        (("100%",), 0, [0]),
    ],
)
def test_wave_sizes_are_cumulative(
    waves: tuple[rollout.Wave, ...], members: int, sizes: list[int]
) -> None:
    assert rollout.wave_sizes(waves, members) == sizes


def test_admission_order_puts_canaries_first_and_is_stable_per_host_not_alphabetical() -> None:
    agents = [f"web-{i}" for i in range(1, 21)]
    order = rollout.admission_order(agents, region="web", first=["web-7", "gone"])
    assert order[0] == "web-7" and sorted(order) == sorted(agents)
    assert order == rollout.admission_order(list(reversed(agents)), region="web", first=["web-7"])
    assert order[1:] != sorted(order[1:])
    # Same hosts early whatever else is in the region.
    fewer = rollout.admission_order(agents[:10], region="web", first=[])
    assert fewer == [
        a for a in rollout.admission_order(agents, region="web", first=[]) if a in agents[:10]
    ]
    assert rollout.admission_order(agents, region="eu", first=[]) != order[1:]


def test_the_gate_record_round_trips_and_refuses_garbage() -> None:
    plan = rollout.parse_plan({"waves": [1, "100%"]})
    gate = rollout.start(
        plan, key="/gleam/region/web", revision=9, region="web", agents=["a", "b"], now=T0
    )
    assert rollout.decode_gate(gate.encode()) == gate
    assert set(json.loads(gate.encode())) >= {
        "version",
        "key",
        "revision",
        "state",
        "wave",
        "waves",
        "members",
        "admitted",
        "failed",
        "reason",
        "started",
        "updated",
    }
    for raw in (b"", b"[]", b"{}", b'{"admitted": 1}', b"\xff", b"[" * 100000):
        with pytest.raises(rollout.RolloutError):
            rollout.decode_gate(raw)
    # Members, admitted and failed are agent ids: a driver reads each one's result key.
    doc = json.loads(gate.encode())
    for field in ("members", "admitted", "failed"):
        for bad in ("", "../x", "a\x1b[2J"):
            with pytest.raises(rollout.RolloutError, match="agent id"):
                rollout.decode_gate(json.dumps({**doc, field: ["a", bad]}).encode())


@pytest.mark.parametrize(
    "flag",
    ["\u00b2", "\u0661,100%", "9" * 5000, "1,25%," + "9" * 5000, "", "1,,100%", "-1,100%"],
    ids=["superscript", "arabic-indic", "5000-digits", "5000-digits-later", "empty", "gap", "neg"],
)
def test_any_waves_flag_gives_waves_or_a_rollout_error(flag: str) -> None:
    with pytest.raises(rollout.RolloutError, match=r"rollout\.waves"):
        rollout.parse_waves_flag(flag)


def _step(
    gate: rollout.Gate,
    plan: rollout.Plan,
    reports: dict[str, rollout.Report],
    *,
    live: Any = None,
    now: datetime = T0,
    done_since: datetime | None = None,
) -> rollout.Progress:
    return rollout.advance(
        gate,
        plan,
        reports=reports,
        live=set(gate.members) if live is None else live,
        now=now,
        done_since=done_since,
    )


OK = rollout.Report(ok=True)
BAD = rollout.Report(ok=False, error="boom\nmore")


def test_advance_admits_wave_by_wave_then_completes() -> None:
    plan = rollout.parse_plan({"waves": [1, "50%", "100%"], "first": ["c"]})
    gate = rollout.start(plan, key="k", revision=5, region="r", agents=["a", "b", "c", "d"], now=T0)
    assert gate.admitted == ("c",)
    assert _step(gate, plan, {}).gate is None  # pending: nothing to write
    gate2 = _step(gate, plan, {"c": OK}).gate
    assert gate2 is not None and gate2.wave == 2 and len(gate2.admitted) == 2
    gate3 = _step(gate2, plan, dict.fromkeys(gate2.admitted, OK)).gate
    assert gate3 is not None and gate3.wave == 3 and len(gate3.admitted) == 4
    done = _step(gate3, plan, dict.fromkeys(gate3.members, OK)).gate
    assert done is not None and done.state is rollout.State.COMPLETE and done.admitted == "*"
    assert done.admits("late-joiner", 5) and not done.admits("late-joiner", 4)


def test_a_failure_over_max_failed_halts_naming_the_agent_and_the_first_error_line() -> None:
    plan = rollout.parse_plan({"waves": [2, "100%"], "first": ["a", "b"]})
    gate = rollout.start(plan, key="k", revision=5, region="r", agents=["a", "b", "c"], now=T0)
    halted = _step(gate, plan, {"a": BAD}).gate
    assert halted is not None and halted.state is rollout.State.HALTED
    assert halted.reason == "a failed: boom" and halted.admitted == ("a", "b")
    assert _step(halted, plan, {"a": BAD, "b": OK}).gate is None  # halted stays halted
    # A promote goes on past the halt: a's failure is accepted, a new one halts again.
    promoted = rollout.promote(halted, plan, now=T0)
    assert (promoted.state, promoted.wave, promoted.tolerated) == (rollout.State.PROGRESSING, 2, 1)
    done = _step(promoted, plan, {"a": BAD, "b": OK, "c": OK}).gate
    assert done is not None and done.state is rollout.State.COMPLETE
    again = _step(promoted, plan, {"a": BAD, "b": OK, "c": BAD}).gate
    assert again is not None and again.state is rollout.State.HALTED
    assert again.reason == "a c failed: boom"


def test_max_failed_tolerates_that_many_and_the_wave_still_advances() -> None:
    plan = rollout.parse_plan({"waves": [2, "100%"], "first": ["a", "b"], "max_failed": 1})
    gate = rollout.start(plan, key="k", revision=5, region="r", agents=["a", "b", "c"], now=T0)
    noted = _step(gate, plan, {"a": BAD}).gate
    assert noted is not None and noted.failed == ("a",) and noted.state is rollout.State.PROGRESSING
    nxt = _step(noted, plan, {"a": BAD, "b": OK}).gate
    assert nxt is not None and nxt.wave == 2


def test_a_gone_registration_or_a_timeout_counts_as_failed() -> None:
    plan = rollout.parse_plan({"waves": ["100%"], "timeout": 10})
    gate = rollout.start(plan, key="k", revision=5, region="r", agents=["a", "b"], now=T0)
    gone = _step(gate, plan, {"a": OK}, live={"a"}).gate
    assert (
        gone is not None
        and gone.state is rollout.State.HALTED
        and "registration is gone" in gone.reason
    )
    late = _step(gate, plan, {"a": OK}, now=T0 + timedelta(seconds=11)).gate
    assert late is not None and late.reason == "b failed: no result within 10s"


def test_bake_waits_after_a_clean_wave_and_manual_pauses_until_promote() -> None:
    plan = rollout.parse_plan({"waves": [1, "100%"], "bake": 30})
    gate = rollout.start(plan, key="k", revision=5, region="r", agents=["a", "b"], now=T0)
    first = gate.admitted[0]
    assert _step(gate, plan, {first: OK}).gate is None
    assert (
        _step(gate, plan, {first: OK}, now=T0 + timedelta(seconds=20), done_since=T0).gate is None
    )
    baked = _step(gate, plan, {first: OK}, now=T0 + timedelta(seconds=31), done_since=T0).gate
    assert baked is not None and baked.wave == 2
    manual = rollout.parse_plan({"waves": [1, "100%"], "manual": True})
    paused = _step(gate, manual, {first: OK}).gate
    assert paused is not None and paused.state is rollout.State.PAUSED
    promoted = rollout.promote(paused, manual, now=T0)
    assert promoted.state is rollout.State.PROGRESSING and promoted.wave == 2
    aborted = rollout.abort(promoted, now=T0)
    assert aborted.state is rollout.State.ABORTED
    with pytest.raises(rollout.RolloutError):
        rollout.promote(aborted, manual, now=T0)


def test_a_region_without_agents_completes_at_once() -> None:
    plan = rollout.parse_plan({"waves": [1, "100%"]})
    gate = rollout.start(plan, key="k", revision=5, region="r", agents=[], now=T0)
    assert gate.state is rollout.State.COMPLETE and gate.admitted == "*"


# The agent's hold ------------------------------------------------------------------------


def _staged(n: int) -> bytes:
    return messages.Task(
        "print", n, rollout=rollout.parse_plan({"waves": ["100%"]}).to_json()
    ).encode()


def _gate(revision: int, admitted: Any) -> bytes:
    plan = rollout.parse_plan({"waves": ["100%"]})
    gate = rollout.start(
        plan, key="k", revision=revision, region="web", agents=["me", "other"], now=T0
    )
    from dataclasses import replace

    return replace(gate, admitted=admitted).encode()


def test_an_agent_holds_a_staged_task_until_its_gate_admits_it() -> None:
    state = pending.Pending(gates=holding.Gates(agent_id="me", layout=LAYOUT, regions=["web"]))
    task, gate_key = LAYOUT.region_key("web"), LAYOUT.rollout_key("web")
    assert state.observe(pending.Observed(task, 10, _staged(1))) == [pending.Held(task, 10)]
    assert state.take() is None
    # A gate for another revision, or not naming this agent, admits nothing.
    assert state.observe(pending.Observed(gate_key, 11, _gate(9, ("me",)))) == []
    assert state.observe(pending.Observed(gate_key, 12, _gate(10, ("other",)))) == []
    assert state.take() is None
    assert state.observe(pending.Observed(gate_key, 13, _gate(10, ("me",)))) == [
        pending.Queued(task, 10)
    ]
    job = state.take()
    assert job is not None and job.revision == 10


def test_a_held_task_is_superseded_and_a_plain_task_is_not_held() -> None:
    state = pending.Pending(gates=holding.Gates(agent_id="me", layout=LAYOUT, regions=["web"]))
    task, gate_key = LAYOUT.region_key("web"), LAYOUT.rollout_key("web")
    state.observe(pending.Observed(task, 10, _staged(1)))
    assert state.observe(pending.Observed(task, 11, _staged(2))) == [pending.Held(task, 11)]
    state.observe(pending.Observed(gate_key, 12, _gate(11, "*")))
    job = state.take()
    assert job is not None and (job.revision, job.skipped) == (11, (10,))
    state.complete(job)
    plain = messages.Task("print", 3).encode()
    assert state.observe(pending.Observed(task, 13, plain)) == [pending.Queued(task, 13)]
    # A garbage gate record admits nobody; a staged task after it is held.
    state.observe(pending.Observed(gate_key, 14, b"\xff garbage"))
    assert state.observe(pending.Observed(task, 15, _staged(4))) == [pending.Held(task, 15)]


# The manifest section ---------------------------------------------------------------------


def test_a_region_manifest_with_rollout_gives_the_normalised_message() -> None:
    raw = b"name: print\ndata: 1\nrollout:\n  waves: [1, '100%']\n"
    loaded = manifests.load([("tasks/regions/web.yaml", raw)])
    [manifest] = loaded.values()
    assert manifest.task.rollout == rollout.parse_plan({"waves": [1, "100%"]}).to_json()
    assert b'"Rollout":{"bake":0,"first":[],"manual":false,"max_failed":0,' in manifest.value


@pytest.mark.parametrize(
    ("path", "raw", "error"),
    [
        (
            "tasks/nodes/a.yaml",
            b"name: print\nrollout:\n  waves: ['100%']\n",
            "tasks/nodes/a.yaml:2: a node manifest cannot have `rollout`",
        ),
        (
            "tasks/regions/web.yaml",
            b"name: print\nrollout:\n  waves: [1, 2]\n",
            "tasks/regions/web.yaml:3: rollout.waves: the last wave must be",
        ),
        (
            "tasks/regions/web.yaml",
            b"name: print\nrollout:\n  waves: ['100%']\n  bake: -1\n",
            "tasks/regions/web.yaml:4: rollout.bake",
        ),
        (
            "tasks/regions/web.yaml",
            b"name: print\nrollout: 3\n",
            "tasks/regions/web.yaml:2: rollout must be a mapping",
        ),
    ],
)
def test_bad_rollout_sections_are_errors_with_file_and_line(
    path: str, raw: bytes, error: str
) -> None:
    with pytest.raises(manifests.InvalidManifests) as caught:
        manifests.load([(path, raw)])
    assert str(caught.value.errors[0]).startswith(error)


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_give_a_gate_or_a_rollout_error_and_staged_never_raises(raw: bytes) -> None:
    with contextlib.suppress(rollout.RolloutError):
        rollout.decode_gate(raw)
    rollout.staged(raw)


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)


@given(
    st.recursive(
        SCALARS,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=12,
    )
)
def test_any_section_is_a_plan_or_a_rollout_error(section: Any) -> None:
    for value in (section, {"waves": section}, {"waves": ["100%"], "first": section}):
        with contextlib.suppress(rollout.RolloutError):
            rollout.parse_plan(value)


def test_a_signed_staged_task_signs_its_rollout_section() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gleam import signing

    signer = signing.Signer.from_key(Ed25519PrivateKey.generate())
    trusted = {signer.fingerprint: signer.key.public_key()}
    key = LAYOUT.region_key("web")
    task = messages.Task("print", 1, rollout=rollout.parse_plan({"waves": ["100%"]}).to_json())
    raw = signing.sign_task(task, key=key, prev=7, signer=signer)
    assert messages.decode_task(raw).rollout == task.rollout
    assert signing.verify(raw, key=key, trusted=trusted).prev == 7
    # Dropping the rollout (to run everywhere at once) breaks the signature.
    doc = json.loads(raw)
    del doc["Rollout"]
    with pytest.raises(signing.SignatureError):
        signing.verify(messages.canonical_json(doc).encode(), key=key, trusted=trusted)
