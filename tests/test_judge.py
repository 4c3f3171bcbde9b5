"""Who must answer for a write, and whether they have: pure, table-tested."""

from __future__ import annotations

from gleam import client, keys, messages

LAYOUT = keys.Layout()
AGENTS = [
    messages.AgentInfo("web-1", "h1", 1, ["eu", "web"], "0.1.0", "", "/s"),
    messages.AgentInfo("web-2", "h2", 2, ["eu"], "0.1.0", "", "/s"),
    messages.AgentInfo("db-1", "h3", 3, ["db"], "0.1.0", "", "/s"),
]


def result(agent: str, key: str, revision: int, ok: bool = True) -> messages.Result:
    return messages.Result(agent, key, revision, "print", ok, None, None if ok else "boom")


def outcomes(
    expected: dict[str, int], results: list[messages.Result]
) -> list[tuple[str, str, str]]:
    return [
        (r.agent, r.key, r.outcome.value) for r in client.judge(expected, AGENTS, results, LAYOUT)
    ]


def test_a_region_write_is_answered_by_every_member() -> None:
    key = LAYOUT.region_key("eu")
    assert outcomes({key: 10}, [result("web-1", key, 10), result("web-2", key, 9)]) == [
        ("web-1", key, "ok"),
        ("web-2", key, "pending"),  # an older revision does not answer a newer write
    ]


def test_a_newer_revision_answers_and_failures_show() -> None:
    key = LAYOUT.region_key("eu")
    assert outcomes({key: 10}, [result("web-1", key, 12), result("web-2", key, 10, ok=False)]) == [
        ("web-1", key, "ok"),
        ("web-2", key, "failed"),
    ]


def test_a_node_write_is_answered_by_that_node_only() -> None:
    key = LAYOUT.node_key("db-1")
    assert outcomes({key: 5}, [result("web-1", key, 5)]) == [("db-1", key, "pending")]


def test_a_key_nobody_watches_needs_no_answer() -> None:
    assert outcomes({LAYOUT.region_key("us"): 5}, []) == []
