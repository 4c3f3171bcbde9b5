"""Running gleam's Lua functions: `a::b` runs `<script dir>/a/b.lua` in a Lua 5.4 state.

The one module of the agent that talks to Lua. `LuaRunner.run(name, data)` never
raises for anything a script or its name does: every failure is an `RunOutcome` with a
clear error. The script side (environment, limits, the `gleam` table) is built by
`lua_prelude.lua` once per Lua runtime.

Threading: `run` must always be called from the same single thread (a lupa runtime is
not thread-safe). `reload` may be called from any thread; the watchdog observer thread
only marks cached chunks stale. Neither ever touches the Lua runtime.

In the agent this module runs in the Lua executor process (agent.lua_child), so it must
not import the etcd client or gRPC, directly or through `gleam`'s public face.

Memory: lupa builds Lua values from Python ones (the task's data, what gleam.Get and
gleam.GetDir return) outside any protected call, so an allocation refused there by the
memory cap would abort the process (Lua's "unprotected error" panic) or, inside a
callback, unwind through Python frames and wedge it. So the cap is lifted while such
values are built, never by more than they need, and put back at the next tick of the
count hook; a value that leaves the state over the cap fails the task cleanly.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lupa import lua54

from agent import lua_values, processes
from agent.lua_api import KV, KVError, RunOutcome
from gleam import keys
from gleam.messages import JSON

_PRELUDE = (Path(__file__).with_name("lua_prelude.lua")).read_text(encoding="utf-8")

# Results are written into etcd next to their task; keep them well under its limits.
MAX_RESULT_BYTES = 512 * 1024
MAX_SCRIPT_BYTES = 4 * 1024 * 1024
DEFAULT_EXEC_TIMEOUT = 30.0
# How often (in Lua VM instructions) the time limit is checked: rare enough to cost
# nothing measurable, frequent enough to stop a loop within a millisecond or so.
HOOK_COUNT = 10_000
# How far above the memory cap a conversion into Lua may go while it runs (the task's
# data is at most 1 MiB of JSON, which no Lua layout blows up beyond this); past it the
# allocation fails and the process aborts, which the agent reports and survives.
CONVERSION_ROOM = 256 * 1024 * 1024
# Room left above what is in use when a callback returns, so that lupa can always push
# its (small) return values; the cap comes back at the next hook tick.
CALLBACK_ROOM = 1024 * 1024

# watchdog event types that can change a file's content or existence (inotify also
# reports opens and reads, which must not invalidate anything).
_CHANGE_EVENTS = frozenset({"created", "modified", "deleted", "moved", "closed"})


class Status(enum.StrEnum):
    """How a run ended, as the prelude reports it. The prelude gets these strings from
    here (its STATUS table), so they are written once."""

    OK = "ok"
    NOT_JSON = "not-json"  # the result cannot be sent as JSON
    TIME = "time"  # the time limit
    MEMORY = "memory"  # the memory limit
    ERROR = "error"  # the script raised an error


class ScriptError(Exception):
    """A function that cannot be run: bad name, no file, unreadable, syntax error."""


@dataclass
class _Chunk:
    signature: tuple[int, int, int, int]
    function: Any


def _watch(root: Path, runner: LuaRunner) -> Any:
    """A started watchdog observer that marks changed scripts stale. watchdog is imported
    here, not with the module: the agent's executor does without it (the check before
    every run is enough there, and watchdog costs about 5 MiB of memory per process)."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    class Invalidator(FileSystemEventHandler):
        """Runs on watchdog's thread: only records which paths changed."""

        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type not in _CHANGE_EVENTS:
                return
            if event.is_directory:
                # A folder moved or deleted takes its scripts with it; other folder events
                # (a new file inside, a new folder) change no script already compiled.
                if event.event_type in ("deleted", "moved"):
                    runner.reload()
                return
            for path in (event.src_path, getattr(event, "dest_path", "")):
                if path:
                    runner._mark_stale(os.fsdecode(path))

    observer = Observer()
    observer.daemon = True
    observer.schedule(Invalidator(), str(root), recursive=True)
    observer.start()
    return observer


class LuaRunner:
    """Runs functions from one script directory, one at a time, in one Lua state."""

    def __init__(
        self,
        script_dir: str | Path,
        *,
        kv: KV,
        agent_id: str,
        regions: Sequence[str],
        time_limit: float = 60.0,
        memory_limit: int = 64 * 1024 * 1024,
        logger: logging.Logger | None = None,
        watch_files: bool = True,
    ) -> None:
        self._root = Path(script_dir).resolve()
        self._kv = kv
        self._agent_id = agent_id
        self._regions = tuple(regions)
        self._time_limit = float(time_limit)
        self._memory_limit = int(memory_limit)
        self._log = logger or logging.getLogger("gleam.lua")
        self._chunks: dict[str, _Chunk] = {}
        self._paths: dict[str, str] = {}
        self._stale: set[str] = set()
        self._stale_lock = threading.Lock()
        self._reload_requested = False
        self._current = ""
        self._deadline = float("inf")
        self._lifted = False
        self._runtime = self._new_runtime()
        self._observer: Any = None
        if watch_files:
            if not self._root.is_dir():
                self._log.warning("script directory %s does not exist", self._root)
            else:
                self._observer = _watch(self._root, self)

    # Public face ---------------------------------------------------------------------

    @property
    def script_dir(self) -> Path:
        return self._root

    def run(self, name: str, data: JSON) -> RunOutcome:
        """Run function `name` with `data`; never raises for what a script or name does."""
        started = time.perf_counter()
        try:
            ok, result, error = self._run(name, data)
        except Exception as exc:  # noqa: BLE001 - the worker loop must survive anything
            # Not expected: lupa or a conversion failing in a way not handled above.
            self._log.exception("running %r failed unexpectedly", name)
            self._renew_runtime("after an unexpected failure")
            ok, result, error = False, None, f"internal error running {name!r}: {exc!r}"
        self._release()
        duration_ms = (time.perf_counter() - started) * 1000.0
        return RunOutcome(ok=ok, result=result, error=error, duration_ms=duration_ms)

    def reload(self) -> None:
        """Drop every cached chunk before the next run (safe from any thread)."""
        self._reload_requested = True

    def close(self) -> None:
        """Stop watching the script directory."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def __enter__(self) -> LuaRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Running -------------------------------------------------------------------------

    def _run(self, name: str, data: JSON) -> tuple[bool, JSON, str | None]:
        self._drop_stale()
        try:
            chunk = self._chunk(name)
        except ScriptError as exc:
            return False, None, str(exc)
        lua, _compile, run = self._runtime
        try:
            with self._lifted_cap(CONVERSION_ROOM):
                before = lua.get_memory_used()
                lua_data = lua_values.to_lua(lua, data)
                # The data's own size: what earlier runs left is collected as this one
                # runs (Lua collects before it refuses an allocation).
                fits = lua.get_memory_used() - before <= self._memory_limit
        except lua_values.NotJSON as exc:
            return False, None, str(exc)
        except UnicodeEncodeError:
            return False, None, "data holds a string that is not valid Unicode text"
        if not fits:
            del lua_data
            self._renew_runtime(f"the data of {name} does not fit in the memory limit")
            limit = _mib(self._memory_limit)
            return False, None, f"memory limit of {limit} exceeded by the task's data alone"
        self._current = name
        self._deadline = time.monotonic() + self._time_limit
        try:
            status, value, trace = run(chunk.function, lua_data, self._deadline)
        except lua54.LuaMemoryError:
            status, value, trace = Status.MEMORY, None, None
        except lua54.LuaError as exc:
            status, value, trace = Status.ERROR, str(exc), None
        except UnicodeDecodeError:
            status, value, trace = Status.ERROR, "the error message is not UTF-8 text", None
        finally:
            self._current = ""
            self._deadline = float("inf")
            self._rearm()
            del lua_data
        if status == Status.OK:
            with self._lifted_cap(CONVERSION_ROOM):
                outcome = self._result(name, value)
        else:
            outcome = self._failure(name, status, value, trace)
        return outcome

    def _release(self) -> None:
        """A chunk keeps the environment of its last run (and so that task's data) until
        it runs again. After a run that left the state heavy, drop the compiled chunks and
        collect, so that the next task gets the whole cap and an idle agent stays small."""
        lua = self._runtime[0]
        if lua.get_memory_used() > self._memory_limit // 2:
            self._chunks.clear()
            lua.gccollect()
            left = lua.get_memory_used()
            if left > self._memory_limit // 4:  # lupa's own references to a huge result
                self._renew_runtime(f"the last task left {_mib(left)} behind")

    def _failure(
        self, name: str, status: str, value: Any, trace: str | None
    ) -> tuple[bool, JSON, str | None]:
        if status == Status.NOT_JSON:
            return False, None, f"result is not JSON-serialisable: {value}"
        if status == Status.TIME:
            self._renew_runtime(f"{name} passed the time limit")
            return False, None, f"time limit of {self._time_limit:g} s exceeded"
        if status == Status.MEMORY:
            self._renew_runtime(f"{name} passed the memory limit")
            return False, None, f"memory limit of {_mib(self._memory_limit)} exceeded"
        if trace:
            self._log.debug("function %s failed: %s\n%s", name, value, trace)
        return False, None, f"Lua error: {value}"

    def _result(self, name: str, value: Any) -> tuple[bool, JSON, str | None]:
        try:
            result = lua_values.to_json(value)
            encoded = json.dumps(result, allow_nan=False, ensure_ascii=False)
        except lua_values.NotJSON as exc:
            return False, None, f"result is not JSON-serialisable: {exc}"
        size = len(encoded.encode("utf-8"))
        if size > MAX_RESULT_BYTES:
            return (
                False,
                None,
                f"result is {size} bytes as JSON, over the {MAX_RESULT_BYTES}-byte limit",
            )
        return True, result, None

    # Finding and compiling scripts ---------------------------------------------------

    def _chunk(self, name: str) -> _Chunk:
        path = self._paths.get(name)
        if path is None:
            try:
                parts = keys.function_path_parts(name)
            except keys.InvalidName as exc:
                raise ScriptError(str(exc)) from None
            path = os.path.join(self._root, *parts)
            if len(self._paths) > 10_000:
                self._paths.clear()
            self._paths[name] = path
        try:
            st = os.stat(path)
        except OSError as exc:
            self._chunks.pop(path, None)
            raise ScriptError(
                f"function {name!r} not found: no file {path} ({exc.strerror})"
            ) from None
        signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        cached = self._chunks.get(path)
        if cached is not None and cached.signature == signature:
            return cached
        if not stat.S_ISREG(st.st_mode):
            raise ScriptError(f"function {name!r} not found: {path} is not a regular file")
        if st.st_size > MAX_SCRIPT_BYTES:
            raise ScriptError(f"script {path} is larger than {MAX_SCRIPT_BYTES} bytes")
        chunk = _Chunk(signature, self._compile(name, path))
        self._chunks[path] = chunk
        return chunk

    def _compile(self, name: str, path: str) -> Any:
        real = os.path.realpath(path)
        if os.path.commonpath([real, str(self._root)]) != str(self._root):
            raise ScriptError(
                f"function {name!r} resolves to {real}, outside the script directory {self._root}"
            )
        try:
            with open(real, "rb") as handle:
                source = handle.read(MAX_SCRIPT_BYTES + 1)
        except OSError as exc:
            raise ScriptError(f"cannot read script {path}: {exc.strerror}") from None
        if source.startswith(b"#"):
            # A shebang line: Lua's own loader skips it for files, load() does not.
            source = b"--" + source
        chunkname = "@" + os.path.relpath(path, self._root)
        _lua, compile_chunk, _run = self._runtime
        try:
            function, error = compile_chunk(source, chunkname)
        except lua54.LuaError as exc:
            raise ScriptError(f"cannot compile {chunkname[1:]}: {exc}") from None
        if function is None:
            raise ScriptError(f"Lua syntax error: {error}")
        self._log.debug("compiled %s from %s", name, path)
        return function

    def _mark_stale(self, path: str) -> None:
        with self._stale_lock:
            self._stale.add(path)

    def _drop_stale(self) -> None:
        if self._reload_requested:
            self._reload_requested = False
            with self._stale_lock:
                self._stale.clear()
            self._chunks.clear()
            self._log.info("scripts reloaded from %s", self._root)
        if self._stale:
            with self._stale_lock:
                stale, self._stale = self._stale, set()
            for path in stale:
                self._chunks.pop(path, None)

    # The Lua runtime -----------------------------------------------------------------

    def _new_runtime(self) -> tuple[Any, Any, Any]:
        self._lifted = False
        lua = lua54.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            max_memory=self._memory_limit,
            attribute_filter=_deny_attributes,
        )
        # One table, read by name in lua_prelude.lua: nothing there depends on an order.
        host = {
            "log": self._lua_log,
            "get": self._lua_get,
            "get_dir": self._lua_get_dir,
            "set": self._lua_set,
            "delete": self._lua_delete,
            "exec": self._lua_exec,
            "now": self._hook_clock,
            "agent_id": self._agent_id,
            "regions": lua.table_from(list(self._regions)),
            "hook_count": HOOK_COUNT,
            "status": lua.table_from({s.name.lower(): s.value for s in Status}),
        }
        compile_chunk, run = lua.execute(_PRELUDE, lua.table_from(host), name="=gleam prelude")
        return lua, compile_chunk, run

    def _renew_runtime(self, why: str) -> None:
        """A run stopped by a limit may have left the state half-changed: start afresh."""
        self._log.info("new Lua state: %s", why)
        self._chunks.clear()
        self._runtime = self._new_runtime()

    # The memory cap around conversions (see the module's docstring) -------------------

    def _lift(self, room: int) -> None:
        """Allow `room` bytes above what the state uses now (never less than the cap)."""
        lua = self._runtime[0]
        ceiling = lua.get_memory_used() + room
        if ceiling > self._memory_limit:
            lua.set_max_memory(ceiling)
            self._lifted = True

    def _rearm(self) -> None:
        if self._lifted:
            self._lifted = False
            self._runtime[0].set_max_memory(self._memory_limit)

    def _fits(self) -> bool:
        """Is the state within the cap, once what earlier runs left is collected?"""
        lua = self._runtime[0]
        if lua.get_memory_used() <= self._memory_limit:
            return True
        lua.gccollect()
        used: int = lua.get_memory_used()
        return used <= self._memory_limit

    @contextlib.contextmanager
    def _lifted_cap(self, room: int) -> Iterator[None]:
        self._lift(room)
        try:
            yield
        finally:
            self._rearm()

    def _hook_clock(self) -> float:
        """The count hook's clock (every HOOK_COUNT instructions): also the moment a
        cap lifted by a callback comes back."""
        if self._lifted:
            self._rearm()
        return time.monotonic()

    # Callbacks from Lua: they never raise, errors become return values ----------------

    def _lua_log(self, level: int, text: str) -> None:
        self._log.log(level, "[%s] %s: %s", self._agent_id, self._current, text)

    # Each one that returns values to Lua first makes room for them (_lift): lupa pushes
    # them after the function returns, outside any protected call.

    def _lua_get(self, key: str) -> tuple[str | None, str | None]:
        try:
            value = self._kv.get(key)
        except Exception as exc:  # noqa: BLE001 - any KV failure is the script's error value
            self._lift(CALLBACK_ROOM)
            return None, _kv_error("Get", key, exc)
        if value is None:
            # The original's convention (etcd v2): a missing key is an error.
            self._lift(CALLBACK_ROOM)
            return None, f"gleam.Get {key}: key not found"
        # A Lua string takes its UTF-8 bytes (at most 4 per character) and a header.
        self._lift(CALLBACK_ROOM + 4 * len(value))
        return value, None

    def _lua_get_dir(self, key: str) -> tuple[Any, str | None]:
        try:
            folder = self._kv.get_dir(key)
            with self._lifted_cap(CONVERSION_ROOM):
                table = self._runtime[0].table_from(folder)
                fits = self._fits()
            if not fits:
                del table  # unreferenced: the collector takes it back
                self._lift(CALLBACK_ROOM)
                return None, (
                    f"gleam.GetDir {key}: {len(folder)} keys do not fit in the memory limit "
                    f"of {_mib(self._memory_limit)}"
                )
            self._lift(CALLBACK_ROOM)
            return table, None
        except Exception as exc:  # noqa: BLE001 - see _lua_get
            self._lift(CALLBACK_ROOM)
            return None, _kv_error("GetDir", key, exc)

    def _lua_set(self, key: str, value: Any, ttl: float | None) -> str | None:
        self._lift(CALLBACK_ROOM)
        try:
            if not isinstance(value, str):
                value = json.dumps(lua_values.to_json(value), ensure_ascii=False)
            seconds = int(-(-ttl // 1)) if ttl else None  # whole seconds, rounded up
            self._kv.set(key, value, seconds)
            return None
        except lua_values.NotJSON as exc:
            return f"gleam.Set {key}: value is not JSON-serialisable: {exc}"
        except Exception as exc:  # noqa: BLE001 - see _lua_get
            return _kv_error("Set", key, exc)

    def _lua_delete(self, key: str) -> str | None:
        self._lift(CALLBACK_ROOM)
        try:
            self._kv.delete(key)
            return None
        except Exception as exc:  # noqa: BLE001 - see _lua_get
            return _kv_error("Delete", key, exc)

    def _lua_exec(self, argv: Any, opts: Any) -> tuple[Any, Any, Any, str | None]:
        # stdout and stderr: up to processes.MAX_OUTPUT_BYTES each.
        self._lift(CALLBACK_ROOM + 2 * processes.MAX_OUTPUT_BYTES)
        try:
            request = _exec_request(argv, opts)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            return None, None, None, str(exc)
        remaining = self._deadline - time.monotonic()
        timeout = min(request.timeout, max(0.0, remaining))
        try:
            done = processes.run_program(
                request.argv,
                timeout=timeout,
                cwd=request.cwd,
                env=request.env,
                stdin=request.stdin,
            )
        except ValueError as exc:
            return None, None, None, str(exc)
        if done.truncated:
            self._log.warning("%s: output of %s truncated", self._current, request.argv[0])
        if done.exit_code is None:
            error = done.error or "failed"
            if timeout < request.timeout and "timed out" in error:
                error += " (the task's time limit)"
            return None, done.stdout, error, None
        return done.exit_code, done.stdout, done.stderr, None


@dataclass(frozen=True)
class _ExecRequest:
    argv: list[str]
    timeout: float
    cwd: str | None
    env: dict[str, str] | None
    stdin: bytes | None


def _exec_request(argv: Any, opts: Any) -> _ExecRequest:
    """Read gleam.exec's arguments (Lua tables) into a request; ValueError says what's wrong."""
    args: list[str] = []
    for i in range(1, len(argv) + 1):
        item = argv[i]
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(f"argv[{i}] must be a string, got {lua54.lua_type(item) or item!r}")
        args.append(str(item))
    if not args:
        raise ValueError("argv must hold at least the program name")
    timeout, cwd, env, stdin = DEFAULT_EXEC_TIMEOUT, None, None, None
    if opts is not None:
        for key, _ in opts.items():
            if key not in ("timeout", "cwd", "env", "stdin"):
                raise ValueError(f"unknown option {key!r} (known: timeout, cwd, env, stdin)")
        if opts["timeout"] is not None:
            timeout = opts["timeout"]
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError("timeout must be a positive number of seconds")
        if opts["cwd"] is not None:
            cwd = opts["cwd"]
            if not isinstance(cwd, str):
                raise ValueError("cwd must be a string")
        if opts["stdin"] is not None:
            stdin_value = opts["stdin"]
            if not isinstance(stdin_value, str):
                raise ValueError("stdin must be a string")
            stdin = stdin_value.encode("utf-8")
        if opts["env"] is not None:
            table = opts["env"]
            if lua54.lua_type(table) != "table":
                raise ValueError("env must be a table of names to strings (or false to unset)")
            env = dict(os.environ)
            for name, value in table.items():
                if not isinstance(name, str):
                    raise ValueError("env names must be strings")
                if value is False:
                    env.pop(name, None)
                elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    env[name] = str(value)
                else:
                    raise ValueError(f"env value of {name} must be a string or false")
    return _ExecRequest(args, float(timeout), cwd, env, stdin)


def _deny_attributes(obj: object, name: object, is_setting: bool) -> object:
    # Python callables handed to Lua must not become a way into Python: no attribute of
    # any Python object is readable or writable from a script.
    raise AttributeError("Python attributes are not accessible from gleam scripts")


def _kv_error(what: str, key: str, exc: Exception) -> str:
    if isinstance(exc, KVError):
        return f"gleam.{what} {key}: {exc}"
    text = str(exc)
    return f"gleam.{what} {key}: {type(exc).__name__}{': ' + text if text else ''}"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"
