"""A real 3-member etcd cluster on loopback, for the agent's and the reconciler's fault
tests (the `etcd_cluster` fixture in conftest.py) and the fault soak: members can be
killed, stopped, restarted, frozen (SIGSTOP) and thawed, and the leader found."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from gleam.embedded import EtcdServer

# Roomier than etcd's defaults (100 ms, 1 s): a loaded 2-core machine must not see
# elections nobody asked for.
HEARTBEAT_MS = 150
ELECTION_MS = 1500


class Member(EtcdServer):
    """One member: gleam.embedded's EtcdServer (ports and data kept across kill and
    restart) with the cluster's flags, a name, and whether it is frozen now."""

    def __init__(self, name: str, data_dir: str) -> None:
        super().__init__(data_dir=data_dir)
        self.name = name
        self.paused = False

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def join(self, initial_cluster: str) -> None:
        # Later flags win over EtcdServer's single-member ones.
        self.extra_args = (
            "--name", self.name,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", "gleam-faults",
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
        )  # fmt: skip

    def launch(self) -> None:
        self.spawn()
        self.paused = False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, sig: int = signal.SIGTERM) -> None:
        super().stop(sig=sig)
        self.paused = False

    def pause(self) -> None:
        super().pause()
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None:
            super().resume()
        self.paused = False

    def status(self) -> dict[str, object] | None:
        """etcd's maintenance status (member id, leader id), or None if it does not answer."""
        request = urllib.request.Request(
            f"{self.endpoint}/v3/maintenance/status", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                found: dict[str, object] = json.loads(response.read())
                return found
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=2) as response:
                return b'"true"' in response.read()
        except (urllib.error.URLError, OSError):
            return False


class EtcdCluster:
    def __init__(self, size: int = 3, *, root: str | None = None) -> None:
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="gleam-cluster-")
        self.members = [
            Member(f"m{i}", os.path.join(self.root, f"m{i}")) for i in range(1, size + 1)
        ]
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.join(initial_cluster)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoints_flag(self) -> str:
        """All members, comma-separated, as -etcd takes them."""
        return ",".join(self.endpoints)

    def start(self, *, timeout: float = 60.0) -> EtcdCluster:
        """Start every member (again, after a stop: same ports, same data)."""
        for member in self.members:
            member.launch()
        self.wait_healthy(self.members, timeout=timeout)
        return self

    def restart(self, member: Member, *, timeout: float = 60.0) -> None:
        member.kill()
        member.launch()
        self.wait_healthy([member], timeout=timeout)

    def wait_healthy(self, members: Sequence[Member], *, timeout: float = 60.0) -> None:
        """Until each member answers /health with a leader elected."""
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(max_workers=len(members)) as pool:
            while True:
                for member in members:
                    if member.proc is not None and member.proc.poll() is not None:
                        raise RuntimeError(
                            f"etcd member {member.name} exited; see {member.data_dir}"
                        )
                if all(pool.map(Member.healthy, members)):
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"etcd cluster not healthy within {timeout}s ({self.root})")
                time.sleep(0.1)

    def leader(self) -> Member | None:
        """The member that says it leads (asked of the running, unfrozen members)."""
        ids: dict[str, Member] = {}
        leader_id = None
        for member in self.members:
            if not member.running() or member.paused:
                continue
            status = member.status()
            if status is None:
                continue
            header = status.get("header")
            if isinstance(header, dict):
                ids[str(header.get("member_id"))] = member
            leader_id = str(status.get("leader")) if status.get("leader") else leader_id
        return ids.get(leader_id) if leader_id is not None else None

    def wait_leader(self, *, timeout: float = 60.0) -> Member:
        deadline = time.monotonic() + timeout
        while True:
            found = self.leader()
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no etcd leader within {timeout}s")
            time.sleep(0.1)

    def close(self) -> None:
        for member in self.members:
            member.close()  # thawed, then killed; its data dir is the cluster's
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
