-- config::sync: the data names an etcd key; write its value to the local file of the
-- same name (for example {"Name": "config::sync", "Data": "/etc/app/app.conf"}).
gleam.Debugf("%s", gleam.Data)
c, err = gleam.Get(gleam.Data)
if err ~= nil then
	gleam.Errorf("%s", err)
	error(err)
end
gleam.Debug(c)
file = assert(io.open(gleam.Data, "w"))
file:write(c)
file:close()
return {file = gleam.Data, bytes = #c}
