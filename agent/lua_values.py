"""Converting values between JSON (as Python holds it) and Lua (through lupa).

The rules, which the README documents for script writers:
- JSON objects and arrays become Lua tables (arrays indexed from 1); JSON null becomes
  nil, so an object key whose value is null is absent and a null inside an array
  leaves a hole.
- A Lua table comes back as a JSON array when its keys are exactly 1..n, otherwise as
  an object whose number keys are written as strings. An empty table comes back as an
  empty object `{}`.
- Functions, coroutines, userdata, NaN and infinities have no JSON form: converting
  them raises NotJSON with a message that says what was found.
"""

from __future__ import annotations

import json
import math
from typing import Any

from lupa import lua54

from gleam.messages import JSON

MAX_DEPTH = 200
# Every element costs at least two bytes of JSON ("0,"), so more elements than this
# can never fit under the result limit; the walk stops early instead of converting them.
MAX_ITEMS = 512 * 1024 // 2


class NotJSON(ValueError):
    """A Lua value with no JSON form; the text says what and where."""


def to_lua(runtime: lua54.LuaRuntime, value: JSON) -> Any:
    """A JSON value as a Lua value; raises NotJSON for integers Lua cannot hold."""
    if isinstance(value, (dict, list)):
        try:
            return runtime.table_from(value, recursive=True)
        except OverflowError:
            raise NotJSON("data holds an integer outside the 64-bit range Lua can hold") from None
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise NotJSON("data is an integer outside the 64-bit range Lua can hold")
    return value


def to_json(value: Any) -> JSON:
    """A value returned by Lua (through lupa) as plain JSON values; raises NotJSON."""
    counter = [0]
    try:
        return _convert(value, 0, counter, "result")
    except UnicodeDecodeError:
        raise NotJSON("result holds a string that is not UTF-8 text") from None


def _convert(value: Any, depth: int, counter: list[int], where: str) -> JSON:
    counter[0] += 1
    if counter[0] > MAX_ITEMS:
        raise NotJSON(f"result has more than {MAX_ITEMS} values")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJSON(f"{where} is {value!r}, which JSON cannot represent")
        return value
    kind = lua54.lua_type(value)
    if kind != "table":
        what = f"a Lua {kind}" if kind else f"a Python {type(value).__name__}"
        raise NotJSON(f"{where} is {what}")
    if depth >= MAX_DEPTH:
        raise NotJSON(f"result nests deeper than {MAX_DEPTH} levels (a table that holds itself?)")
    items = []
    for item in value.items():
        items.append(item)
        if len(items) > MAX_ITEMS:
            raise NotJSON(f"result has more than {MAX_ITEMS} values")
    if items and all(isinstance(k, int) and not isinstance(k, bool) for k, _ in items):
        ordered = sorted(items, key=lambda kv: kv[0])
        if ordered[0][0] == 1 and ordered[-1][0] == len(ordered):
            return [_convert(v, depth + 1, counter, f"{where}[{k}]") for k, v in ordered]
    result: dict[str, JSON] = {}
    for key, item in items:
        name = _key(key, where)
        if name in result:
            raise NotJSON(f"{where} has the key {name!r} twice once numbers are written as text")
        result[name] = _convert(item, depth + 1, counter, f"{where}.{name}")
    return result


def _key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or not isinstance(key, (int, float)):
        kind = "boolean" if isinstance(key, bool) else lua54.lua_type(key) or type(key).__name__
        raise NotJSON(f"{where} has a key of type {kind}; JSON keys are strings")
    if isinstance(key, float) and not math.isfinite(key):
        raise NotJSON(f"{where} has the key {key!r}, which JSON cannot represent")
    return json.dumps(key)
