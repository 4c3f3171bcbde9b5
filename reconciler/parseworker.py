"""Parsing a large tree's manifests on two cores: this process from the front of the
list, a `python -m reconciler.parseworker` child from the back, until they meet.

YAML parsing is most of a full apply from a fresh checkout (about 80 us a manifest), and
PyYAML holds the GIL, so a thread cannot help; a second process can. The child imports
only what parsing needs (yaml, manifests, gitsource: never the etcd client), reads its
blobs by object id with its own `git cat-file --batch` (gitsource.cat_blobs, with the
same checks and size limit), and sends back, for each blob, what manifests.parse_file
gave for each of its paths: the message bytes and function name, or the errors. The
parent rebuilds the same Manifest and ManifestError values from them, and
manifests.gather then sees exactly the sequence a serial parse gives, so duplicates,
errors and their order cannot differ.

Splitting from both ends needs no plan: each side takes the next blob from its end, and
the parent stops when it reaches the lowest blob the child has sent, so a child that
starts late, or runs on a busy core, simply does less. A child that exits, or sends
anything but the next blob's results in the expected shape, is stopped and its results
are dropped: the parent parses everything itself and logs a warning. Nothing malformed
is used, and a slow child costs only time.

Frames (both ways): an 8-byte little-endian length, then a `marshal` dump. The request
is (checkout path, [(blob id, [path, ...]), ...]); each reply is a list of (blob index,
[result per path]), a result being None (no manifest), (message bytes, function name),
or a list of (path, line, message) errors. marshal reads only what the other side of a
pipe between this program's own processes wrote.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from gleam import keys
from reconciler import gitsource, manifests

log = logging.getLogger("gleam.reconcile")

# Fewer files to parse than this: one process is as fast (a child costs about 0.1 s of
# CPU to start).
THRESHOLD = 2000
# The parent looks for the child's results after every CHECK_EVERY blobs of its own;
# the child sends at most SEND_EVERY blobs' results (or SEND_BYTES of them) at a time.
CHECK_EVERY = 8
SEND_EVERY = 8
SEND_BYTES = 1 << 20

_LENGTH = struct.Struct("<Q")
Result = manifests.Manifest | list[manifests.ManifestError] | None
Job = tuple[str, list[str]]  # (blob id, the paths that hold it), as gitsource.blob_order


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worth_it(files: int) -> bool:
    """Whether parsing `files` files is worth a child process."""
    return files >= THRESHOLD and usable_cpus() > 1


# Results as they cross the pipe (pure) ----------------------------------------------


def encode_result(result: Result) -> Any:
    """parse_file's result as plain values marshal can carry."""
    if result is None:
        return None
    if isinstance(result, manifests.Manifest):
        return (result.value, result.function)
    return [(e.path, e.line, e.message) for e in result]


class Misbehaved(Exception):
    """The child sent something it should not have; the text says what."""


def decode_result(path: str, raw: Any) -> Result:
    """encode_result's value for `path` back as parse_file's result; Misbehaved for
    anything parse_file could not have given for that path."""
    target = manifests.classify(path)
    if raw is None:
        if target is not None:
            raise Misbehaved(f"no result for the manifest {path!r}")
        return None
    if isinstance(raw, tuple):
        if not isinstance(target, keys.Target):
            raise Misbehaved(f"a manifest for {path!r}, which cannot hold one")
        if len(raw) != 2 or type(raw[0]) is not bytes or type(raw[1]) is not str:
            raise Misbehaved(f"a malformed manifest for {path!r}")
        return manifests.Manifest(path, target, raw[0], name=raw[1])
    if not isinstance(raw, list) or not raw:
        raise Misbehaved(f"a malformed result for {path!r}")
    errors = []
    for error in raw:
        if (
            not isinstance(error, tuple)
            or len(error) != 3
            or type(error[0]) is not str
            or not (error[1] is None or type(error[1]) is int)
            or type(error[2]) is not str
        ):
            raise Misbehaved(f"a malformed error for {path!r}")
        errors.append(manifests.ManifestError(*error))
    return errors


def frame(value: Any) -> bytes:
    body = marshal.dumps(value)
    return _LENGTH.pack(len(body)) + body


def unframe(buffer: bytearray) -> list[Any]:
    """The complete frames at the start of `buffer`, removed from it."""
    out = []
    while len(buffer) >= _LENGTH.size:
        (size,) = _LENGTH.unpack_from(buffer)
        end = _LENGTH.size + size
        if len(buffer) < end:
            break
        try:
            out.append(marshal.loads(bytes(buffer[_LENGTH.size : end])))
        except (EOFError, ValueError, TypeError) as exc:
            raise Misbehaved(f"an unreadable frame ({exc})") from None
        del buffer[:end]
    return out


# The parent's side --------------------------------------------------------------------


class Worker:
    """The child process, started before it is needed so that its start-up overlaps the
    parent's own work; used at most once, and stopped by parse() or stop()."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @classmethod
    def start(cls, argv: Sequence[str] | None = None) -> Worker | None:
        """A started child, or None when one cannot be started (logged). `argv` is
        the command (tests start a misbehaving one)."""
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        command = list(argv or (sys.executable, "-m", "reconciler.parseworker"))
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            log.warning("could not start a parse worker (%s); parsing in one process", exc)
            return None
        return cls(proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.proc.wait()

    def parse(self, source: gitsource.Source, blobs: Sequence[tuple[str, str]]) -> list[Result]:
        """parse_file's result for each (path, blob id), in gitsource.Source.read_blobs'
        order, exactly as `[parse_file(p, raw) for p, raw in source.read_blobs(blobs)]`
        gives them; the child parses from the back. Raises what that would raise
        (gitsource.GitError), from this process's own reading."""
        jobs = gitsource.blob_order(blobs)
        try:
            return self._parse(source, jobs)
        finally:
            self.stop()

    def _parse(self, source: gitsource.Source, jobs: list[Job]) -> list[Result]:
        results: list[list[Result] | None] = [None] * len(jobs)
        child = _Child(self.proc, jobs, source.path)
        lowest = len(jobs)  # the child has sent jobs[lowest:]
        own = gitsource.cat_blobs(source.path, [oid for oid, _paths in jobs])
        try:
            index = 0
            while index < lowest:
                oid, raw = next(own)
                if oid != jobs[index][0]:
                    raise gitsource.GitError(f"git cat-file answered out of order for {oid}")
                results[index] = [manifests.parse_file(path, raw) for path in jobs[index][1]]
                index += 1
                if index % CHECK_EVERY == 0 and child.alive:
                    lowest = child.collect(results, lowest, done=index)
        finally:
            own.close()
        log.debug("parsed %d blobs here and %d in the parse worker", index, len(jobs) - index)
        out: list[Result] = []
        for done in results:
            assert done is not None
            out.extend(done)
        return out


class _Child:
    """The parent's view of the child's pipe: the request, fed by a thread (it may be
    larger than a pipe holds, and the child reads it only once started), and the
    replies, read without blocking."""

    def __init__(self, proc: subprocess.Popen[bytes], jobs: list[Job], checkout: Path) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.jobs = jobs
        self.alive = True
        self.buffer = bytearray()
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        request = frame((os.fspath(checkout), jobs))
        self.feeder = threading.Thread(
            target=_send, args=(proc.stdin, request), name="parse-worker-feed", daemon=True
        )
        self.feeder.start()

    def collect(self, results: list[list[Result] | None], lowest: int, *, done: int) -> int:
        """Take in what the child has sent: the new lowest job it has done (the parent
        has done jobs[:done]). A child that exited or misbehaved is marked dead, and
        every result it sent is dropped: the parent does all the rest."""
        try:
            ended = False
            while not ended:
                try:
                    chunk = os.read(self.fd, 1 << 20)
                except BlockingIOError:
                    break
                ended = not chunk
                self.buffer += chunk
            for reply in unframe(self.buffer):
                lowest = self._take(reply, results, lowest)
            if ended and lowest > done:
                raise Misbehaved(f"it exited (status {self.proc.wait()})")
        except Misbehaved as exc:
            log.warning("the parse worker stopped helping: %s; parsing its share here", exc)
            self.alive = False
            for index in range(done, len(results)):
                results[index] = None
            return len(results)
        return lowest

    def _take(self, reply: Any, results: list[list[Result] | None], lowest: int) -> int:
        if not isinstance(reply, list):
            raise Misbehaved("a reply that is not a list")
        for item in reply:
            if not isinstance(item, tuple) or len(item) != 2 or item[0] != lowest - 1:
                raise Misbehaved(f"a reply for another blob than #{lowest - 1}")
            index, raw = item
            paths = self.jobs[index][1]
            if not isinstance(raw, list) or len(raw) != len(paths):
                raise Misbehaved(f"a reply of the wrong length for blob #{index}")
            decoded = [decode_result(path, value) for path, value in zip(paths, raw, strict=True)]
            if results[index] is None:
                results[index] = decoded
            lowest = index
        return lowest


def _send(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (OSError, ValueError):
        pass  # the child exited (or was stopped and its pipe closed); the reader notices


# The child's side --------------------------------------------------------------------


def _read_frame(pipe: IO[bytes]) -> Any:
    head = pipe.read(_LENGTH.size)
    (size,) = _LENGTH.unpack(head)
    return marshal.loads(pipe.read(size))


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """The child: read the request, parse from the last blob back, send the results."""
    checkout, jobs = _read_frame(stdin)
    order = list(range(len(jobs) - 1, -1, -1))
    pending: list[tuple[int, list[Any]]] = []
    size = 0
    blobs = gitsource.cat_blobs(Path(checkout), [jobs[i][0] for i in order])
    for index, (oid, raw) in zip(order, blobs, strict=True):
        assert oid == jobs[index][0]
        encoded = [encode_result(manifests.parse_file(path, raw)) for path in jobs[index][1]]
        pending.append((index, encoded))
        size += len(raw)
        if len(pending) >= SEND_EVERY or size >= SEND_BYTES:
            stdout.write(frame(pending))
            stdout.flush()
            pending, size = [], 0
    if pending:
        stdout.write(frame(pending))
        stdout.flush()


def main() -> int:
    # A short-lived process that frees everything it builds by reference counting.
    gc.disable()
    # A broken pipe: the parent has all it needs and stopped reading.
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
