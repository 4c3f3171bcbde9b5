"""The Lua executor: name -> file mapping, the gleam table against a real etcd, limits,
conversions, caching and the original's example scripts."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.lua_api import KV, KVError
from agent.lua_exec import LuaRunner, RunOutcome
from agent.store import EtcdKV
from gleam import keys
from tests.agent_support import MemoryKV
from tests.support import EXAMPLE_SCRIPTS, wait_until

Factory = Callable[..., LuaRunner]


@pytest.fixture
def make_runner() -> Iterator[Factory]:
    """Runners over an in-memory KV; a test about etcd passes kv=EtcdKV(etcd)."""
    runners: list[LuaRunner] = []

    def make(script_dir: Path, **kwargs: Any) -> LuaRunner:
        kwargs.setdefault("kv", MemoryKV())
        kwargs.setdefault("agent_id", "web-1")
        kwargs.setdefault("regions", ["eu", "web"])
        kwargs.setdefault("watch_files", False)
        runner = LuaRunner(script_dir, **kwargs)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close()


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def run_text(runner: LuaRunner, scripts: Path, text: str, data: Any = None) -> RunOutcome:
    write(scripts, "t.lua", text)
    return runner.run("t", data)


def ok(outcome: RunOutcome) -> Any:
    assert outcome.ok, outcome.error
    assert outcome.error is None
    return outcome.result


def failed(outcome: RunOutcome) -> str:
    assert not outcome.ok, outcome
    assert outcome.result is None
    assert outcome.error
    return outcome.error


# The runtime and what scripts can reach -------------------------------------------------


def test_runtime_is_lua_54(make_runner: Factory, scripts: Path) -> None:
    assert ok(run_text(make_runner(scripts), scripts, "return _VERSION")) == "Lua 5.4"


@pytest.mark.parametrize(
    "expression",
    [
        "python",
        "_G.python",
        "rawget(_G, 'python')",
        "load('return python')()",
        "debug.sethook",
        "debug.getregistry",
        "debug.getupvalue",
        "require",
        "package",
        "dofile",
        "loadfile",
        "getmetatable('')",
    ],
)
def test_python_bridge_and_debug_are_unreachable(
    make_runner: Factory, scripts: Path, expression: str
) -> None:
    result = ok(run_text(make_runner(scripts), scripts, f"return {expression} or 'absent'"))
    assert result == "absent"


@pytest.mark.parametrize(
    "expression",
    [
        "gleam.Get.__globals__",
        "gleam.Message.__self__",
        "select(2, pcall(gleam.exec, 1)).__class__",
    ],
)
def test_python_attributes_are_not_readable(
    make_runner: Factory, scripts: Path, expression: str
) -> None:
    # gleam functions are Lua closures; even if a Python object leaked, its attributes
    # stay closed.
    result = ok(
        run_text(
            make_runner(scripts),
            scripts,
            f"local ok, v = pcall(function() return {expression} end) return ok and v ~= nil",
        )
    )
    assert result is False


def test_standard_libraries_stay_usable(make_runner: Factory, scripts: Path) -> None:
    text = """
    return {
      string.format("%d-%s", 3, ("x"):upper()), table.concat({1, 2}, ","), math.floor(2.5),
      type(os.time()), type(io.open), utf8.char(233), select("#", 1, 2),
      debug.traceback("x"):sub(1, 1), collectgarbage("count") > 0,
    }
    """
    assert ok(run_text(make_runner(scripts), scripts, text)) == [
        "3-X",
        "1,2",
        2,
        "number",
        "function",
        "é",
        2,
        "x",
        True,
    ]


def test_load_runs_code_in_the_scripts_environment(make_runner: Factory, scripts: Path) -> None:
    text = "x = 5 return load('return x + #gleam.regions, gleam.Data')()"
    assert ok(run_text(make_runner(scripts), scripts, text, "d")) == 7


def test_globals_and_library_changes_do_not_leak_between_runs(
    make_runner: Factory, scripts: Path
) -> None:
    runner = make_runner(scripts)
    write(scripts, "a.lua", "leaked = 1; string.format = nil; gleam.id = 'x'; return true")
    write(scripts, "b.lua", "return {leaked == nil, string.format('%s', 1), gleam.id}")
    assert ok(runner.run("a", None)) is True
    assert ok(runner.run("b", None)) == [True, "1", "web-1"]


# Nothing a task does reaches the next one ---------------------------------------------------

# A clean task that looks at everything a hostile one might have changed: the libraries
# (through their tables and through string methods), the default files, the metatables.
_CLEAN = """
local function builtin(f) return not pcall(string.dump, f) end  -- C functions cannot be dumped
local names = {}
for _, lib in ipairs({string, table, math, io, os, utf8, coroutine, debug}) do
  for k, v in pairs(lib) do names[#names + 1] = type(v) end
end
return {
  string.upper("x"), ("x"):upper(), ("%d"):format(7), table.concat({1, 2}, ","),
  math.floor(2.5), utf8.char(233), type(os.time()), io.type(io.stdout),
  io.output() == io.stdout, io.input() == io.stdin, #names,
  gleam.id, type(gleam.Get), builtin(io.stdout.write), builtin(("").upper),
}
"""
_CLEAN_RESULT = [
    "X", "X", "7", "1,2", 2, "é", "number", "file", True, True, 91, "web-1", "function",
    True, True,
]  # fmt: skip

_POISON = "function() return 'POISONED' end"


@pytest.mark.parametrize(
    "text",
    [
        # The library table itself, through the state pairs() returns.
        f"local _, real = pairs(string); real.upper = {_POISON}",
        f"local _, real = pairs(string); rawset(real, 'upper', {_POISON})",
        "local _, real = pairs(string); real.format = nil",
        f"local _, real = pairs(gleam); real.Get = {_POISON}; real.id = 'x'",
        """
        for _, lib in ipairs({string, table, math, io, os, utf8, coroutine, debug, gleam, _G}) do
          local _, real = pairs(lib)
          for k in next, real do rawset(real, k, nil) end
          for k, v in pairs(lib) do
            if type(v) == "table" then for j in next, v do v[j] = nil end end
          end
        end
        """,
        # The iterator pairs() returns hands out keys and values only.
        f"local walk = pairs(string); local k, v = walk(nil, nil); string[k] = {_POISON}",
        # The shared metatables: strings', files', the environment's, the libraries'.
        f"getmetatable('').__index.upper = {_POISON}",
        f"rawset(getmetatable('').__index, 'upper', {_POISON})",
        f"getmetatable(io.stdout).__index.write = {_POISON}",
        "getmetatable(io.stdout).__gc = function() while true do end end",
        "getmetatable(io.tmpfile()).__gc = function() while true do end end",
        "getmetatable(io.stdout).__metatable = nil",
        f"setmetatable(string, {{__index = {{upper = {_POISON}}}}})",
        "setmetatable(_ENV, {})",
        "setmetatable(gleam, {})",
        f"getmetatable(_ENV).__index.pairs = {_POISON}",
        # load with another environment, and a binary chunk.
        f"load('upper = {_POISON}', 'x', 't', string)()",
        f"load('upper = {_POISON}', 'x', 't', select(2, pairs(string)))()",
        "assert(load(string.dump(function() end), 'x', 'b'))()",
        # Coroutines see the same proxies.
        f"coroutine.wrap(function() local _, real = pairs(string); real.upper = {_POISON} end)()",
        f"local co = coroutine.create(function() string.upper = {_POISON}; coroutine.yield() end)"
        " coroutine.resume(co)",
        # Library state kept between calls.
        "io.output(io.tmpfile()); io.input(io.tmpfile())",
        "os.setlocale('C')",
    ],
)
def test_what_a_task_does_does_not_reach_the_next_one(
    make_runner: Factory, scripts: Path, text: str
) -> None:
    runner = make_runner(scripts)
    write(scripts, "hostile.lua", text)
    write(scripts, "clean.lua", _CLEAN)
    assert ok(runner.run("clean", None)) == _CLEAN_RESULT
    runner.run("hostile", None)  # succeeds or fails: either way, nothing sticks
    assert ok(runner.run("clean", None)) == _CLEAN_RESULT


def test_pairs_on_a_library_walks_it_without_handing_it_out(
    make_runner: Factory, scripts: Path
) -> None:
    text = """
    local walk, state, first = pairs(string)
    local n = 0
    for k, v in pairs(string) do n = n + 1 end
    return {n, state == string, first == nil, rawget(string, "upper") == nil}
    """
    assert ok(run_text(make_runner(scripts), scripts, text)) == [17, True, True, True]


def test_getmetatable_shows_a_scripts_own_metatables_only(
    make_runner: Factory, scripts: Path
) -> None:
    text = """
    local mt = {}
    return {
      getmetatable(setmetatable({}, mt)) == mt, getmetatable(_ENV), getmetatable(string),
      getmetatable(gleam), getmetatable("x") == nil, getmetatable(io.stdout) == nil,
      getmetatable(coroutine.create(print)) == nil,
    }
    """
    assert ok(run_text(make_runner(scripts), scripts, text)) == [
        True, False, False, False, True, True, True,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "install",
    [
        # __gc added to a metatable after setmetatable: Lua does not mark the object.
        "local mt = {} local t = setmetatable({}, mt) mt.__gc = finaliser",
        # __gc reached through the metatable's own __index: Lua looks __gc up raw.
        "setmetatable({}, setmetatable({}, {__index = {__gc = finaliser}}))",
        # The files' metatable: protected.
        "pcall(function() getmetatable(io.stdout).__gc = finaliser end)",
        "pcall(function() local f = io.tmpfile() getmetatable(f).__gc = finaliser end)",
        "pcall(setmetatable, {}, {__gc = finaliser})",
        "pcall(setmetatable, {}, setmetatable({__gc = finaliser}, {}))",
    ],
)
def test_no_route_installs_a_finaliser(
    make_runner: Factory, scripts: Path, tmp_path: Path, install: str
) -> None:
    # The finaliser, if it ever ran, would leave a file behind.
    marker = tmp_path / "finalised"
    runner = make_runner(scripts)
    text = f"""
    local function finaliser() io.open({str(marker)!r}, "w"):close() end
    {install}
    collectgarbage() collectgarbage()
    return true
    """
    assert ok(run_text(runner, scripts, text)) is True
    assert ok(run_text(runner, scripts, "collectgarbage() collectgarbage() return 1")) == 1
    assert not marker.exists()


def test_a_close_metamethod_that_loops_is_stopped_by_the_time_limit(
    make_runner: Factory, scripts: Path
) -> None:
    # Unlike __gc, __close runs in the script's own thread, with the count hook on.
    runner = make_runner(scripts, time_limit=0.5)
    text = "local x <close> = setmetatable({}, {__close = function() while true do end end})"
    assert failed(run_text(runner, scripts, text)) == "time limit of 0.5 s exceeded"
    assert ok(run_text(runner, scripts, _CLEAN)) == _CLEAN_RESULT


def test_files_a_task_leaves_open_are_closed_when_it_ends(
    make_runner: Factory, scripts: Path, tmp_path: Path
) -> None:
    runner = make_runner(scripts)
    written, read = tmp_path / "written", tmp_path / "read"
    read.write_text("line\n")
    fds = len(os.listdir("/proc/self/fd"))
    text = f"""
    Kept = io.open({str(written)!r}, "w")
    Kept:write("buffered")
    for i = 1, 200 do
      local f = io.open({str(read)!r})
      local lines = io.lines({str(read)!r})
    end
    io.output({str(tmp_path / "default")!r})
    return io.type(Kept)
    """
    assert ok(run_text(runner, scripts, text)) == "file"
    # Closing flushed what the task wrote; no descriptor is left behind.
    assert written.read_text() == "buffered"
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_task_that_seeds_the_random_generator_does_not_fix_the_next_ones(
    make_runner: Factory, scripts: Path
) -> None:
    runner = make_runner(scripts)
    draw = "return {math.random(1 << 40), math.random(1 << 40)}"
    seeded = ok(run_text(runner, scripts, "math.randomseed(42) " + draw))
    # Seeding inside a task still gives that task a repeatable sequence...
    assert ok(run_text(runner, scripts, "math.randomseed(42) " + draw)) == seeded
    # ...but the next task does not inherit it.
    ok(run_text(runner, scripts, "math.randomseed(42)"))
    assert ok(run_text(runner, scripts, draw)) != seeded


def test_os_setlocale_reads_but_does_not_change_the_locale(
    make_runner: Factory, scripts: Path
) -> None:
    runner = make_runner(scripts)
    assert isinstance(ok(run_text(runner, scripts, "return os.setlocale()")), str)
    error = failed(run_text(runner, scripts, "os.setlocale('C')"))
    assert "os.setlocale can only read the locale" in error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("io.open('/x', 'zz')", "Lua error: t.lua:1: bad argument #2 to 'io.open' (invalid mode)"),
        ("io.lines('/nonexistent/x')", "Lua error: t.lua:1: cannot open file '/nonexistent/x'"),
        ("io.output({})", "Lua error: t.lua:1: bad argument #1 to 'io.output' (FILE* expected"),
    ],
)
def test_io_errors_name_the_scripts_line(
    make_runner: Factory, scripts: Path, text: str, expected: str
) -> None:
    assert failed(run_text(make_runner(scripts), scripts, text)).startswith(expected)


# Names and files ------------------------------------------------------------------------


def test_function_name_maps_to_nested_file(make_runner: Factory, scripts: Path) -> None:
    write(scripts, "config/deep/sync.lua", "return 'nested'")
    assert ok(make_runner(scripts).run("config::deep::sync", None)) == "nested"


def test_unknown_function_fails_clearly(make_runner: Factory, scripts: Path) -> None:
    error = failed(make_runner(scripts).run("foo::bar", None))
    assert error.startswith("function 'foo::bar' not found")
    assert str(scripts / "foo" / "bar.lua") in error


@pytest.mark.parametrize("name", ["../x", "a/b", "", "a::..", ".hidden", "a::", "x.lua"])
def test_invalid_function_names_are_refused(make_runner: Factory, scripts: Path, name: str) -> None:
    assert "invalid" in failed(make_runner(scripts).run(name, None)) or name == ""


def test_name_of_the_wrong_type_fails_cleanly(make_runner: Factory, scripts: Path) -> None:
    runner = make_runner(scripts)
    assert failed(runner.run(["x"], None))  # type: ignore[arg-type]
    assert "non-empty string" in failed(runner.run(None, None))  # type: ignore[arg-type]


def test_symlink_out_of_the_script_dir_is_refused(
    make_runner: Factory, scripts: Path, tmp_path: Path
) -> None:
    outside = write(tmp_path, "outside.lua", "return 'escaped'")
    (scripts / "evil.lua").symlink_to(outside)
    error = failed(make_runner(scripts).run("evil", None))
    assert "outside the script directory" in error


def test_a_directory_is_not_a_function(make_runner: Factory, scripts: Path) -> None:
    (scripts / "dir.lua").mkdir()
    assert "not a regular file" in failed(make_runner(scripts).run("dir", None))


def test_syntax_error_names_file_and_line(make_runner: Factory, scripts: Path) -> None:
    error = failed(run_text(make_runner(scripts), scripts, "local x = 1\nreturn = 2"))
    assert error.startswith("Lua syntax error: t.lua:2:")


def test_shebang_line_is_allowed(make_runner: Factory, scripts: Path) -> None:
    assert ok(run_text(make_runner(scripts), scripts, "#!/usr/bin/lua\nreturn 1")) == 1


# Data in, result out ---------------------------------------------------------------------


def test_data_is_gleam_data_and_the_chunk_arguments(make_runner: Factory, scripts: Path) -> None:
    text = "local d = ... return {gleam.Data.a, d.a, gleam.Data == d, select('#', ...)}"
    assert ok(run_text(make_runner(scripts), scripts, text, {"a": [1, "x"]})) == [
        [1, "x"],
        [1, "x"],
        True,
        1,
    ]


def test_null_in_data_becomes_nil(make_runner: Factory, scripts: Path) -> None:
    text = "local d = ... return {d.gone == nil, d.list[1], d.list[2] == nil, d.list[3]}"
    data = {"gone": None, "list": [1, None, 3]}
    assert ok(run_text(make_runner(scripts), scripts, text, data)) == [True, 1, True, 3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("return nil", None),
        ("return", None),
        ("return 1, 2, 3", 1),
        ("return {}", {}),
        ("return {1, 2, 3}", [1, 2, 3]),
        ("return {[2] = 'b', [1] = 'a'}", ["a", "b"]),
        ("return {[1] = 'a', [3] = 'c'}", {"1": "a", "3": "c"}),
        ("return {1, x = 2}", {"1": 1, "x": 2}),
        ("return {[1.5] = true}", {"1.5": True}),
        ("return {a = {b = {c = {}}}}", {"a": {"b": {"c": {}}}}),
        ("return 2^53", 2.0**53),
        ("return math.maxinteger", 2**63 - 1),
        ("return 'é'", "é"),
    ],
)
def test_result_conversion(make_runner: Factory, scripts: Path, text: str, expected: Any) -> None:
    result = ok(run_text(make_runner(scripts), scripts, text))
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("return function() end", "Lua function"),
        ("return coroutine.create(function() end)", "result is a Lua"),
        ("return {f = print}", "result.f is a Lua function"),
        ("return 0/0", "nan"),
        ("return math.huge", "inf"),
        ("return {-math.huge}", "inf"),
        ("return {[true] = 1}", "key of type boolean"),
        ("local t = {} t.t = t return t", "nests deeper"),
        ("return '\\xff\\xfe'", "not UTF-8"),
        ("return {[1] = 'a', ['1'] = 'b'}", "twice"),
    ],
)
def test_results_without_json_form_fail(
    make_runner: Factory, scripts: Path, text: str, fragment: str
) -> None:
    error = failed(run_text(make_runner(scripts), scripts, text))
    assert error.startswith("result is not JSON-serialisable")
    assert fragment in error


def test_result_over_512_kib_fails(make_runner: Factory, scripts: Path) -> None:
    runner = make_runner(scripts)
    assert len(ok(run_text(runner, scripts, "return string.rep('x', 500 * 1024)"))) == 500 * 1024
    error = failed(run_text(runner, scripts, "return string.rep('x', 513 * 1024)"))
    assert "over the 524288-byte limit" in error


def test_result_with_too_many_values_fails(make_runner: Factory, scripts: Path) -> None:
    text = "local t = {} for i = 1, 300000 do t[i] = 0 end return t"
    assert "more than 262144 values" in failed(run_text(make_runner(scripts), scripts, text))


def test_integer_data_out_of_lua_range_fails(make_runner: Factory, scripts: Path) -> None:
    runner = make_runner(scripts)
    assert "64-bit" in failed(run_text(runner, scripts, "return 1", {"n": 2**70}))
    assert "64-bit" in failed(run_text(runner, scripts, "return 1", -(2**64)))


def _normalised(value: Any) -> Any:
    """What a JSON value looks like after a trip through Lua: nulls in objects vanish,
    empty containers come back as {}."""
    if isinstance(value, dict):
        kept = {k: _normalised(v) for k, v in value.items() if v is not None}
        return kept
    if isinstance(value, list):
        return [_normalised(v) for v in value] if value else {}
    return value


_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    st.none() | _scalars,
    lambda inner: (
        st.lists(inner.filter(lambda v: v is not None), max_size=5)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def echo_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LuaRunner]:
    root = tmp_path_factory.mktemp("echo")
    write(root, "echo.lua", "return ...")
    write(root, "data.lua", "return gleam.Data")
    runner = LuaRunner(root, kv=MemoryKV(), agent_id="a", regions=[], watch_files=False)
    yield runner
    runner.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json)
def test_json_values_round_trip_through_lua(echo_runner: LuaRunner, value: Any) -> None:
    expected = _normalised(value)
    for name in ("echo", "data"):
        result = ok(echo_runner.run(name, value))
        assert json.dumps(result, sort_keys=True) == json.dumps(expected, sort_keys=True)


# Caching and reloading --------------------------------------------------------------------


@pytest.mark.parametrize("watch_files", [True, False])
def test_edited_script_runs_new_code(
    make_runner: Factory, scripts: Path, watch_files: bool
) -> None:
    runner = make_runner(scripts, watch_files=watch_files)
    path = write(scripts, "v.lua", "return 1")
    assert ok(runner.run("v", None)) == 1
    before = path.stat()
    path.write_text("return 2", encoding="utf-8")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    wait_until(lambda: runner.run("v", None).result == 2, timeout=10, what="new code")


def test_watchdog_marks_edited_scripts_stale(make_runner: Factory, scripts: Path) -> None:
    # The per-run stat check would hide a broken observer, so look at what the observer
    # itself records (the worker drops those cache entries before its next run).
    runner = make_runner(scripts, watch_files=True)
    path = write(scripts, "sub/w.lua", "return 1")
    assert ok(runner.run("sub::w", None)) == 1
    path.write_text("return 2", encoding="utf-8")
    wait_until(lambda: str(path.resolve()) in runner._stale, timeout=10, what="watchdog event")
    assert ok(runner.run("sub::w", None)) == 2


def test_deleted_script_is_not_served_from_cache(make_runner: Factory, scripts: Path) -> None:
    runner = make_runner(scripts, watch_files=True)
    path = write(scripts, "gone.lua", "return 1")
    assert ok(runner.run("gone", None)) == 1
    path.unlink()
    assert "not found" in failed(runner.run("gone", None))


def test_reload_from_another_thread_recompiles(
    make_runner: Factory, scripts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = make_runner(scripts)
    write(scripts, "r.lua", "return 1")
    caplog.set_level(logging.DEBUG, logger="gleam.lua")
    ok(runner.run("r", None))
    ok(runner.run("r", None))
    assert sum("compiled r" in m for m in caplog.messages) == 1
    thread = threading.Thread(target=runner.reload)
    thread.start()
    thread.join()
    ok(runner.run("r", None))
    assert sum("compiled r" in m for m in caplog.messages) == 2


# Errors and limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\n\nerror('boom')", "Lua error: t.lua:3: boom"),
        ("error('plain', 0)", "Lua error: plain"),
        ("error({code = 1})", "Lua error: (error object is a table value)"),
        (
            "error(setmetatable({}, {__tostring = function() return 'custom' end}))",
            "Lua error: custom",
        ),
        ("error(nil)", "Lua error: (error object is a nil value)"),
        ("error(42)", "Lua error: 42"),
        ("os.exit(0)", "Lua error: t.lua:1: os.exit is not allowed in gleam scripts"),
        ("os.execute('true')", "Lua error: t.lua:1: os.execute is not allowed in gleam scripts"),
        ("io.popen('true')", "Lua error: t.lua:1: io.popen is not allowed in gleam scripts"),
        (
            "setmetatable({}, {__gc = function() while true do end end})",
            "__gc metamethods are not allowed in gleam scripts",
        ),
        ("collectgarbage('stop')", "collectgarbage('stop') is not allowed in gleam scripts"),
        ("assert(load(string.dump(function() end)))", "attempt to load a binary chunk"),
        ("coroutine.yield(1)", "Lua error: attempt to yield from outside a coroutine"),
        ("return nil .. 'x'", "Lua error: t.lua:1: attempt to concatenate a nil value"),
    ],
)
def test_script_errors_become_failed_outcomes(
    make_runner: Factory, scripts: Path, text: str, expected: str
) -> None:
    runner = make_runner(scripts)
    error = failed(run_text(runner, scripts, text))
    assert error.startswith(expected) or expected in error
    assert ok(run_text(runner, scripts, "return 'still fine'")) == "still fine"


def test_deep_recursion_fails_and_the_runner_goes_on(make_runner: Factory, scripts: Path) -> None:
    runner = make_runner(scripts)
    error = failed(run_text(runner, scripts, "local function f() return 1 + f() end return f()"))
    # Lua's stack grows to a million slots; whichever limit comes first stops it.
    assert "stack overflow" in error or error == "memory limit of 64 MiB exceeded"
    assert ok(run_text(runner, scripts, "return 'still fine'")) == "still fine"


_RUNAWAYS = {
    "loop": "while true do end",
    "pcall loop": "while true do pcall(function() while true do end end) end",
    "xpcall loop": "while true do xpcall(function() while true do end end, print) end",
    "coroutine": "local co = coroutine.create(function() while true do end end)"
    " while true do coroutine.resume(co) end",
    "coroutine.wrap": "while true do pcall(coroutine.wrap(function() while true do end end)) end",
    "nested coroutines": "coroutine.wrap(function() coroutine.wrap(function() while true do end"
    " end)() end)()",
    "handler of a limit error": "xpcall(function() while true do end end,"
    " function() while true do end end)",
    "handler of a plain error": "xpcall(error, function() while true do end end)",
}


@pytest.mark.parametrize("text", _RUNAWAYS.values(), ids=_RUNAWAYS.keys())
def test_runaway_script_is_stopped_by_the_time_limit(
    make_runner: Factory, scripts: Path, text: str
) -> None:
    runner = make_runner(scripts, time_limit=0.3)
    assert failed(run_text(runner, scripts, text)) == "time limit of 0.3 s exceeded"
    assert ok(run_text(runner, scripts, "return 1")) == 1


_BOMBS = {
    "table": "local t = {} for i = 1, 1e9 do t[i] = i end",
    "string": "local s = 'x' while true do s = s .. s end",
    "pcall": "while true do pcall(function() local t = {} for i = 1, 1e9 do t[i] = i end end) end",
    "string.rep": "return string.rep('x', 1e9)",
}


@pytest.mark.parametrize("text", _BOMBS.values(), ids=_BOMBS.keys())
def test_memory_bomb_is_stopped_by_the_memory_limit(
    make_runner: Factory, scripts: Path, text: str
) -> None:
    runner = make_runner(scripts, memory_limit=16 * 1024 * 1024, time_limit=20)
    assert failed(run_text(runner, scripts, text)) == "memory limit of 16 MiB exceeded"
    assert ok(run_text(runner, scripts, "return {1, 2}")) == [1, 2]


# The gleam table: logging, identity, etcd ----------------------------------------------------


def test_logging_functions_use_levels_agent_id_and_function_name(
    make_runner: Factory, scripts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gleam.lua")
    text = """
    gleam.Debug("d", 1) gleam.Debugf("%s=%d", "d", 2)
    gleam.Message("m") gleam.Messagef("%5.1f", 1.25)
    gleam.Warning("w", nil) gleam.Warningf("%q", "w")
    gleam.Error({}) gleam.Errorf("%s", "e")
    print("p", true)
    """
    write(scripts, "logs/all.lua", text)
    ok(make_runner(scripts).run("logs::all", None))
    records = [(r.levelno, r.getMessage()) for r in caplog.records if "logs::all:" in r.message]
    assert [level for level, _ in records] == [10, 10, 20, 20, 30, 30, 40, 40, 20]
    texts = [message.split("logs::all: ", 1)[1] for _, message in records]
    assert texts[:6] == ["d 1", "d=2", "m", "  1.2", "w nil", '"w"']
    assert texts[6].startswith("table: ") and texts[7:] == ["e", "p true"]
    assert all(message.startswith("[web-1] logs::all: ") for _, message in records)


def test_format_errors_are_lua_errors(make_runner: Factory, scripts: Path) -> None:
    error = failed(run_text(make_runner(scripts), scripts, "gleam.Debugf('%d', 'x')"))
    assert error == (
        "Lua error: t.lua:1: gleam.Debugf: bad argument #2 to 'string.format'"
        " (number expected, got string)"
    )


def test_id_and_regions(make_runner: Factory, scripts: Path) -> None:
    text = "return {gleam.id, gleam.regions, #gleam.regions}"
    assert ok(run_text(make_runner(scripts), scripts, text)) == ["web-1", ["eu", "web"], 2]


def test_etcd_functions_against_real_etcd(
    make_runner: Factory, scripts: Path, etcd: Any, layout: keys.Layout
) -> None:
    p = layout.prefix
    text = f"""
    local r = {{}}
    r.set = gleam.Set("{p}/a/x", "1") or "nil"
    r.set_num = gleam.Set("{p}/a/y", 2.5) or "nil"
    r.set_table = gleam.Set("{p}/a/z", {{k = {{1, 2}}}}) or "nil"
    r.get, r.get_err = gleam.Get("{p}/a/x")
    local missing, missing_err = gleam.Get("{p}/nope")
    r.missing, r.missing_err = missing == nil, missing_err
    r.dir, r.dir_err = gleam.GetDir("{p}/a")
    r.del = gleam.Delete("{p}/a") or "nil"
    r.after = gleam.GetDir("{p}/a")
    return r
    """
    result = ok(run_text(make_runner(scripts, kv=EtcdKV(etcd)), scripts, text))
    assert result == {
        "set": "nil",
        "set_num": "nil",
        "set_table": "nil",
        "get": "1",
        "missing": True,
        "missing_err": f"gleam.Get {p}/nope: key not found",
        "dir": {f"{p}/a/x": "1", f"{p}/a/y": "2.5", f"{p}/a/z": '{"k": [1, 2]}'},
        "del": "nil",
        "after": {},
    }
    assert etcd.get(f"{p}/a/x") == (None, None)


def test_set_with_ttl_binds_the_key_to_a_lease(
    make_runner: Factory, scripts: Path, etcd: Any, layout: keys.Layout
) -> None:
    key = f"{layout.prefix}/ttl"
    runner = make_runner(scripts, kv=EtcdKV(etcd))
    ok(run_text(runner, scripts, f"return gleam.Set('{key}', 'v', 30)"))
    value, meta = etcd.get(key)
    assert value == b"v"
    assert meta.lease_id != 0
    lease_ttl = etcd.get_lease_info(meta.lease_id).TTL
    assert 0 < lease_ttl <= 30


@pytest.fixture(params=["memory", "etcd"])
def kv(request: pytest.FixtureRequest) -> KV:
    if request.param == "memory":
        return MemoryKV()
    return EtcdKV(request.getfixturevalue("etcd"))


def test_the_in_memory_kv_answers_as_etcd_does(kv: KV, layout: keys.Layout) -> None:
    p = layout.prefix
    kv.set(f"{p}/a", "top", None)
    kv.set(f"{p}/a/x", "1", None)
    kv.set(f"{p}/a/y/z", "2", 30)
    kv.set(f"{p}/ab", "not under a/", None)
    assert kv.get(f"{p}/a") == "top" and kv.get(f"{p}/nope") is None
    assert kv.get_dir(f"{p}/a/") == {f"{p}/a/x": "1", f"{p}/a/y/z": "2"}
    kv.delete(f"{p}/a")
    assert kv.get_dir(f"{p}/") == {f"{p}/ab": "not under a/"}
    for call in (lambda: kv.delete("/"), lambda: kv.get_dir("//")):
        with pytest.raises(KVError, match="ValueError: refusing to use .* the root of etcd"):
            call()


def test_kv_exceptions_become_error_strings(make_runner: Factory, scripts: Path) -> None:
    text = "local a = gleam.Delete('/') local b, c = gleam.GetDir('//') return {a, b == nil, c}"
    result = ok(run_text(make_runner(scripts), scripts, text))
    assert result[0].startswith("gleam.Delete /: ValueError: refusing")
    assert result[1] is True and result[2].startswith("gleam.GetDir //: ValueError")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        ("gleam.Get(1)", "bad argument #1 to 'gleam.Get'"),
        ("gleam.Get('')", "non-empty string key expected, got empty string"),
        ("gleam.Set('/k', nil)", "bad argument #2 to 'gleam.Set'"),
        ("gleam.Set('/k', 'v', -1)", "bad argument #3 to 'gleam.Set'"),
        ("gleam.Set('/k', print)", "got function"),
        ("gleam.exec('ls')", "bad argument #1 to 'gleam.exec'"),
        ("gleam.exec({})", "at least the program name"),
        ("gleam.exec({'ls'}, {bogus = 1})", "unknown option 'bogus'"),
        ("gleam.exec({'ls'}, {timeout = 0})", "timeout must be a positive number"),
        ("gleam.exec({'ls', {}})", "argv[2] must be a string"),
    ],
)
def test_bad_arguments_to_gleam_functions_are_lua_errors(
    make_runner: Factory, scripts: Path, call: str, fragment: str
) -> None:
    error = failed(run_text(make_runner(scripts), scripts, f"\n{call}"))
    assert error.startswith("Lua error: t.lua:2:")
    assert fragment in error


# gleam.exec --------------------------------------------------------------------------------


def test_exec_returns_code_stdout_stderr(make_runner: Factory, scripts: Path) -> None:
    text = "return {gleam.exec({'sh', '-c', 'echo out; echo err >&2; exit 3'})}"
    assert ok(run_text(make_runner(scripts), scripts, text)) == [3, "out\n", "err\n"]


def test_exec_options_stdin_env_cwd(make_runner: Factory, scripts: Path, tmp_path: Path) -> None:
    text = f"""
    local code, out = gleam.exec({{'sh', '-c', 'cat; echo "$GLEAM_X${{HOME-unset}}"; pwd'}},
      {{stdin = 'in;', env = {{GLEAM_X = 'x', HOME = false}}, cwd = '{tmp_path}'}})
    return {{code, out}}
    """
    assert ok(run_text(make_runner(scripts), scripts, text)) == [0, f"in;xunset\n{tmp_path}\n"]


def test_exec_uses_no_shell(make_runner: Factory, scripts: Path) -> None:
    text = "return {gleam.exec({'echo', '$HOME; rm -rf /'})}"
    assert ok(run_text(make_runner(scripts), scripts, text)) == [0, "$HOME; rm -rf /\n", ""]


def test_exec_of_missing_program(make_runner: Factory, scripts: Path) -> None:
    text = "local code, out, err = gleam.exec({'/no/such/program'}) return {code == nil, out, err}"
    result = ok(run_text(make_runner(scripts), scripts, text))
    assert result[:2] == [True, ""]
    assert result[2].startswith("cannot run '/no/such/program'")


def test_exec_timeout(make_runner: Factory, scripts: Path) -> None:
    text = """
    local code, out, err = gleam.exec({'sh', '-c', 'echo started; exec sleep 30'}, {timeout = 0.5})
    return {code == nil, out, err}
    """
    assert ok(run_text(make_runner(scripts), scripts, text)) == [
        True,
        "started\n",
        "timed out after 0.5 s",
    ]


def test_exec_is_bounded_by_the_task_time_limit(make_runner: Factory, scripts: Path) -> None:
    runner = make_runner(scripts, time_limit=0.5)
    text = "local code, out, err = gleam.exec({'sleep', '30'}) return err"
    outcome = run_text(runner, scripts, text)
    # Either the capped exec reports its timeout or the hook stops the script after it.
    if outcome.ok:
        assert isinstance(outcome.result, str)
        assert "(the task's time limit)" in outcome.result
    else:
        assert outcome.error == "time limit of 0.5 s exceeded"
    assert outcome.duration_ms < 20_000


# The original's example scripts, against a real etcd ---------------------------------------


@pytest.fixture
def examples(make_runner: Factory, etcd: Any) -> LuaRunner:
    return make_runner(EXAMPLE_SCRIPTS, kv=EtcdKV(etcd))


def test_example_print(examples: LuaRunner, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gleam.lua")
    assert ok(examples.run("print", {"hello": "world"})) == {"hello": "world"}
    assert "[web-1] print: hello => world" in caplog.messages
    assert ok(examples.run("print", "text")) == "text"


def test_example_etcd(examples: LuaRunner, etcd: Any) -> None:
    etcd.put("/foobar/stale", "old")
    try:
        assert ok(examples.run("etcd", "some config")) == "some config"
        assert etcd.get("/foobar/config1")[0] == b"some config"
        assert etcd.get("/foobar/stale") == (None, None)
    finally:
        etcd.delete_prefix("/foobar")


@pytest.fixture
def sync_setup(
    monkeypatch: pytest.MonkeyPatch, etcd: Any, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    """config::sync's two places, set through the agent's environment: a key prefix of
    this test's own and a directory under tmp_path."""
    prefix, directory = f"/sync-{uuid.uuid4().hex[:12]}/", tmp_path / "sync"
    directory.mkdir()
    monkeypatch.setenv("GLEAM_SYNC_PREFIX", prefix)
    monkeypatch.setenv("GLEAM_SYNC_DIR", str(directory))
    yield prefix, directory
    etcd.delete_prefix(prefix)


def test_example_config_sync(examples: LuaRunner, etcd: Any, sync_setup: tuple[str, Path]) -> None:
    prefix, directory = sync_setup
    (directory / "app").mkdir()
    etcd.put(f"{prefix}app.conf", "listen = 8080\n")
    etcd.put(f"{prefix}app/nested.conf", "nested\n")
    assert ok(examples.run("config::sync", "app.conf")) == {"file": "app.conf", "bytes": 14}
    assert ok(examples.run("config::sync", "app/nested.conf"))["file"] == "app/nested.conf"
    assert (directory / "app.conf").read_text() == "listen = 8080\n"
    assert (directory / "app" / "nested.conf").read_text() == "nested\n"
    assert sorted(p.name for p in directory.rglob("*")) == ["app", "app.conf", "nested.conf"]


def test_example_config_sync_of_missing_key_fails(
    examples: LuaRunner, sync_setup: tuple[str, Path]
) -> None:
    prefix, directory = sync_setup
    error = failed(examples.run("config::sync", "missing.conf"))
    assert error == f"Lua error: config::sync: gleam.Get {prefix}missing.conf: key not found"
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("/etc/cron.d/evil", "is an absolute path"),
        ("../escape.conf", "has a '..' segment"),
        ("app/../../escape.conf", "has a '..' segment"),
        ("./app.conf", "has a '.' segment"),
        ("app//x.conf", "has an empty segment"),
        ("app/", "has an empty segment"),
        ("app.conf\0.txt", "character other than"),
        ("app\nconf", "character other than"),
        ("a b", "character other than"),
        ("..\\escape", "character other than"),
        ("", "must be a name of 1 to 255 bytes"),
        ("x" * 256, "must be a name of 1 to 255 bytes"),
        ({"path": "/etc/app.conf"}, "Data must be a file name"),
        (7, "Data must be a file name"),
        (None, "Data must be a file name"),
    ],
)
def test_example_config_sync_refuses_names_that_leave_its_places(
    examples: LuaRunner, etcd: Any, sync_setup: tuple[str, Path], tmp_path: Path, data: Any,
    message: str,
) -> None:  # fmt: skip
    prefix, directory = sync_setup
    # Every key it could be tricked into reading holds something.
    for key in ("/etc/cron.d/evil", f"{prefix}../escape.conf", "escape.conf"):
        etcd.put(key, "* * * * * root rm -rf /\n")
    try:
        error = failed(examples.run("config::sync", data))
    finally:
        for key in ("/etc/cron.d/evil", f"{prefix}../escape.conf", "escape.conf"):
            etcd.delete(key)
    assert error.startswith("Lua error: config::sync: ") and message in error
    assert "\n" not in error and "\0" not in error
    assert [p.name for p in tmp_path.rglob("*")] == ["sync"]
    assert not Path("/etc/cron.d/evil").exists()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GLEAM_SYNC_DIR", "relative/dir", 'DIRECTORY "relative/dir" must be an absolute path'),
        ("GLEAM_SYNC_DIR", "/", "must be an absolute path below /"),
        ("GLEAM_SYNC_PREFIX", "config", "KEY_PREFIX \"config\" must start and end with '/'"),
    ],
)
def test_example_config_sync_refuses_a_setup_that_would_reach_everywhere(
    examples: LuaRunner, sync_setup: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
    variable: str, value: str, message: str,
) -> None:  # fmt: skip
    monkeypatch.setenv(variable, value)
    assert message in failed(examples.run("config::sync", "app.conf"))


def test_floats_survive(make_runner: Factory, scripts: Path) -> None:
    assert math.isclose(ok(run_text(make_runner(scripts), scripts, "return ... * 2", 0.25)), 0.5)
