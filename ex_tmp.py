import time, sys
from agent.executor import LuaExecutor
from agent.lua_exec import LuaRunner
class KV: pass
e = LuaExecutor('bench/scripts', kv=KV(), agent_id='a', regions=[])
e.start()
for i in range(300): e.run('bench::noop', {'rep': i})
for k in range(3):
    N=2000; t=time.perf_counter()
    for i in range(N): e.run('bench::noop', {'rep': i})
    print('executor us/task', round((time.perf_counter()-t)/N*1e6,1))
e.close()
r = LuaRunner('bench/scripts', kv=KV(), agent_id='a', regions=[], watch_files=False)
for i in range(300): r.run('bench::noop', {'rep': i})
t=time.perf_counter()
for i in range(N): r.run('bench::noop', {'rep': i})
print('in-process us/task', round((time.perf_counter()-t)/N*1e6,1))
