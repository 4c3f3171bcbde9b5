-- The trivial task of the dispatch, fan-out and throughput benchmarks: the agent's own
-- cost is what is measured, so the chunk does nothing.
return true
