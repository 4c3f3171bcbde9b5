"""Manifests: paths to targets, YAML to canonical messages, every error with file and line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gleam import keys
from reconciler import manifests


def load(files: dict[str, str]) -> dict[keys.Target, manifests.Manifest]:
    return manifests.load((p, t.encode()) for p, t in files.items())


def errors_of(files: dict[str, str]) -> list[str]:
    with pytest.raises(manifests.InvalidManifests) as info:
        load(files)
    return [str(e) for e in info.value.errors]


def test_paths_map_to_targets() -> None:
    assert manifests.classify("tasks/nodes/web-1.yaml") == keys.Target.node("web-1")
    assert manifests.classify("tasks/regions/eu.yml") == keys.Target.region("eu")
    assert manifests.classify("tasks/README.md") is None
    assert manifests.classify("docs/x.yaml") is None
    nested = manifests.classify("tasks/nodes/eu/web-1.yaml")
    assert isinstance(nested, manifests.ManifestError)
    bad = manifests.classify("tasks/nodes/.hidden.yaml")
    assert isinstance(bad, manifests.ManifestError) and "file name" in bad.message


# One file's value or error: tests/cases/manifests.yaml (tests/test_cases.py).


def test_every_error_of_every_file_is_reported_with_file_and_line() -> None:
    errors = errors_of(
        {
            "tasks/nodes/a.yaml": "name: print\ndata:\n  x: 1\nnmae: typo\n",
            "tasks/nodes/b.yaml": "data: 1\n",
            "tasks/nodes/c.yaml": "name: print\ndata: [1, 2\n",
            "tasks/nodes/d.yaml": "name: ../evil\n",
            "tasks/nodes/e.yaml": "",
            "tasks/regions/ok.yaml": "name: print\n",
            "tasks/regions/f.yaml": "- name: print\n",
            "tasks/regions/g.yaml": "name: 3\n",
        }
    )
    assert (
        errors[0] == "tasks/nodes/a.yaml:4: unknown key 'nmae' "
        "(a manifest has `name`, `data` and `rollout` only)"
    )
    assert errors[1].startswith("tasks/nodes/b.yaml:1: `name:` is missing")
    assert errors[2].startswith("tasks/nodes/c.yaml:3: not valid YAML")
    assert errors[3].startswith("tasks/nodes/d.yaml:1: function name '../evil' is invalid")
    assert errors[4].startswith("tasks/nodes/e.yaml: manifest is empty")
    assert errors[5].startswith("tasks/regions/f.yaml:1: a manifest is a mapping")
    assert errors[6].startswith("tasks/regions/g.yaml:1: name: 3 is not of type 'string'")
    assert len(errors) == 7


def test_two_files_for_one_target_and_non_json_data_are_errors() -> None:
    errors = errors_of(
        {
            "tasks/nodes/a.yaml": "name: print\n",
            "tasks/nodes/a.yml": "name: print\n",
            "tasks/nodes/b.yaml": "name: print\ndata: .nan\n",
            "tasks/nodes/c.yaml": "name: print\ndata: !!binary aGVsbG8=\n",
            "tasks/nodes/d.yaml": "name: print\ndata:\n  path: /a\n  path: /b\n",
        }
    )
    assert "tasks/nodes/a.yaml already defines node/a" in errors[0]
    assert errors[1].startswith("tasks/nodes/b.yaml:2:") and ".nan" in errors[1]
    assert errors[2].startswith("tasks/nodes/c.yaml:2:") and "JSON" in errors[2]
    assert errors[3] == ("tasks/nodes/d.yaml:4: not valid YAML: key 'path' is given twice")


# The quick shape check accepts exactly what the JSON Schema accepts. ---------------------

scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=6)
name_st = st.sampled_from(
    ["print", "config::sync", "a_b-c::d", "", "::", "a::", "a b", "a.b", "../x", "é"]
) | st.text(max_size=8)
doc_st = st.one_of(
    scalar,
    st.lists(scalar, max_size=2),
    st.dictionaries(
        st.sampled_from(["name", "data", "nmae", "Name", "extra"]),
        name_st | scalar | st.lists(scalar, max_size=2),
        max_size=3,
    ),
)


@given(doc_st)
def test_quick_check_agrees_with_the_schema(doc: object) -> None:
    schema_ok = manifests.validator().is_valid(doc)
    quick_ok = manifests._quick_valid(doc)
    if quick_ok:
        assert schema_ok
    elif schema_ok:
        # The only difference allowed: Python's `$` in the schema's pattern lets a name
        # end in "\n", which the shared key rules refuse (and the error says so).
        assert isinstance(doc, dict) and doc["name"].endswith("\n")


def test_schema_file_is_a_valid_schema_that_rejects_unknown_keys() -> None:
    v = manifests.validator()
    assert v.is_valid({"name": "print", "data": {"any": ["json"]}})
    assert not v.is_valid({"name": "print", "extra": 1})


# Limits (issue 9): every one a per-file error, before anything large is built. --------

NODE = keys.Target.node("web-1")


def refused(raw: bytes) -> str:
    result = manifests.parse("tasks/nodes/web-1.yaml", raw, NODE)
    assert isinstance(result, list), result
    return str(result[0])


def test_a_file_over_the_size_limit_is_refused_unparsed() -> None:
    raw = b"name: print\n" + b"#" * manifests.MAX_FILE_BYTES
    assert refused(raw) == (
        "tasks/nodes/web-1.yaml: file is over the 2 MiB limit for a manifest; not parsed"
    )


def test_aliases_are_counted_and_their_expansion_measured() -> None:
    uses = "\n".join(f"  k{i}: *a" for i in range(manifests.MAX_ALIASES + 1))
    assert "more than 100 aliases" in refused(f"name: print\ndata:\n  a: &a 1\n{uses}\n".encode())
    # A few shared blocks are fine, merge keys included.
    ok = manifests.parse(
        "x.yaml",
        b"name: print\ndata:\n  base: &b {user: app, mode: '0644'}\n  one: {<<: *b, path: /a}\n",
        NODE,
    )
    assert isinstance(ok, manifests.Manifest)
    assert ok.task.data == {
        "base": {"mode": "0644", "user": "app"},
        "one": {"mode": "0644", "path": "/a", "user": "app"},
    }
    wide = "name: print\ndata:\n  a0: &a0 [" + ", ".join(["x"] * 60) + "]\n"
    wide += "".join(
        f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 20) + "]\n" for i in range(1, 5)
    )
    assert refused(wide.encode()).endswith('past 524,288 nodes (a "billion laughs"?); not read')


def test_a_recursive_alias_is_refused() -> None:
    assert "recursive alias" in refused(b"name: print\ndata: &a {b: *a}\n")


def test_depth_counts_through_aliases() -> None:
    deep = "[" * 150 + "]" * 150
    raw = f"name: print\ndata:\n  a: &a {deep}\n  b: [[{'[' * 60}*a{']' * 60}]]\n"
    assert "nested deeper than 200 levels" in refused(raw.encode())


def test_paths_are_text_without_control_characters_or_an_error_naming_them() -> None:
    assert manifests.decode_path(b"tasks/nodes/web-1.yaml") == "tasks/nodes/web-1.yaml"
    assert manifests.decode_path("tasks/é.md".encode()) == "tasks/é.md"
    for raw, shown in [
        (b"tasks/nodes/z\n0123\n.yaml", "tasks/nodes/z\\n0123\\n.yaml"),
        (b"tasks/nodes/\xff.yaml", "tasks/nodes/\\xff.yaml"),
        (b"tasks/a\x1b[2J\\b.md", "tasks/a\\x1b[2J\\\\b.md"),
        ("tasks/nodes/a\u202eb.yaml".encode(), "tasks/nodes/a\\u202eb.yaml"),
    ]:
        error = manifests.decode_path(raw)
        assert isinstance(error, manifests.ManifestError) and error.path == shown


# One blob at many paths: parse_paths against parse_file --------------------------------

SHARED_CONTENTS = [
    b"name: print\ndata: {a: 1}\n",
    b"name: print\nrollout:\n  waves: [1, '100%']\n",  # a region task; an error for a node
    b"name: [not, a, name]\n",
    b"name: print\ndata: {a: [\n",  # YAML that does not parse
    b"",
    b"\xff\xfe not utf-8",
]
SHARED_PATHS = [
    "tasks/nodes/web-1.yaml",
    "tasks/nodes/web-2.yml",
    "tasks/regions/eu.yaml",
    "tasks/regions/us.yml",
    "tasks/nodes/bad name.yaml",
    "tasks/deep/er/x.yaml",
    "tasks/README.md",
]


@given(
    raw=st.sampled_from(SHARED_CONTENTS),
    paths=st.lists(st.sampled_from(SHARED_PATHS), min_size=1, max_size=8),
)
def test_a_blob_at_many_paths_parses_as_each_path_alone_would(raw: bytes, paths: list[str]) -> None:
    got = manifests.parse_paths(paths, raw)
    want = [manifests.parse_file(path, raw) for path in paths]
    assert got == want
    assert [r.name if isinstance(r, manifests.Manifest) else None for r in got] == [
        r.name if isinstance(r, manifests.Manifest) else None for r in want
    ]


def test_a_blob_committed_at_a_thousand_paths_is_parsed_once_a_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    parse = manifests.parse

    def counting(path: str, raw: bytes, target: keys.Target) -> object:
        calls.append(path)
        return parse(path, raw, target)

    monkeypatch.setattr(manifests, "parse", counting)
    paths = [f"tasks/nodes/n{i}.yaml" for i in range(1000)] + ["tasks/regions/eu.yaml"]
    results = manifests.parse_paths(paths, b"name: print\ndata: {big: [1, 2, 3]}\n")
    assert calls == ["tasks/nodes/n0.yaml", "tasks/regions/eu.yaml"]
    assert all(isinstance(r, manifests.Manifest) for r in results)
    values = {id(r.value) for r in results if isinstance(r, manifests.Manifest)}
    assert len(values) == 2  # one message held a directory, not a thousand copies
