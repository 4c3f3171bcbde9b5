-- The Lua side of gleam's script runner, run once per Lua runtime (agent/lua_exec.py).
--
-- It builds the environment scripts see and returns two functions, compile and run.
-- Everything that must stay out of a script's reach (debug, the hook, the real globals,
-- the Python callbacks) lives in locals of this chunk: scripts only ever see the
-- per-run environment made by new_env.

-- One table from Python (lua_exec.LuaRunner._new_runtime), read by name: the callbacks,
-- the agent's identity, and the status strings a run ends with (lua_exec.Status).
local host = ...
local py_log, py_get, py_get_dir, py_set, py_delete = host.log, host.get, host.get_dir, host.set, host.delete
local py_exec, py_now = host.exec, host.now
local agent_id, region_list, hook_count = host.agent_id, host.regions, host.hook_count
local STATUS = host.status

local debug_sethook, debug_setupvalue, debug_traceback = debug.sethook, debug.setupvalue, debug.traceback
local raw_load, raw_pcall, raw_xpcall, raw_error = load, pcall, xpcall, error
local type, tostring, select, setmetatable, next = type, tostring, select, setmetatable, next
local co_create, co_resume, co_close = coroutine.create, coroutine.resume, coroutine.close
local string_format, string_gsub, table_concat = string.format, string.gsub, table.concat
local math_huge, utf8_len = math.huge, utf8.len
local raw_getmetatable, raw_randomseed, raw_setlocale = getmetatable, math.randomseed, os.setlocale
local io_type, io_input, io_output, io_stdin, io_stdout = io.type, io.input, io.output, io.stdin, io.stdout
local file_close = io_stdout.close

-- Nothing from Python stays reachable through the real globals or require's cache.
python = nil
package.loaded.python = nil
debug = nil
package.loaded.debug = nil

local TIME_LIMIT = "time limit exceeded"
local MEMORY = "not enough memory"  -- Lua's own message for an allocation failure

local deadline = math_huge
local tripped = nil  -- STATUS.time or STATUS.memory once this run has hit a limit
local current_env = nil

-- The count hook: every hook_count instructions, compare the clock with the deadline.
-- Once tripped it raises on every tick, without asking the clock again.
local function hook()
  if tripped == STATUS.time or py_now() > deadline then
    tripped = STATUS.time
    raw_error(TIME_LIMIT, 0)
  end
end

-- pcall, xpcall, coroutine.resume and friends catch errors; a limit error must not be
-- caught for good, so the wrappers raise it again as soon as it comes back to them.
local function check(ok, ...)
  if not ok then
    if tripped == nil and (...) == MEMORY then
      tripped = STATUS.memory
    end
    if tripped == STATUS.time then
      raw_error(TIME_LIMIT, 0)
    elseif tripped == STATUS.memory then
      raw_error(MEMORY, 0)
    end
  end
  return ok, ...
end

local function pcall_(f, ...)
  return check(raw_pcall(f, ...))
end

-- Lua runs a message handler where the error was raised; for an error raised by the
-- hook that is inside the hook, where hooks are off, so the script's handler could loop
-- forever. It never sees limit errors.
local function xpcall_(f, handler, ...)
  local function guarded(e)
    if tripped ~= nil then
      return e
    end
    return handler(e)
  end
  return check(raw_xpcall(f, guarded, ...))
end

-- Lua runs __gc metamethods with hooks off, so one could loop past the time limit.
local raw_setmetatable, rawget_ = setmetatable, rawget
local function setmetatable_(t, mt)
  if type(mt) == "table" and rawget_(mt, "__gc") ~= nil then
    raw_error("__gc metamethods are not allowed in gleam scripts", 2)
  end
  return raw_setmetatable(t, mt)
end

-- New coroutines get the hook too (Lua keeps hook functions per thread).
local function co_create_(f)
  local co = co_create(f)
  debug_sethook(co, hook, "", hook_count)
  return co
end

local function co_resume_(co, ...)
  return check(co_resume(co, ...))
end

local function co_close_(co)
  return check(co_close(co))
end

local function wrap_results(co, ok, ...)
  if ok then
    return ...
  end
  check(false, ...)
  co_close(co)
  raw_error((...), 0)
end

local function co_wrap_(f)
  local co = co_create_(f)
  return function(...)
    return wrap_results(co, co_resume(co, ...))
  end
end

local function load_(chunk, name, mode, env)
  -- Text only: binary chunks can crash the VM. The default environment is the
  -- running script's, never the real globals.
  if env == nil then
    env = current_env
  end
  return raw_load(chunk, name, "t", env)
end

-- The collector is shared by every run: a script may run or measure it, not stop or
-- retune it for the runs after it.
local raw_collectgarbage = collectgarbage
local collect_options = { collect = true, count = true, step = true, isrunning = true }
local function collectgarbage_(opt, ...)
  if opt ~= nil and not collect_options[opt] then
    raw_error("collectgarbage('" .. tostring(opt) .. "') is not allowed in gleam scripts", 2)
  end
  return raw_collectgarbage(opt, ...)
end

local function not_allowed(what, instead)
  return function()
    raw_error(what .. " is not allowed in gleam scripts" .. (instead or ""), 2)
  end
end

-- Logging ----------------------------------------------------------------------------

local function joined(...)
  local n = select("#", ...)
  if n == 1 then
    return tostring((...))
  end
  local parts = {}
  for i = 1, n do
    parts[i] = tostring((select(i, ...)))
  end
  return table_concat(parts, " ")
end

local gleam_base = {}
local levels = { Debug = 10, Message = 20, Warning = 30, Error = 40 }
for name, level in next, levels do
  gleam_base[name] = function(...)
    py_log(level, joined(...))
  end
  local fname = "gleam." .. name .. "f"
  gleam_base[name .. "f"] = function(fmt, ...)
    local ok, text = raw_pcall(string_format, fmt, ...)
    if not ok then
      -- Blame the script's line, not this one.
      raw_error(fname .. ": " .. tostring(text), 2)
    end
    py_log(level, text)
  end
end

-- etcd -------------------------------------------------------------------------------

local function want_key(fname, key)
  if type(key) ~= "string" or key == "" then
    raw_error(string_format("bad argument #1 to 'gleam.%s' (non-empty string key expected, got %s)",
      fname, type(key) == "string" and "empty string" or type(key)), 3)
  end
end

gleam_base.Get = function(key)
  want_key("Get", key)
  return py_get(key)
end

gleam_base.GetDir = function(key)
  want_key("GetDir", key)
  return py_get_dir(key)
end

gleam_base.Set = function(key, value, ttl)
  want_key("Set", key)
  local kind = type(value)
  if kind == "number" or kind == "boolean" then
    value = tostring(value)
  elseif kind ~= "string" and kind ~= "table" then
    raw_error("bad argument #2 to 'gleam.Set' (string, number, boolean or table expected, got "
      .. kind .. ")", 2)
  end
  if ttl ~= nil and (type(ttl) ~= "number" or ttl < 0 or ttl ~= ttl) then
    raw_error("bad argument #3 to 'gleam.Set' (ttl must be a number of seconds >= 0)", 2)
  end
  return py_set(key, value, ttl)
end

gleam_base.Delete = function(key)
  want_key("Delete", key)
  return py_delete(key)
end

-- Programs ---------------------------------------------------------------------------

gleam_base.exec = function(argv, opts)
  if type(argv) ~= "table" then
    raw_error("bad argument #1 to 'gleam.exec' (table of strings expected, got " .. type(argv) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    raw_error("bad argument #2 to 'gleam.exec' (table expected, got " .. type(opts) .. ")", 2)
  end
  local code, out, err, bad = py_exec(argv, opts)
  if bad ~= nil then
    raw_error("bad argument to 'gleam.exec' (" .. bad .. ")", 2)
  end
  return code, out, err
end

gleam_base.id = agent_id

-- What a run leaves behind ----------------------------------------------------------
--
-- One Lua state serves run after run, so whatever the standard library keeps between
-- calls is shared: the FILE* and string metatables, the default input and output files,
-- the random generator, the process's locale, open files. Each is either out of reach or
-- put back when the run ends (end_of_run), so that nothing one task does reaches the next.

-- Every open file shares one metatable, every string another. A script that could get at
-- them could swap a file method or add a __gc (which runs with hooks off, past the time
-- limit) for every later run; getmetatable only shows scripts the metatables of tables.
raw_getmetatable(io_stdout).__metatable = false
raw_getmetatable("").__metatable = false
local function getmetatable_(value)
  if type(value) ~= "table" then
    return nil
  end
  return raw_getmetatable(value)
end

-- Files a run opened and did not close are closed when it ends: the agent's descriptors
-- are not the script's to use up. Weak keys, so a closed, dropped file is not kept alive.
local opened = setmetatable({}, { __mode = "k" })
local function track(file, ...)
  if io_type(file) == "file" then
    opened[file] = true
  end
  return file, ...
end

-- The wrappers call the library function protected and raise its error again at the
-- script's line, as if the script had called it (not at a line of this prelude).
local function rethrow(ok, ...)
  if ok then
    return ...
  end
  check(false, ...)  -- a limit error stays a limit error
  raw_error((...), 3)
end

local function tracking(open)
  return function(...)
    return track(rethrow(raw_pcall(open, ...)))
  end
end

-- io.lines(name) hands its file back as a fourth value (for the generic for to close).
local raw_lines = io.lines
local function lines_(...)
  local iterate, a, b, file = rethrow(raw_pcall(raw_lines, ...))
  if file == nil then
    return iterate
  end
  track(file)
  return iterate, a, b, file
end

-- io.input(name) and io.output(name) open a file and make it the default.
local function default_file(set)
  return function(file)
    local current = rethrow(raw_pcall(set, file))
    if type(file) == "string" then
      track(current)
    end
    return current
  end
end

-- math.randomseed(42) would make the next run's math.random predictable.
local reseeded = false
local function randomseed_(...)
  reseeded = true
  return raw_randomseed(...)
end

-- The locale belongs to the whole agent process (it changes how numbers are read and
-- written everywhere); a script may read it, not change it.
local function setlocale_(locale, category)
  if locale ~= nil then
    raw_error("os.setlocale can only read the locale in gleam scripts (it is the whole agent's)", 2)
  end
  return raw_setlocale(nil, category)
end

local function end_of_run()
  io_input(io_stdin)
  io_output(io_stdout)
  if next(opened) ~= nil then
    for file in next, opened do
      if io_type(file) == "file" then
        raw_pcall(file_close, file)
      end
      opened[file] = nil
    end
  end
  if reseeded then
    reseeded = false
    raw_randomseed()
  end
end

-- The environment --------------------------------------------------------------------

-- Library tables are shared by every run; a script gets a fresh, empty proxy per run, so
-- what it assigns into `string` or `os` stays in its own run. pairs() walks the library
-- without handing the library table out: the state it returns is the proxy itself.
local function proxy_meta(lib)
  local function walk(_, key)
    return next(lib, key)
  end
  return {
    __index = lib,
    __pairs = function(proxy)
      return walk, proxy, nil
    end,
    __metatable = false,
  }
end

local function with(lib, overrides)
  local copy = {}
  for k, v in next, lib do
    copy[k] = v
  end
  for k, v in next, overrides do
    copy[k] = v
  end
  return copy
end

local libraries = {
  string = proxy_meta(string),
  table = proxy_meta(table),
  math = proxy_meta(with(math, { randomseed = randomseed_ })),
  utf8 = proxy_meta(utf8),
  io = proxy_meta(with(io, {
    popen = not_allowed("io.popen", ": use gleam.exec"),
    open = tracking(io.open),
    tmpfile = tracking(io.tmpfile),
    lines = lines_,
    input = default_file(io_input),
    output = default_file(io_output),
  })),
  os = proxy_meta(with(os, {
    exit = not_allowed("os.exit"),
    execute = not_allowed("os.execute", ": use gleam.exec"),
    setlocale = setlocale_,
  })),
  coroutine = proxy_meta(with(coroutine, {
    create = co_create_, resume = co_resume_, wrap = co_wrap_, close = co_close_,
  })),
  debug = proxy_meta({ traceback = debug_traceback }),
}

local base = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
  pcall = pcall_, xpcall = xpcall_, rawequal = rawequal, rawget = rawget, rawlen = rawlen,
  rawset = rawset, select = select, setmetatable = setmetatable_, getmetatable = getmetatable_,
  tonumber = tonumber, tostring = tostring, type = type, collectgarbage = collectgarbage_,
  load = load_, print = gleam_base.Message, _VERSION = _VERSION,
}
local env_meta = { __index = base, __metatable = false }
local gleam_meta = { __index = gleam_base, __metatable = false }

local function new_env(data)
  local regions = {}
  for i = 1, #region_list do
    regions[i] = region_list[i]
  end
  local env = setmetatable({
    gleam = setmetatable({ Data = data, regions = regions }, gleam_meta),
  }, env_meta)
  env._G = env
  for name, meta in next, libraries do
    env[name] = setmetatable({}, meta)
  end
  return env
end

-- Compiling and running --------------------------------------------------------------

local placeholder_env = {}

local function compile(source, chunkname)
  local chunk, err = raw_load(source, chunkname, "t", placeholder_env)
  return chunk, err
end

local function describe(e)
  if type(e) == "string" then
    return e
  end
  if type(e) == "number" then
    return tostring(e)
  end
  local mt = getmetatable(e)
  if mt ~= nil and type(mt) == "table" and mt.__tostring ~= nil then
    local ok, text = raw_pcall(tostring, e)
    if ok and type(text) == "string" then
      return text
    end
  end
  return "(error object is a " .. type(e) .. " value)"
end

local function handler(e)
  if tripped ~= nil then
    return e
  end
  return { describe(e), debug_traceback("", 2) }
end

local function utf8_clean(text)
  if utf8_len(text) == nil then
    text = string_gsub(text, "[\128-\255]", "?")
  end
  return text
end

local function finish(ok, value)
  local limit = tripped
  tripped, deadline, current_env = nil, math_huge, nil
  end_of_run()
  -- Always three values, so that Python always gets a tuple.
  if limit ~= nil then
    return limit, nil, nil
  end
  if ok then
    if type(value) == "string" and utf8_len(value) == nil then
      return STATUS.not_json, "result holds a string that is not UTF-8 text", nil
    end
    return STATUS.ok, value, nil
  end
  if value == MEMORY then
    return STATUS.memory, nil, nil
  end
  if type(value) == "table" then
    return STATUS.error, utf8_clean(value[1]), value[2]
  end
  return STATUS.error, utf8_clean(tostring(value)), nil
end

local function run(chunk, data, run_deadline)
  deadline, tripped = run_deadline, nil
  local env = new_env(data)
  current_env = env
  debug_setupvalue(chunk, 1, env)  -- a main chunk's only upvalue is its _ENV
  return finish(raw_xpcall(chunk, handler, data))
end

debug_sethook(hook, "", hook_count)

return compile, run
