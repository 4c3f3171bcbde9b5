"""Signed tasks (issue 12): what signing and verifying add to dispatch, and to a full
apply of the largest ops repository."""

from __future__ import annotations

import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench import dispatch, opsrepo, reconcile
from bench.harness import Context, wait_registered
from bench.observe import ResultWatch
from bench.processes import MarkerLines, reconcile_argv, run_timed, start_agent, stop_all
from bench.report import Goal, Row
from bench.stats import Series, percentile
from gleam import messages, signing

TITLE = "Signed tasks (issue 12)"
METHOD = """
*Dispatch*: the dispatch workload's measurement (a task written to a node key, to the Lua
chunk starting) with two agents side by side, one plain and one started with `-trust`;
tasks alternate between them, one at a time (plain first for even tasks, signed first
for odd ones), so that whatever the machine does meanwhile weighs on both alike. For
the trusting agent the writer signs each message (Ed25519, `gleam.signing.sign_task`)
after taking its clock stamp, so the signature's cost and the agent's check both count.
The row is the p50 of a repetition's signed tasks minus the p50 of its plain tasks.

*Full apply*: `gleam-reconcile --once` of the largest generated ops repository into an
empty prefix from a fresh clone, with and without `-sign_key`, alternating (each first
in turn); the row is how much slower the signed apply is, in per cent of the median
plain apply.
"""


def _key_files(directory: Path) -> tuple[signing.Signer, Path, Path]:
    key = Ed25519PrivateKey.generate()
    private = directory / "sign_key"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public = directory / "trusted_keys"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b" bench\n"
    )
    return signing.Signer.from_key(key), private, public


def _dispatch(ctx: Context, signer: signing.Signer, trusted: Path) -> Series:
    def sign(task: messages.Task, key: str, prev: int) -> bytes:
        return signing.sign_task(task, key=key, prev=prev, signer=signer)

    added = []
    runs = []
    for name, extra in (("plain", ()), ("signed", ("-trust", str(trusted)))):
        layout = ctx.layout(f"signing-{name}")
        fifo = ctx.dir(f"signing-{name}") / "chunk-started.fifo"
        agent = start_agent(
            endpoint=ctx.endpoint, prefix=layout.prefix, agent_id=f"{name}-1", regions=(),
            script_dir=ctx.script_dir, log_dir=ctx.log_dir, extra=(*ctx.agent_args, *extra),
        )  # fmt: skip
        runs.append(
            (name, layout, agent, MarkerLines.fifo(fifo), str(fifo), ResultWatch(ctx.etcd, layout))
        )
    try:
        for _name, layout, agent, *_rest in runs:
            wait_registered(ctx, layout, [agent], timeout=60)

        def rep(count: int) -> tuple[list[float], list[float]]:
            """`count` tasks to each agent, in turns (plain first for even tasks, signed
            first for odd ones): whatever the machine does meanwhile weighs on both."""
            senders = [
                dispatch.GleamTasks(
                    ctx,
                    watch,
                    marks,
                    fifo,
                    layout=layout,
                    agent=agent,
                    agent_id=f"{name}-1",
                    **({"encode": sign} if name == "signed" else {}),
                )  # fmt: skip
                for name, layout, agent, marks, fifo, watch in runs
            ]
            times: tuple[list[float], list[float]] = ([], [])
            for i in range(count):
                for which in (0, 1) if i % 2 == 0 else (1, 0):
                    times[which].append(senders[which].send(i)[0])
            return times

        rep(dispatch.WARMUP)
        for _ in range(ctx.reps):
            plain, signed = rep(ctx.sizes.dispatch_tasks)
            added.append((percentile(signed, 50) - percentile(plain, 50)) * 1000)
    finally:
        for *_head, watch in runs:
            watch.close()
        stop_all([run[2] for run in runs])
    return Series.of(added)


def _apply(ctx: Context, private: Path) -> tuple[int, Series]:
    # The target is stated at 10,000 manifests; the largest reconcile size
    # (100,000) would take minutes per repetition for the same ratio.
    size = min(ctx.sizes.reconcile, key=lambda n: abs(n - 10_000))
    repo = opsrepo.generate(ctx.dir(f"signing-ops-{size}"), size=size)
    log = ctx.log_dir / f"signing-reconcile-{size}.log"
    slower = []
    for rep in range(ctx.reps):
        times = {}
        runs = [("plain", ()), ("signed", ("-sign_key", str(private)))]
        for name, extra in runs if rep % 2 == 0 else runs[::-1]:  # each first in turn
            clone = ctx.workdir / f"signing-clone-{size}-{rep}-{name}"
            opsrepo.clone(repo.path, clone)
            layout = ctx.layout(f"signing-apply-{name}")
            argv = [
                *reconcile_argv(repo=clone, endpoint=ctx.endpoint, prefix=layout.prefix),
                *extra,
            ]
            times[name] = run_timed(argv, log_path=log)
            shutil.rmtree(clone, ignore_errors=True)
            # Deleted and compacted before the next apply, as the reconcile workload does:
            # etcd stays the same size, and no compaction runs beside a timed apply.
            reconcile.forget(ctx, layout)
        slower.append((times["signed"] / times["plain"] - 1) * 100)
    return size, Series.of(slower)


def run(ctx: Context) -> list[Row]:
    signer, private, trusted = _key_files(ctx.dir("signing-keys"))
    added = _dispatch(ctx, signer, trusted)
    size, slower = _apply(ctx, private)
    return [
        Row("signing", "dispatch p50 added by signing + -trust check", "ms", added,
            goals=(Goal.at_most(0.2),), note=f"{ctx.sizes.dispatch_tasks} tasks per run"),
        Row("signing", f"signed full apply vs plain, {size:,} manifests, slower by", "%",
            slower, goals=(Goal.at_most(15),) if size == 10_000 else ()),
    ]  # fmt: skip
