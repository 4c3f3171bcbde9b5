"""A 3-member etcd cluster on loopback for the reconciler's fault tests, built from
gleam.embedded's EtcdServer (one per member, each keeping its ports and data across kill
and start); the `etcd_cluster` fixture in conftest.py starts one. tests/etcd_cluster.py
is the agent fault tests' cluster, with freezing and a leader wait of its own."""

from __future__ import annotations

import threading
from pathlib import Path

from gleam.embedded import EtcdServer
from tests.support import client_for, wait_until


class EmbeddedCluster:
    def __init__(self, root: Path, *, size: int = 3) -> None:
        self.members = [EtcdServer(data_dir=str(root / f"member-{i}")) for i in range(size)]
        peers = ",".join(f"m{i}=http://127.0.0.1:{m.peer_port}" for i, m in enumerate(self.members))
        for i, member in enumerate(self.members):
            # Later flags win over EtcdServer's single-member ones.
            member.extra_args = (
                "--name", f"m{i}",
                "--initial-cluster", peers,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", f"gleam-test-{id(self)}",
            )  # fmt: skip

    @property
    def endpoints(self) -> str:
        """All members, comma-separated, as -etcd takes them."""
        return ",".join(m.endpoint for m in self.members)

    def start(self) -> None:
        """Start every member at once: none is healthy before a quorum is up."""
        errors: list[BaseException] = []

        def run(member: EtcdServer) -> None:
            try:
                member.start(timeout=60)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(m,)) for m in self.members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def leader(self) -> EtcdServer:
        """The member that is leader now, as the members themselves say."""

        def find() -> EtcdServer | None:
            for member in self.members:
                if member.proc is None or member.proc.poll() is not None:
                    continue
                client = client_for(member.endpoint)
                try:
                    leader = client.status().leader
                    if leader is not None and member.endpoint in leader.client_urls:
                        return member
                finally:
                    client.close()
            return None

        found = wait_until(find, timeout=30, what="an etcd leader")
        assert found is not None
        return found

    def close(self) -> None:
        for member in self.members:
            member.close()
