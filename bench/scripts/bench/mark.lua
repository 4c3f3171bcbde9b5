-- The dispatch benchmark's task. Its first act is to write one line into the named pipe
-- the benchmark reads, which stamps the line's arrival with its own clock: that is the
-- moment the chunk started, as seen by the writer of the task.
local data = ...
local pipe = assert(io.open(data.mark, "a"))
pipe:write("LUA", data.i, "\n")
pipe:close()
return true
