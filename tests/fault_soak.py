"""A long fault run: 4 agents on a 3-member etcd, tasks sent all along, and random faults.

    .venv/bin/python -m tests.fault_soak --minutes 30 --out soak/

Faults, one at a time, a few seconds apart: a member SIGKILLed and restarted, the leader
SIGKILLed and restarted, a member frozen (SIGSTOP) and thawed, an agent SIGKILLed and
restarted, a compaction, and the late write of issue 15. For that one, agent s4 is
restarted talking to member m1 through a proxy that keeps a dead client's requests alive
(tests.tcp_proxy); it runs a slow task from region `late4` (which only s4 watches and
nothing else writes); m1 is frozen; s4's result write goes out to m1 and s4 is
SIGKILLed; a newer task is written to `late4`, and s4, restarted on the other members,
runs it and records it; then m1 is thawed and answers the late write. The record must
still name the newer run. A sender writes a task every ~0.2 s to a node key or to the
region all four agents watch (through `gleam.client.send_task`), and a monitor polls the
result records all along: a record must never go back to an older revision.

At the end every fault is healed, sending stops, and the run waits until each agent's
record for each key covers the key's last write. It reports, as JSON on the last line:
faults injected (by kind), tasks sent, lost (an agent never recorded a result covering a
task it watches), duplicates (a (key, revision) run twice in one agent process, from the
agents' logs), results older than the last run (a record naming an older revision than
its agent last ran for that key), records seen going back, and late writes refused.
Exit status 0 when lost, duplicates, older results and records going back are all zero.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gleam import client, connection, keys, messages
from tests import run_history
from tests.etcd_cluster import EtcdCluster, Member
from tests.support import AgentProcess, client_for
from tests.tcp_proxy import Proxy

LAYOUT = keys.Layout("/gleam")
AGENTS = ("s1", "s2", "s3", "s4")
REGION = "all"
LATE_REGION = "late4"  # watched by s4 only, written only by the late-write fault
LATE_AGENT = "s4"
PAD = 4096  # the late-write fault's result is bigger than this: no other write is
SCRIPTS = {
    "echo": "return gleam.Data",
    # A task that takes a while, so that faults land while tasks run.
    "nap": 'gleam.exec({"sleep", "0.3"})\nreturn gleam.Data',
    "slow": "gleam.exec({'sleep', tostring(gleam.Data.sleep)})\nreturn gleam.Data",
}


FAULT_KINDS = (
    "agent-sigkill",
    "compaction",
    "late-write",
    "leader-sigkill",
    "member-sigkill",
    "member-sigstop",
)


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


@dataclass
class Agent:
    agent_id: str
    endpoints: str
    log_dir: Path
    script_dir: Path
    logs: list[Path] = field(default_factory=list)
    proc: AgentProcess | None = None

    def start(self, endpoints: str | None = None) -> None:
        log_path = self.log_dir / f"{self.agent_id}-{len(self.logs)}.log"
        self.logs.append(log_path)
        regions = f"{REGION},{LATE_REGION}" if self.agent_id == LATE_AGENT else REGION
        self.proc = AgentProcess(
            [
                "-etcd", endpoints or self.endpoints, "-prefix", LAYOUT.prefix,
                "-id", self.agent_id, "-region", regions, "-script", str(self.script_dir),
                "-ttl", "5", "-check_interval", "2",
            ],
            log_path=log_path,
        )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.stop(sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def texts(self) -> list[str]:
        return [p.read_text(encoding="utf-8", errors="replace") for p in self.logs]


class Sender:
    """Writes a task every ~0.2 s; remembers what it wrote."""

    def __init__(self, endpoints: str, rng: random.Random) -> None:
        self._etcd = client_for(endpoints)
        self._rng = rng
        self._stop = threading.Event()
        self.sent: list[tuple[str, int]] = []
        self.unknown = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._rng.uniform(0.1, 0.3)):
            n += 1
            name = self._rng.choice(AGENTS + (REGION,))
            target = keys.Target.region(name) if name == REGION else keys.Target.node(name)
            task = messages.Task(self._rng.choice(("echo", "echo", "nap")), {"n": n})
            try:
                revision = client.send_task(self._etcd, LAYOUT, target, task)
            except client.SendOutcomeUnknown as exc:
                self.unknown += 1
                say(f"send: outcome unknown: {exc}")
            except connection.ETCD_ERRORS as exc:
                self.failed += 1
                if self.failed % 20 == 1:
                    say(f"send failed ({self.failed} so far): {connection.describe_error(exc)}")
            else:
                self.sent.append((LAYOUT.task_key(target), revision))

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(60)
        self._etcd.close()


class Soak:
    def __init__(self, work: Path, rng: random.Random, kinds: frozenset[str]) -> None:
        self.work = work
        self.rng = rng
        self.kinds = kinds  # the fault kinds to choose from; empty: all
        self.cluster = EtcdCluster(3, root=str(work / "etcd"))
        self.faults: Counter[str] = Counter()
        self.proxy: Proxy | None = None
        self.agents: list[Agent] = []
        self.late_checks: list[tuple[int, int, int]] = []  # (in flight, newer, recorded)

    def start(self) -> None:
        self.cluster.start()
        m1 = self.cluster.members[0]
        self.proxy = Proxy(m1.port)
        scripts = self.work / "scripts"
        scripts.mkdir(parents=True, exist_ok=True)
        for name, body in SCRIPTS.items():
            (scripts / f"{name}.lua").write_text(body + "\n", encoding="utf-8")
        eps = self.cluster.endpoints
        orders = [
            [eps[0], eps[1], eps[2]],
            [eps[1], eps[2], eps[0]],
            [eps[2], eps[0], eps[1]],
            [self.proxy.endpoint, eps[1], eps[2]],  # s4: through the proxy to m1
        ]
        for agent_id, order in zip(AGENTS, orders, strict=True):
            agent = Agent(agent_id, ",".join(order), self.work / "agents", scripts)
            agent.log_dir.mkdir(parents=True, exist_ok=True)
            agent.start()
            self.agents.append(agent)

    # Faults ---------------------------------------------------------------------------
    def _member(self) -> Member:
        return self.rng.choice(self.cluster.members)

    def _pause(self, low: float, high: float) -> None:
        time.sleep(self.rng.uniform(low, high))

    def kill_member(self) -> None:
        member = self._member()
        say(f"fault: SIGKILL member {member.name}")
        member.kill()
        self._pause(2, 8)
        self.cluster.restart(member)

    def kill_leader(self) -> None:
        leader = self.cluster.wait_leader()
        say(f"fault: SIGKILL the leader {leader.name}")
        leader.kill()
        self._pause(2, 8)
        self.cluster.restart(leader)

    def freeze_member(self) -> None:
        member = self._member()
        say(f"fault: SIGSTOP member {member.name}")
        member.pause()
        try:
            self._pause(3, 12)
        finally:
            member.resume()
        self.cluster.wait_healthy(self.cluster.members)

    def kill_agent(self) -> None:
        agent = self.rng.choice(self.agents)
        say(f"fault: SIGKILL agent {agent.agent_id}")
        agent.kill()
        self._pause(0.5, 5)
        agent.start()

    def compact(self) -> None:
        etcd = client_for(",".join(self.cluster.endpoints))
        try:
            revision = int(etcd.put("/soak-compaction", b"x").header.revision)
            etcd.compact(revision, physical=True)
            say(f"fault: compaction at revision {revision}")
        finally:
            etcd.close()

    def late_write(self) -> str:
        """Issue 15, as tests/test_agent_faults.py reproduces it (see the docstring).
        Afterwards s4 runs on the other members (until its next restart)."""
        proxy = self.proxy
        assert proxy is not None
        m1, s4 = self.cluster.members[0], self.agents[3]
        direct = ",".join(m.endpoint for m in self.cluster.members[1:])
        target = keys.Target.region(LATE_REGION)
        key = LAYOUT.result_key(LATE_AGENT, target)
        etcd = client_for(direct)
        try:
            s4.kill()
            s4.start(proxy.endpoint)  # every loop of s4 talks to m1, through the proxy
            slow = messages.Task("slow", {"sleep": 1.5, "pad": "x" * PAD})
            dead_run = send_until_written(etcd, target, slow)
            if not wait_for(lambda: f"at revision {dead_run}" in s4.texts()[-1], 30):
                s4.kill()
                s4.start(direct)
                return "late-write-not-run"
            before = set(proxy.requests_over(PAD))
            m1.pause()
            try:
                fresh = wait_for(lambda: set(proxy.requests_over(PAD)) - before, 15)
                s4.kill()
                newer = send_until_written(etcd, target, messages.Task("echo", "newer"))
                s4.start(direct)
                if not fresh:
                    return "late-write-nothing-in-flight"
                (link, stream), *_ = fresh
                if not wait_for(lambda: recorded_revision(etcd, key) >= newer, 60):
                    say(f"late write: s4 did not record revision {newer} in time")
            finally:
                m1.resume()
            self.cluster.wait_healthy(self.cluster.members)
            if not wait_for(lambda: stream in link.answered_streams(), 60):
                say(f"late write: m1 never answered the late write of run {dead_run}")
                return "late-write-unanswered"
            held = wait_for(lambda: recorded_revision(etcd, key), 30)
            self.late_checks.append((dead_run, newer, held))
            say(f"late write: run {dead_run} in flight, newer {newer}, record holds {held}")
            return "late-write"
        finally:
            etcd.close()

    def inject(self) -> None:
        faults: dict[str, Callable[[], str | None]] = {
            "member-sigkill": self.kill_member,
            "leader-sigkill": self.kill_leader,
            "member-sigstop": self.freeze_member,
            "agent-sigkill": self.kill_agent,
            "compaction": self.compact,
            "late-write": self.late_write,
        }
        kind = self.rng.choice(sorted(k for k in faults if not self.kinds or k in self.kinds))
        try:
            self.faults[faults[kind]() or kind] += 1
        except Exception as exc:  # noqa: BLE001 - a harness hiccup must not end the run
            say(f"fault {kind} broke off: {exc!r}; healing")
            self.faults[f"{kind}-broken-off"] += 1
            self.heal()

    def heal(self) -> None:
        """Every member thawed and running, every agent running."""
        for member in self.cluster.members:
            member.resume()
            if not member.running():
                self.cluster.restart(member)
        self.cluster.wait_healthy(self.cluster.members)
        for agent in self.agents:
            if agent.proc is None or agent.proc.proc.poll() is not None:
                agent.start()

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.proxy is not None:
            self.proxy.close()
        self.cluster.close()


def wait_for(predicate: Callable[[], Any], timeout: float) -> Any:
    """The predicate's first truthy value within `timeout` seconds, or None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except connection.ETCD_ERRORS:
            value = None
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


def send_until_written(etcd: Any, target: keys.Target, task: messages.Task) -> int:
    """Send, trying again through leader changes and outages (within a minute)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.send_task(etcd, LAYOUT, target, task)
        except connection.ETCD_ERRORS:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def recorded_revision(etcd: Any, result_key: str) -> int:
    value, _meta = etcd.get(result_key)
    return 0 if value is None else messages.decode_result(value).revision


class Monitor:
    """Polls every result record: a record must never name an older revision than it
    named before (what a late write would do, however briefly)."""

    def __init__(self, endpoints: str) -> None:
        self._etcd = client_for(endpoints)
        self._stop = threading.Event()
        self.highest: dict[str, int] = {}
        self.went_back: list[tuple[str, int, int]] = []
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.check(
                    {
                        meta.key.decode(): messages.decode_result(value).revision
                        for value, meta in self._etcd.get_prefix(LAYOUT.results_prefix)
                    }
                )
            except connection.ETCD_ERRORS:
                continue

    def check(self, now: dict[str, int]) -> None:
        for key, revision in now.items():
            before = self.highest.get(key, 0)
            if revision < before and (key, before, revision) not in self.went_back:
                self.went_back.append((key, before, revision))
                say(f"monitor: {key} went back from revision {before} to {revision}")
            self.highest[key] = max(before, revision)

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(30)
            self._etcd.close()


def final_state(etcd: Any) -> dict[str, int]:
    """Task key -> its mod_revision now."""
    return {
        meta.key.decode(): int(meta.mod_revision)
        for prefix in (LAYOUT.tasks_prefix(keys.Kind.NODE), LAYOUT.tasks_prefix(keys.Kind.REGION))
        for _value, meta in etcd.get_prefix(prefix)
    }


def watchers(task_key: str) -> list[str]:
    target = LAYOUT.parse_task_key(task_key)
    assert target is not None
    if target.kind is keys.Kind.NODE:
        return [target.name]
    return [LATE_AGENT] if target.name == LATE_REGION else list(AGENTS)


def lost_tasks(
    sent: list[tuple[str, int]], records: dict[str, dict[str, int]]
) -> list[tuple[str, str, int]]:
    """Pure: (agent, key, revision) of every sent task no record of a watcher covers."""
    return [
        (agent_id, key, revision)
        for key, revision in sent
        for agent_id in watchers(key)
        if records[agent_id].get(key, 0) < revision
    ]


def settle(soak: Soak, sent: list[tuple[str, int]], *, timeout: float) -> dict[str, Any]:
    etcd = client_for(",".join(soak.cluster.endpoints))
    try:
        final = final_state(etcd)
        deadline = time.monotonic() + timeout
        while True:
            records = {a: run_history.recorded(etcd, LAYOUT, a) for a in AGENTS}
            waiting = lost_tasks(list(final.items()), records)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        # Late writes land when they land: look again a little later.
        time.sleep(5)
        records = {a: run_history.recorded(etcd, LAYOUT, a) for a in AGENTS}
        older = {
            agent.agent_id: [
                vars(m) for m in run_history.check(etcd, LAYOUT, agent.agent_id, agent.texts())
            ]
            for agent in soak.agents
        }
    finally:
        etcd.close()
    duplicates = {
        f"{agent.agent_id} process {i}": run_history.duplicates(text)
        for agent in soak.agents
        for i, text in enumerate(agent.texts())
    }
    runs = sum(len(run_history.runs(text)) for agent in soak.agents for text in agent.texts())
    return {
        "lost": lost_tasks(sent, records),
        "duplicates": {k: v for k, v in duplicates.items() if v},
        "older_than_last_run": {k: v for k, v in older.items() if v},
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to inject faults")
    parser.add_argument("--out", type=Path, help="directory for etcd data and agent logs")
    parser.add_argument("--seed", type=int, help="random seed (default: from the clock)")
    parser.add_argument(
        "--faults",
        default="",
        help=f"only these fault kinds, comma-separated ({', '.join(FAULT_KINDS)}; default all)",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be more than 0")
    kinds = frozenset(k for k in args.faults.split(",") if k)
    if kinds - set(FAULT_KINDS):
        parser.error(f"--faults: unknown kind(s) {', '.join(sorted(kinds - set(FAULT_KINDS)))}")
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    work = args.out or Path(tempfile.mkdtemp(prefix="gleam-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"fault soak: {args.minutes:g} minutes, seed {seed}, work directory {work}")
    soak = Soak(work, rng, kinds)
    started = time.monotonic()
    sender: Sender | None = None
    monitor: Monitor | None = None
    try:
        soak.start()
        monitor = Monitor(",".join(soak.cluster.endpoints))
        monitor.start()
        sender = Sender(",".join(soak.cluster.endpoints), rng)
        sender.start()
        end = started + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(rng.uniform(3, 10))
            if time.monotonic() >= end:
                break
            soak.inject()
        sender.stop()
        say("faults over; waiting for the agents to settle")
        report = settle(soak, sender.sent, timeout=180)
    finally:
        if sender is not None:
            sender.stop()
        if monitor is not None:
            monitor.stop()
        soak.close()
    late_overwrites = [c for c in soak.late_checks if c[2] < c[1]]
    summary = {
        "seed": seed,
        "minutes": round((time.monotonic() - started) / 60, 1),
        "faults": sum(soak.faults.values()),
        "faults_by_kind": dict(sorted(soak.faults.items())),
        "tasks_sent": len(sender.sent) if sender else 0,
        "sends_failed": sender.failed if sender else 0,
        "sends_outcome_unknown": sender.unknown if sender else 0,
        "runs": report["runs"],
        "lost": len(report["lost"]),
        "duplicates": sum(len(v) for v in report["duplicates"].values()),
        "older_than_last_run": sum(len(v) for v in report["older_than_last_run"].values()),
        "records_went_back": len(monitor.went_back) if monitor else 0,
        "late_writes_refused": len(soak.late_checks) - len(late_overwrites),
        "late_writes_applied": len(late_overwrites),
    }
    for what in ("lost", "duplicates", "older_than_last_run"):
        if report[what]:
            say(f"{what}: {report[what]}")
    say("summary: " + json.dumps(summary))
    bad = (
        summary["lost"]
        or summary["duplicates"]
        or summary["older_than_last_run"]
        or summary["records_went_back"]
        or summary["late_writes_applied"]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
