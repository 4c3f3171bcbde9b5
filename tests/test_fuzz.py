"""Fuzzing (issue 9): manifest bytes, file names (as git and the file system give them),
task message bytes, and the status model over stored values. Every input ends as a
value or a clean error; nothing else is raised and nothing hangs.

`make test` runs a short, derandomized pass of each target; `make fuzz` sets
GLEAM_FUZZ_EXAMPLES (100,000) and runs each target that many times with random seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gleam import client, client_render, keys, messages, status
from reconciler import gitsource, manifests

LONG_RUN = int(os.environ.get("GLEAM_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(
    max_examples=LONG_RUN or 150,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TARGET = keys.Target.node("web-1")
LAYOUT = keys.Layout("/gleam")
NOW = datetime(2026, 11, 28, 23, 0, 0, tzinfo=UTC)


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "\r" not in text


# Manifest bytes ----------------------------------------------------------------------

YAML_TOKENS = [
    "name: ", "print", "config::sync", "data:", "nmae:", "\n", "  ", "    ", "- ", "-", "[", "]",
    "{", "}", ", ", ": ", "&a ", "*a", "&b ", "*b", "<<: ", "!!binary ", "!!set ",
    "!!python/object:os.system ", "!!timestamp ", "? ", "|\n", ">\n", "'", '"', "# c",
    "---\n", "...\n", "%YAML 1.1\n",
    "1.0e+999", ".nan", ".inf", "-.inf", "0x1F", "0o17", "~", "null", "true", "2024-05-01",
    "\t", "\\ud800", "\\x00", "\x00", "\ufeff", "é", "\u202e", "1" * 5000, "name", "data",
]  # fmt: skip


@st.composite
def yamlish(draw: st.DrawFn) -> bytes:
    pieces = draw(st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=8), max_size=40))
    return "".join(pieces).encode("utf-8", "surrogatepass")


@st.composite
def deep_yaml(draw: st.DrawFn) -> bytes:
    levels = draw(st.integers(0, 1200))
    shape = draw(st.sampled_from(["flow", "block", "mixed", "alias"]))
    if shape == "flow":
        body = "[" * levels + "]" * levels
    elif shape == "block":
        body = "".join("\n" + "  " * (i + 1) + "k:" for i in range(min(levels, 300))) + " 1"
    elif shape == "mixed":
        body = "{a: " * levels + "[1]" + "}" * levels
    else:
        body = "&x [1]\nb: " + "[" * levels + "*x" + "]" * levels
    return f"name: print\ndata: {body}\n".encode()


@st.composite
def laughs(draw: st.DrawFn) -> bytes:
    levels = draw(st.integers(1, 12))
    width = draw(st.integers(1, 12))
    lines = ["name: print", "data:", "  a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    if draw(st.booleans()):
        lines.append(f"  m: {{<<: *a{levels - 1}}}")
    return ("\n".join(lines) + "\n").encode()


MANIFEST_BYTES = st.binary(max_size=300) | yamlish() | deep_yaml() | laughs()


@FUZZ
@given(MANIFEST_BYTES)
def test_any_manifest_bytes_give_a_manifest_or_clean_errors(raw: bytes) -> None:
    result = manifests.parse("tasks/nodes/web-1.yaml", raw, TARGET)
    if isinstance(result, manifests.Manifest):
        assert len(result.value) <= messages.MAX_MESSAGE_BYTES
        # What the reconciler would write is exactly what agents accept.
        assert result.task.encode() == result.value
        return
    assert result, raw
    for error in result:
        assert one_line(str(error)) and len(error.message) <= 400, error


# File names ----------------------------------------------------------------------------

COMPONENT = st.binary(min_size=1, max_size=24) | st.sampled_from(
    [b"nodes", b"regions", b"web-1.yaml", b"eu.yml", b"README.md", b"z\n0123\n.yaml", b"\xff.yaml"]
)
OID = "0123456789abcdef0123456789abcdef01234567"


@st.composite
def tree_paths(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(COMPONENT.filter(lambda c: b"\0" not in c), min_size=1, max_size=3))
    return b"/".join([b"tasks", *parts])


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["100644", "100755", "120000", "160000"]), tree_paths()),
        unique_by=lambda entry: entry[1],  # a tree holds a path once
    )
)
def test_any_file_names_from_git_are_read_exactly_or_refused_by_name(
    entries: list[tuple[str, bytes]],
) -> None:
    listing = b"".join(
        f"{mode} {'commit' if mode == '160000' else 'blob'} {OID}\t".encode() + path + b"\0"
        for mode, path in entries
    )
    tree = gitsource.parse_tree(listing)
    diff = b"".join(
        f":000000 {mode} {'0' * 40} {OID} A\0".encode() + path + b"\0" for mode, path in entries
    )
    changes = gitsource.parse_diff(diff)
    for path, oid in tree.blobs:
        assert oid == OID and path.isprintable() and path.startswith("tasks/")
        assert manifests.classify(path) is not None
    for problem in (*tree.problems, *changes.problems):
        assert one_line(str(problem)) and problem.path.isprintable()
    kept = {p for p, _ in tree.blobs} | {c.path for c in changes.paths}
    for mode, raw in entries:
        if b"\n" in raw or mode in ("120000", "160000"):
            assert raw.decode("utf-8", "replace") not in kept


NAME = st.binary(min_size=1, max_size=24).filter(lambda n: b"/" not in n and b"\0" not in n)


@FUZZ
@given(st.lists(NAME, max_size=4, unique=True))
def test_any_file_names_on_disk_are_read_or_refused_by_name(names: list[bytes]) -> None:
    # A directory per case, removed after it: a long run makes 100,000 of them.
    with tempfile.TemporaryDirectory(prefix="gleam-fuzz-") as root:
        nodes = os.path.join(os.fsencode(root), b"tasks", b"nodes")
        os.makedirs(nodes)
        for name in names:
            if name in (b".", b".."):
                continue
            with open(os.path.join(nodes, name + b".yaml"), "wb") as fh:
                fh.write(b"name: print\n")
        snapshot = gitsource.read_worktree(root)
    for path, _raw in snapshot.files:
        assert path.isprintable()
    for problem in snapshot.problems:
        assert one_line(str(problem)) and problem.path.isprintable()


# Task messages and the status model --------------------------------------------------

JSON_TOKENS = [
    "{", "}", "[", "]", ",", ":", '"Name"', '"Data"', '"print"', '"a::b"', "null", "true",
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "0.5", '"\\ud800"',
    '"\\udc00x"', '"\\u0000"', '"\\u001b[2J"', '"\u202e"', "\xff", "\x00", '"é"', " ",
]  # fmt: skip


@st.composite
def jsonish(draw: st.DrawFn) -> bytes:
    pieces = draw(st.lists(st.sampled_from(JSON_TOKENS) | st.text(max_size=6), max_size=30))
    text = "".join(pieces)
    if draw(st.booleans()):
        text = '{"Name":"print","Data":' + text + "}"
    return text.encode("utf-8", "surrogatepass")


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    levels = draw(st.integers(0, 3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return ('{"Name":"print","Data":' + opener * levels + "1" + closer * levels + "}").encode()


MESSAGE_BYTES = st.binary(max_size=200) | jsonish() | deep_json()


@FUZZ
@given(MESSAGE_BYTES)
def test_any_message_bytes_give_a_task_or_a_message_error(raw: bytes) -> None:
    try:
        task = messages.decode_task(raw)
    except messages.MessageError as exc:
        assert one_line(str(exc))
    else:
        # Whatever decodes can be written again, byte for byte canonical.
        assert messages.decode_task(task.encode()) == task
    for decode in (messages.decode_result, messages.decode_agent_info):
        with contextlib.suppress(messages.MessageError):
            decode(raw)


RESULT_FIELDS = st.fixed_dictionaries(
    {
        "agent": st.sampled_from(["web-1", "web-2", "\x1b[2J"]),
        "key": st.sampled_from(["/gleam/node/web-1", "/gleam/region/eu"]),
        "revision": st.integers(-5, 10**30),
        "ok": st.booleans(),
    },
    optional={
        "name": st.none() | st.text(max_size=10),
        "error": st.none() | st.text(max_size=40),
        "result": st.recursive(
            st.none() | st.integers() | st.text(max_size=5), st.lists, max_leaves=10
        ),
        "started": st.sampled_from(["", "2026-11-28T22:00:00Z", "0001-01-01T00:00:00+23:59"]),
        "duration_ms": st.floats(allow_nan=False, allow_infinity=False),
        "skipped": st.lists(st.integers(0, 100), max_size=3),
    },
)
STORED = MESSAGE_BYTES | RESULT_FIELDS.map(lambda r: json.dumps(r).encode())


def _decoded(raws: list[bytes], decode: object) -> list[object]:
    out = []
    for raw in raws:
        try:
            out.append(decode(raw))  # type: ignore[operator]
        except messages.MessageError:
            continue  # as gleam.client does: an unreadable record is skipped
    return out


@FUZZ
@given(
    tasks=st.lists(MESSAGE_BYTES, max_size=4),
    results=st.lists(STORED, max_size=4),
    agents=st.lists(STORED, max_size=3),
    meta=st.lists(STORED, max_size=2),
)
def test_the_status_model_and_every_renderer_take_any_stored_values(
    tasks: list[bytes], results: list[bytes], agents: list[bytes], meta: list[bytes]
) -> None:
    entries = tuple(
        client.TaskEntry(LAYOUT.node_key(f"web-{i}"), keys.Target.node(f"web-{i}"), i + 1, raw)
        for i, raw in enumerate(tasks)
    )
    infos = [
        messages.AgentInfo("web-0", "h\x1b", 1, ["eu"], "v", "2026-11-28T22:00:00Z", "/s"),
        *_decoded(agents, messages.decode_agent_info),
    ]
    stored_meta = {LAYOUT.applied_key: client.Stored(meta[0], 1)} if meta else {}
    if len(meta) > 1:
        stored_meta[LAYOUT.owned_prefix + "node/web-0"] = client.Stored(meta[1], 1)
    snapshot = client.Snapshot(
        revision=10,
        tasks=entries,
        agents=tuple(infos),  # type: ignore[arg-type]
        results=tuple(_decoded(results, messages.decode_result)),  # type: ignore[arg-type]
        meta=stored_meta,
    )
    fleet = status.build(snapshot, layout=LAYOUT, now=NOW)
    text = "\n".join(
        [
            client_render.status_text(fleet),
            client_render.tasks_text(entries),
            client_render.agents_text(snapshot.agents, LAYOUT),
        ]
    )
    text.encode("utf-8")  # printable to any UTF-8 terminal, no control character
    assert all(line.isprintable() for line in text.splitlines()), text
    client_render.status_text(fleet, colour=True)
    for document in (
        client_render.status_document(fleet),
        client_render.tasks_document(entries),
        client_render.agents_document(snapshot.agents),
    ):
        assert json.loads(client_render.to_json(document)) is not None
