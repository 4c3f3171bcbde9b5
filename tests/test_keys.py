"""Key layout and name rules: no name can make a key or script path escape its folder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gleam import keys

VALID_NAMES = ["web-1", "a", "A.b_c-9", "9lives", "x" * 128]
INVALID_NAMES = ["", "-web", ".hidden", "..", "a/b", "a b", "web:1", "x" * 129, "é", "a\x00"]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_are_accepted(name: str) -> None:
    assert keys.validate_name(name, what="node id") == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused_with_what_they_are(name: str) -> None:
    with pytest.raises(keys.InvalidName, match="region"):
        keys.validate_name(name, what="region")


@pytest.mark.parametrize(
    ("function", "parts"),
    [
        ("print", ("print.lua",)),
        ("config::sync", ("config", "sync.lua")),
        ("a::b::c_d-e", ("a", "b", "c_d-e.lua")),
    ],
)
def test_function_names_map_to_script_paths(function: str, parts: tuple[str, ...]) -> None:
    assert keys.function_path_parts(function) == parts


@pytest.mark.parametrize(
    "function", ["", "../etc/passwd", "a::..::b", "a/b", "a::", "::a", "a:b", ".x", "a.b", "a b"]
)
def test_function_names_that_could_escape_are_refused(function: str) -> None:
    with pytest.raises(keys.InvalidName):
        keys.function_path_parts(function)


@given(st.text(max_size=40))
def test_any_accepted_function_name_stays_inside_the_script_dir(name: str) -> None:
    try:
        parts = keys.function_path_parts(name)
    except keys.InvalidName:
        return
    assert all(p not in ("", ".", "..") and "/" not in p and not p.startswith(".") for p in parts)


def test_layout_builds_the_original_key_layout() -> None:
    layout = keys.Layout()
    assert layout.node_key("web-1") == "/gleam/node/web-1"
    assert layout.region_key("eu") == "/gleam/region/eu"
    assert layout.info_key("web-1") == "/gleam/info/web-1"
    assert layout.result_key("web-1", keys.Target.region("eu")) == "/gleam/result/web-1/region/eu"


def test_layout_parses_its_own_keys_and_nothing_else() -> None:
    layout = keys.Layout("/ops/gleam")
    assert layout.parse_task_key("/ops/gleam/node/web-1") == keys.Target.node("web-1")
    assert layout.parse_task_key("/ops/gleam/region/eu") == keys.Target.region("eu")
    assert layout.parse_task_key("/gleam/node/web-1") is None
    assert layout.parse_task_key("/ops/gleam/info/web-1") is None
    assert layout.parse_task_key("/ops/gleam/node/../x") is None
    assert layout.parse_result_key("/ops/gleam/result/web-1/node/web-1") == (
        "web-1",
        keys.Target.node("web-1"),
    )
    assert layout.parse_result_key("/ops/gleam/result/web-1") is None


@pytest.mark.parametrize("prefix", ["gleam", "/gleam/", "/", "", "/a//b", "/a/../b"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(keys.InvalidName, match="prefix"):
        keys.Layout(prefix)


@pytest.mark.parametrize(
    ("value", "regions"),
    [
        ("eu:web", ("eu", "web")),
        ("eu,web", ("eu", "web")),
        ("eu: eu ,web", ("eu", "web")),
        ("", ()),
    ],
)
def test_regions_split_on_colons_and_commas(value: str, regions: tuple[str, ...]) -> None:
    assert keys.split_regions(value) == regions


def test_a_bad_region_in_a_list_is_named() -> None:
    with pytest.raises(keys.InvalidName, match="'e/u'"):
        keys.split_regions("web:e/u")
