"""gleam-agent: run Lua tasks written to this host's node key and its regions' keys.

    gleam-agent -etcd http://etcd.example.internal:2379 -id web-1 -region eu:web \\
                -script /etc/gleam/scripts

This module is the entry point only: flags, logging, pid file, state file, signals, the
Lua executor process. The agent itself is agent.threads.Agent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from agent import config as agent_config
from agent import executor, inflight, observe, pidfile, preflight, store, trust
from agent.threads import Agent, agent_info
from gleam import connection, flags, logformat, metrics, signing
from gleam.version import VERSION

log = logging.getLogger("agent")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# What SignalPipe.wait() returns when an agent thread has died (no signal has number 0).
THREAD_DIED = 0


class SignalPipe:
    """Signals as bytes on a pipe, so that the main loop handles them in plain code (a
    Python signal handler must not take locks the interrupted code may hold)."""

    def __init__(self, signums: Sequence[int]) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, lambda *_: None)

    def wait(self) -> int | None:
        """The next signal's number; None once the pipe is closed."""
        try:
            data = os.read(self._read, 1)
        except OSError:
            return None
        return data[0] if data else None

    def wake(self) -> None:
        """Make `wait` return THREAD_DIED (from any thread)."""
        with contextlib.suppress(OSError):  # full: the main loop is awake anyway
            os.write(self._write, bytes([THREAD_DIED]))

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


def _make_runner(config: agent_config.AgentConfig) -> executor.LuaExecutor:
    """The Lua executor process, started and ready (ExecutorError if it cannot be)."""
    kv = store.EtcdKV(store.LazyClient(config.settings))
    runner = executor.LuaExecutor(
        config.executor_options(), kv=kv, logger=logging.getLogger("agent.lua")
    )
    runner.start()
    return runner


def _open_state(config: agent_config.AgentConfig) -> inflight.StartedTasks:
    """The state file; trouble with a -state_dir given is fatal (RecordError), with the
    default directory only a warning: the agent runs with in-memory records then."""
    try:
        return inflight.StartedTasks(config.state_file)
    except inflight.RecordError as exc:
        if config.state_dir_given:
            raise inflight.RecordError(f"-state_dir: {exc}") from None
        log.warning(
            "state file: %s; a task that crashes the agent may run again at every start "
            "(set -state_dir to a directory of this user's)",
            exc,
        )
        return inflight.StartedTasks()


def _refusal(config: agent_config.AgentConfig) -> str | None:
    """Why the agent must not start, checked once (agent/preflight.py): a task key its
    etcd identity may not read (with a user or a client certificate), or its id's
    registration held by another live agent (unless -takeover). etcd slow or down is no
    reason: the check gives up after at most 2 s and the agent starts as always."""
    identity = bool(config.settings.user or config.settings.cert)
    if not identity and config.takeover:
        return None
    check = store.Store(
        dataclasses.replace(config.settings, timeout=min(config.settings.timeout, 2.0))
    )
    try:
        if identity and (denied := preflight.unreadable(check, config.task_keys)) is not None:
            return denied
        if config.takeover:
            return None
        me = agent_info(config, hostname=socket.gethostname(), pid=os.getpid(), started=0.0)
        return preflight.held_by_another(check, config.layout.info_key(config.agent_id), me)
    finally:
        check.close()


def _trust_gate(config: agent_config.AgentConfig) -> trust.Gate | None:
    """The -trust keys, or None without the flag (signatures ignored); FlagError if the
    file has no usable key."""
    if config.trust_file is None:
        return None
    try:
        return trust.Gate(config.trust_file)
    except signing.KeyError_ as exc:
        raise flags.FlagError(f"-trust: {exc}") from None


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """Any thread's uncaught exception goes to the log (the -log file), with its traceback."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    log.critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


def _exit_on_second_signal(signals: SignalPipe, config: agent_config.AgentConfig) -> None:
    """While shutdown waits for the running task, SIGTERM or SIGINT again exits at once
    (the lease then expires on its own)."""
    while (signum := signals.wait()) not in (signal.SIGTERM, signal.SIGINT):
        if signum is None:
            return
    log.warning("second signal: exiting without waiting for the running task")
    if config.pid_file is not None:
        pidfile.release(config.pid_file)
    logging.shutdown()
    os._exit(EXIT_FAILURE)


def _fatal(message: str, *, to_log_file: bool) -> None:
    """Why the agent cannot start: on standard error, and in the -log file if there is one."""
    if to_log_file:
        log.error("%s", message)
    print(f"{agent_config.PROG}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, values = agent_config.parse(argv)
        flags.drop_credentials()  # parsed: from here on only `config` holds them
        metrics_address = metrics.parse_address(values.get("metrics"))
        logformat.set_process_fields(agent=config.agent_id)
        flags.setup_logging(values, name=agent_config.PROG)
        if not config.script_dir.is_dir():
            raise flags.FlagError(f"-script: {str(config.script_dir)!r} is not a directory")
        gate = _trust_gate(config)
    except (flags.FlagError, connection.ConfigError) as exc:
        print(f"{agent_config.PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if warning := config.settings.clear_text_auth_warning():
        log.warning("%s", warning)
    if (refused := _refusal(config)) is not None:
        _fatal(refused, to_log_file=bool(values.get("log")))
        return EXIT_USAGE
    if config.pid_file is not None:
        try:
            pidfile.acquire(config.pid_file)
        except pidfile.PidFileError as exc:
            _fatal(str(exc), to_log_file=bool(values.get("log")))
            return EXIT_FAILURE
    threading.excepthook = _log_thread_exception
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    try:
        try:
            started = _open_state(config)
        except inflight.RecordError as exc:
            _fatal(str(exc), to_log_file=bool(values.get("log")))
            return EXIT_FAILURE
        try:
            runner = _make_runner(config)
        except Exception as exc:  # noqa: BLE001 - reported, not a traceback
            _fatal(f"cannot start the Lua executor: {exc}", to_log_file=bool(values.get("log")))
            return EXIT_FAILURE
        agent = Agent(
            config,
            runner,
            started=started,
            on_thread_death=lambda _name: signals.wake(),
            gate=gate,
        )
        observer = observe.Observer(agent, runner=runner)  # systemd, /healthz, -metrics
        try:
            observer.start(metrics_address)
        except (metrics.ListenError, flags.FlagError) as exc:
            _fatal(str(exc), to_log_file=bool(values.get("log")))
            runner.close()
            return EXIT_FAILURE
        log.info(
            "gleam-agent %s starting: id %s, regions %s, scripts %s, etcd %s, prefix %s",
            VERSION,
            config.agent_id,
            ",".join(config.regions) or "(none)",
            config.script_dir,
            config.settings.describe(),
            config.layout.prefix,
        )
        if gate is not None:
            log.info("-trust: only tasks signed by %s run", ", ".join(gate.fingerprints))
        agent.start()
        exit_code = EXIT_OK
        while True:
            signum = signals.wait()
            if signum == THREAD_DIED:
                log.critical("an agent thread died: stopping, exit status %d", EXIT_FAILURE)
                exit_code = EXIT_FAILURE
                break
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading the scripts")
                runner.reload()
                if gate is not None:
                    gate.reload()
                continue
            if signum in (signal.SIGTERM, signal.SIGINT, None):
                log.info(
                    "%s: stopping (the running task may finish; a second signal exits now)",
                    signal.Signals(signum).name if signum else "signal pipe closed",
                )
                break
        threading.Thread(target=_exit_on_second_signal, args=(signals, config), daemon=True).start()
        observer.stopping()  # STOPPING=1
        clean = agent.shutdown()
        observer.close()
        runner.close()
        started.close()
        log.info("stopped%s", "" if clean else " (not everything finished in time)")
        return exit_code
    finally:
        signals.close()
        if config.pid_file is not None:
            pidfile.release(config.pid_file)


if __name__ == "__main__":
    sys.exit(main())
