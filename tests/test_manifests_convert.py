"""The fast YAML path (issue 14): composed nodes converted by reconciler.manifests'
own converter, with the resolver's tags memoized, give exactly what PyYAML's
constructor gives (the loader before issue 14) for every input: the same value, with
the same types, keys and key order, or the same error."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler import manifests
from tests.test_fuzz import FUZZ, MANIFEST_BYTES

PATH = "tasks/nodes/web-1.yaml"

# Plain scalars whose YAML 1.1 reading is easy to get wrong, and explicit tags.
SCALARS = [
    "yes", "No", "ON", "off", "y", "n", "true", "False", "~", "null", "Null", "", "0", "-0",
    "+0", "00", "0755", "0o17", "08", "0x1F", "-0x1f", "0b101", "+0b1_0", "1_000", "1__0",
    "_1", "1:20", "-1:30:00", "190:20:30", "1:60", "3.14", "-.5", "1e3", "1.0e+3", "6.8523015e+5",
    "685.230_15e+03", "190:20:30.15", ".nan", ".NaN", ".inf", "-.Inf", "+.inf", ".5", "1.",
    "2024-05-01", "2001-12-14t21:59:43.10-05:00", "=", "<<", "'<<'", "x", "'yes'", '"0755"',
    "12345678901234567890", "1" * 4301, "0x" + "f" * 4000, "!!str 12", "!!int '12'",
    "!!int 0x10", "!!int x", "!!float 1", "!!bool yes", "!!bool maybe", "!!null ''",
    "!!binary aGk=", "!!timestamp 2024-05-01", "!!str", "! 12", "!foo bar", "!!merge x",
    "!!value =", "é", "'a: b'", "\"\\u00e9\"", "- 1", "?",
]  # fmt: skip


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    """A flow-style document of mappings, sequences and the scalars above, with anchors,
    aliases to earlier anchors, merge keys and repeated keys."""
    anchors: list[str] = []

    def node(depth: int) -> str:
        choice = draw(st.integers(0, 9 if depth < 4 else 3))
        if choice <= 1 and anchors:
            return "*" + draw(st.sampled_from(anchors))
        if choice <= 3:
            text = draw(st.sampled_from(SCALARS))
        elif choice <= 5:
            text = "[" + ", ".join(node(depth + 1) for _ in range(draw(st.integers(0, 4)))) + "]"
        elif choice <= 7 and anchors and draw(st.booleans()):
            sources = draw(st.lists(st.sampled_from(anchors), min_size=1, max_size=3))
            merge = (
                "*" + sources[0]
                if len(sources) == 1
                else "[" + ", ".join("*" + a for a in sources) + "]"
            )
            text = (
                "{<<: "
                + merge
                + "".join(", " + entry(depth) for _ in range(draw(st.integers(0, 3))))
                + "}"
            )
        else:
            text = "{" + ", ".join(entry(depth) for _ in range(draw(st.integers(0, 4)))) + "}"
        if draw(st.integers(0, 3)) == 0:
            name = f"a{len(anchors)}"
            text = f"&{name} {text}"
            anchors.append(name)
        return text

    def entry(depth: int) -> str:
        key = draw(
            st.sampled_from(
                [
                    "name",
                    "data",
                    "k",
                    "yes",
                    "1",
                    "0x1",
                    "true",
                    "<<",
                    "~",
                    "=",
                    "[1]",
                    "{a: 1}",
                    "*a0",
                    "2024-05-01",
                    ".nan",
                ]
            )
        )
        if key == "*a0" and not anchors:
            key = "k"
        if key == "<<":
            return "<<: " + node(depth + 1)
        return f"{key} : {node(depth + 1)}"

    body = "{" + ", ".join(entry(0) for _ in range(draw(st.integers(0, 5)))) + "}"
    return body.encode("utf-8")


def same(raw: bytes) -> None:
    fast = manifests._load_yaml(PATH, raw)
    reference = manifests._load_yaml(PATH, raw, fast=False)
    # repr tells True from 1, 1.0 from 1, and shows key order; NaN equals itself there.
    assert repr(fast) == repr(reference), raw
    assert type(fast) is type(reference)


@FUZZ
@given(documents())
def test_random_documents_give_what_pyyaml_gives(raw: bytes) -> None:
    same(raw)


@FUZZ
@given(MANIFEST_BYTES)
def test_the_fuzz_inputs_give_what_pyyaml_gives(raw: bytes) -> None:
    same(raw)


def test_the_tricky_scalars_and_merges_give_what_pyyaml_gives() -> None:
    for scalar in SCALARS:
        same(f"name: print\ndata: {scalar}\n".encode())
        same(f"name: print\ndata: [{scalar}, {{k: {scalar}}}]\n".encode())
    for text in [
        "a: &a {x: 1, y: 2}\nb: &b {y: 3, z: 4}\nc: {<<: [*a, *b], x: 0}\n",
        "a: &a {x: 1}\nc: {<<: *a, <<: {x: 2}}\n",
        "c: {<<: &a {x: 1, <<: {x: 2}}}\nd: *a\n",  # a merged mapping that merges: fallback
        "c: {<<: {a: 1, a: 2}}\n",  # an inline merge source's own duplicates are not checked
        "c: {<<: 1}\n",
        "c: {<<: [1]}\n",
        "{1: a, 0x1: b, true: c}\n",
        "{1: a, '1': b}\n",
        "{'<<': 1, '<<': 2}\n",
        "{= : 1}\n",
        "[&x .nan, *x]\n",
        "{.nan: 1, .NaN: 2}\n",
        "!!set {a, b}\n",
        "!!omap [a: 1]\n",
        "? [1]\n: 2\n",
        "name: print\ndata:\n  - name: redis\n    version: '4.4'\n    hold: false\n",
    ]:
        same(text.encode())
