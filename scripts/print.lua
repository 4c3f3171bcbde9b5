-- print: log the task's data (one line per field when it is a table) and return it.
if type(gleam.Data) == "table" then
	for k, v in pairs(gleam.Data) do
		gleam.Debugf("%s => %s", k, v)
	end
else
	gleam.Debugf("%s", gleam.Data)
end
gleam.Message("print ran on", gleam.id)
return gleam.Data
