"""gleam-agent: run Lua tasks written to this host's node key and its regions' keys.

    gleam-agent -etcd http://etcd.example.internal:2379 -id web-1 -region eu:web \\
                -script /etc/gleam/scripts

This module is the entry point only: flags, logging, pid file, signals. The agent itself
is agent.daemon.Agent.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from agent import config as agent_config
from agent import pidfile, store
from agent.daemon import Agent
from gleam import connection, flags
from gleam.version import VERSION

log = logging.getLogger("agent")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class SignalPipe:
    """Signals as bytes on a pipe, so that the main loop handles them in plain code (a
    Python signal handler must not take locks the interrupted code may hold)."""

    def __init__(self, signums: Sequence[int]) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, lambda *_: None)

    def wait(self) -> int:
        while True:
            data = os.read(self._read, 1)
            if data:
                return data[0]

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


def _make_runner(config: agent_config.AgentConfig) -> Any:
    from agent import lua_exec  # the Lua runtime loads only when an agent starts

    kv = lua_exec.EtcdKV(store.LazyClient(config.settings))
    return lua_exec.LuaRunner(
        config.script_dir,
        kv=kv,
        agent_id=config.agent_id,
        regions=config.regions,
        time_limit=config.task_timeout,
        memory_limit=config.memory_limit,
        logger=logging.getLogger("agent.lua"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, values = agent_config.parse(argv)
        flags.setup_logging(values, name=agent_config.PROG)
        if not config.script_dir.is_dir():
            raise flags.FlagError(f"-script: {str(config.script_dir)!r} is not a directory")
    except (flags.FlagError, connection.ConfigError) as exc:
        print(f"{agent_config.PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if config.pid_file is not None:
        try:
            pidfile.acquire(config.pid_file)
        except pidfile.PidFileError as exc:
            log.error("%s", exc)
            print(f"{agent_config.PROG}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    try:
        try:
            runner = _make_runner(config)
        except Exception as exc:  # noqa: BLE001 - reported, not a traceback
            log.error("cannot start the Lua runtime: %s", exc)
            print(f"{agent_config.PROG}: cannot start the Lua runtime: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        agent = Agent(config, runner)
        log.info(
            "gleam-agent %s starting: id %s, regions %s, scripts %s, etcd %s, prefix %s",
            VERSION,
            config.agent_id,
            ",".join(config.regions) or "(none)",
            config.script_dir,
            config.settings.describe(),
            config.layout.prefix,
        )
        agent.start()
        while True:
            signum = signals.wait()
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading the scripts")
                runner.reload()
                continue
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: stopping", signal.Signals(signum).name)
                break
        clean = agent.shutdown()
        runner.close()
        log.info("stopped%s", "" if clean else " (not everything finished in time)")
        return EXIT_OK
    finally:
        signals.close()
        if config.pid_file is not None:
            pidfile.release(config.pid_file)


if __name__ == "__main__":
    sys.exit(main())
