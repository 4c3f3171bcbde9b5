"""A generated ops repository: N manifests in git, shaped like a real fleet's.

Mostly node files (one host each) and some region files, with nested data of the kinds
operators keep (config files with variables, package lists, users, service settings),
committed with git. Deterministic for a given size and seed.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gleam import keys, messages

# Writing ten thousand files with the C dumper is several times faster than the Python one.
_Dumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# One commit identity for every generated commit, and no signing or hooks from the
# machine's git configuration.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "gleam-bench",
    "GIT_AUTHOR_EMAIL": "bench@gleam.invalid",
    "GIT_COMMITTER_NAME": "gleam-bench",
    "GIT_COMMITTER_EMAIL": "bench@gleam.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}

REGION_SHARE = 0.15
ROLES = ("web", "api", "db", "cache", "queue", "batch", "edge", "search")
SITES = ("eu1", "eu2", "us1", "us2", "ap1")
FUNCTIONS = ("config::sync", "pkg::ensure", "service::restart", "users::sync", "print")
PACKAGES = ("nginx", "postgresql-15", "redis", "haproxy", "openssl", "chrony", "rsyslog", "jq")


@dataclass(frozen=True)
class Manifest:
    """One generated manifest: its file in the repo, its etcd target, its task."""

    path: str  # relative to the repo root, e.g. tasks/nodes/web-eu1-00001.yaml
    target: keys.Target
    task: messages.Task


@dataclass(frozen=True)
class OpsRepo:
    path: Path
    manifests: tuple[Manifest, ...]

    def task_key(self, layout: keys.Layout, manifest: Manifest) -> str:
        return layout.task_key(manifest.target)


def _data(rng: random.Random, function: str, host: str) -> Any:
    """Nested data for one manifest, in the shape its function would want."""
    if function == "config::sync":
        return {
            "path": f"/etc/{rng.choice(ROLES)}/{host}.conf",
            "owner": rng.choice(("root", "app", "www-data")),
            "mode": rng.choice(("0644", "0640", "0600")),
            "vars": {
                "listen": {
                    "address": f"10.{rng.randrange(256)}.{rng.randrange(256)}.1",
                    "port": rng.choice((80, 443, 8080, 9000)),
                },
                "workers": rng.randrange(1, 65),
                "timeouts": {"read_s": rng.randrange(1, 120), "write_s": rng.randrange(1, 120)},
                "upstreams": [
                    {
                        "host": f"{rng.choice(ROLES)}-{rng.randrange(100):02d}",
                        "weight": rng.randrange(1, 10),
                    }
                    for _ in range(rng.randrange(1, 5))
                ],
                "features": {f"flag_{i}": rng.random() < 0.5 for i in range(rng.randrange(1, 6))},
            },
            "notify": [f"service::{rng.choice(('reload', 'restart'))}"],
        }
    if function == "pkg::ensure":
        return {
            "packages": [
                {
                    "name": name,
                    "version": f"{rng.randrange(1, 5)}.{rng.randrange(20)}",
                    "hold": rng.random() < 0.2,
                }
                for name in rng.sample(PACKAGES, rng.randrange(1, 5))
            ],
            "repos": [
                {
                    "name": "main",
                    "url": "https://packages.example.internal/debian",
                    "components": ["main", "contrib"],
                }
            ],
            "upgrade": rng.random() < 0.3,
        }
    if function == "service::restart":
        return {
            "unit": f"{rng.choice(ROLES)}.service",
            "strategy": {"max_unavailable": rng.randrange(1, 4), "drain_s": rng.randrange(0, 60)},
            "checks": [
                {"http": f"http://localhost:{rng.choice((80, 8080))}/health", "expect": 200}
            ],
        }
    if function == "users::sync":
        return {
            "users": [
                {
                    "name": f"user{rng.randrange(1000)}",
                    "uid": 2000 + rng.randrange(5000),
                    "groups": rng.sample(["adm", "sudo", "docker", "ops", "dev"], 2),
                    "keys": [f"ssh-ed25519 AAAAC3Nz{rng.getrandbits(128):032x} ops"],
                }
                for _ in range(rng.randrange(1, 4))
            ],
            "remove_unlisted": rng.random() < 0.5,
        }
    return {"message": f"hello from {host}", "level": rng.choice(("info", "debug"))}  # fmt: skip


def _plan(size: int, seed: int) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    rng = random.Random(seed)
    regions = round(size * REGION_SHARE)
    for index in range(size):
        site, role = SITES[index % len(SITES)], ROLES[(index // len(SITES)) % len(ROLES)]
        if index < regions:
            name = f"{site}-{role}-{index:05d}"
            target = keys.Target.region(name)
            folder = "regions"
        else:
            name = f"{role}-{site}-{index:05d}"
            target = keys.Target.node(name)
            folder = "nodes"
        function = FUNCTIONS[rng.randrange(len(FUNCTIONS))]
        data = _data(rng, function, name)
        manifest = Manifest(
            path=f"tasks/{folder}/{name}.yaml",
            target=target,
            task=messages.Task(name=function, data=data),
        )
        yield manifest, {"name": function, "data": data}


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` with the bench identity; returns stdout; raises on failure."""
    done = subprocess.run(
        ["git", *args],
        cwd=repo,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def write_manifest(repo: Path, path: str, document: dict[str, Any], *, comment: str = "") -> None:
    text = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    header = f"# {comment}\n" if comment else ""
    (repo / path).write_text(header + text, encoding="utf-8")


def generate(path: Path, *, size: int, seed: int = 0) -> OpsRepo:
    """Create a git repository at `path` holding `size` manifests, in one commit."""
    (path / "tasks" / "nodes").mkdir(parents=True, exist_ok=True)
    (path / "tasks" / "regions").mkdir(parents=True, exist_ok=True)
    manifests = []
    for manifest, document in _plan(size, seed):
        write_manifest(path, manifest.path, document, comment="managed by the ops team")
        manifests.append(manifest)
    git(path, "init", "--quiet", "--initial-branch=main")
    git(path, "config", "commit.gpgsign", "false")
    git(path, "add", "--all")
    git(path, "commit", "--quiet", "--no-verify", "-m", f"fleet: {size} manifests")
    return OpsRepo(path=path, manifests=tuple(manifests))


def clone(source: Path, destination: Path) -> None:
    """A fresh local clone (a CI job's checkout) of `source` at `destination`."""
    done = subprocess.run(
        ["git", "clone", "--quiet", str(source), str(destination)],
        env={**os.environ, **GIT_ENV}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"git clone {source} failed: {done.stderr.strip()}")
    git(destination, "config", "commit.gpgsign", "false")


def commit_change(
    repo: Path, path: str, *, name: str, data: Any, message: str = "bench: change one manifest"
) -> None:
    """Rewrite one manifest and commit it; returns as soon as `git commit` has."""
    write_manifest(repo, path, {"name": name, "data": data})
    git(repo, "add", "--", path)
    git(repo, "commit", "--quiet", "--no-verify", "-m", message)
