-- config::sync: write one value from etcd to one local file, both named by the data.
--
--   {"Name": "config::sync", "Data": "app/app.conf"}
--
-- reads the etcd key <KEY_PREFIX>app/app.conf and writes its value to the file
-- <DIRECTORY>/app/app.conf, through a temporary file and a rename, so that a reader never
-- sees half a file. It returns {file = "app/app.conf", bytes = <size>}.
--
-- Whoever can write a task key can run this script, as the agent's user (often root).
-- Were the data a free path, a task could write any file on the host: a cron job, an
-- sshd key, a sudoers drop-in. So it reads only under KEY_PREFIX and writes only under
-- DIRECTORY, and the data must be a relative name of plain segments (letters, digits,
-- '.', '_', '-' and '/' between them): '..', '.', absolute paths, empty segments, NUL and
-- other control characters are refused with an error that says why.
--
-- Set the two places for your site here, or in the agent's environment (GLEAM_SYNC_PREFIX,
-- GLEAM_SYNC_DIR). DIRECTORY and the folders under it must exist, and only the agent's
-- user should be able to write to them: a symlink someone else put there would be
-- followed.
local KEY_PREFIX = os.getenv("GLEAM_SYNC_PREFIX") or "/config/"
local DIRECTORY = os.getenv("GLEAM_SYNC_DIR") or "/var/lib/gleam/sync"
local MAX_NAME = 255

local function fail(fmt, ...)
  error("config::sync: " .. string.format(fmt, ...), 0)
end

-- A name as it appears in an error: quoted, with control characters written as escapes.
local function quoted(text)
  return (string.format("%q", text):gsub("\\\n", "\\n"))
end

local function check_setup()
  if KEY_PREFIX:sub(1, 1) ~= "/" or KEY_PREFIX:sub(-1) ~= "/" then
    fail("KEY_PREFIX %q must start and end with '/' (edit config/sync.lua or set "
      .. "GLEAM_SYNC_PREFIX)", KEY_PREFIX)
  end
  local dir = DIRECTORY:gsub("/+$", "")
  if DIRECTORY:sub(1, 1) ~= "/" or dir == "" then
    fail("DIRECTORY %q must be an absolute path below / (edit config/sync.lua or set "
      .. "GLEAM_SYNC_DIR)", DIRECTORY)
  end
  return dir
end

-- The data as a name relative to KEY_PREFIX and DIRECTORY, or an error saying what is wrong.
local function relative_name(data, dir)
  if type(data) ~= "string" then
    fail("Data must be a file name such as \"app/app.conf\", not a %s", type(data))
  end
  if data == "" or #data > MAX_NAME then
    fail("Data must be a name of 1 to %d bytes", MAX_NAME)
  end
  if data:sub(1, 1) == "/" then
    fail("%s is an absolute path; give a name relative to %s", quoted(data), dir)
  end
  for segment in (data .. "/"):gmatch("(.-)/") do
    if segment == "" then
      fail("%s has an empty segment ('//' or a '/' at the end)", quoted(data))
    elseif segment == "." or segment == ".." then
      fail("%s has a '%s' segment; names cannot leave %s", quoted(data), segment, dir)
    elseif segment:find("[^A-Za-z0-9._%-]") then
      fail("%s has a character other than letters, digits, '.', '_', '-' and '/'", quoted(data))
    end
  end
  return data
end

local dir = check_setup()
local name = relative_name(gleam.Data, dir)
local key, path = KEY_PREFIX .. name, dir .. "/" .. name

local value, err = gleam.Get(key)
if err ~= nil then
  fail("%s", err)
end
gleam.Debugf("writing %s (%d bytes from %s)", path, #value, key)

local tmp = path .. ".gleam-sync-tmp"
local file, open_err = io.open(tmp, "wb")
if not file then
  fail("cannot write %s", open_err)
end
local written, write_err = file:write(value)
local closed, close_err = file:close()
if not (written and closed) then
  os.remove(tmp)
  fail("cannot write %s: %s", tmp, write_err or close_err)
end
local renamed, rename_err = os.rename(tmp, path)
if not renamed then
  os.remove(tmp)
  fail("cannot rename %s to %s: %s", tmp, path, rename_err)
end
return { file = name, bytes = #value }
