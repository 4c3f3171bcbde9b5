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
or a list of (path, line, message) errors; no reply is empty. marshal reads only what
the other side of a pipe between this program's own processes wrote. A child whose
stdin ends before the request starts (its parent went away) exits 1 without a word; a
broken request, or flags other than `--list CHECKOUT`, exit 2 with one line on stderr.

A child started by reconciler.launch before the parent's imports (`--list CHECKOUT`)
gets no request: it lists HEAD's tree itself, says which blobs it listed (jobs_digest)
in its first frame, and parses them. The parent uses it only when that digest is its
own list's; otherwise it is dropped like a child that misbehaved. The child writes
without blocking, keeping what the pipe cannot take yet, so that it parses on while the
parent is still importing.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from gleam import keys
from reconciler import gitsource, launch, manifests
from reconciler.launch import usable_cpus as usable_cpus

log = logging.getLogger("gleam.reconcile")

THRESHOLD = launch.MIN_FILES
# The parent looks for the child's results after every CHECK_EVERY blobs of its own;
# the child sends at most SEND_EVERY blobs' results (or SEND_BYTES of them) at a time.
CHECK_EVERY = 8
SEND_EVERY = 8
SEND_BYTES = 1 << 20
# No frame is larger: a reply holds at most SEND_EVERY blobs' results (a blob of at most
# manifests.MAX_FILE_BYTES, its message about as large, for each of its paths). A longer
# length is a broken child, not something to buffer for.
MAX_FRAME = 64 << 20

_LENGTH = struct.Struct("<Q")
Result = manifests.Manifest | list[manifests.ManifestError] | None
Job = tuple[str, list[str]]  # (blob id, the paths that hold it), as gitsource.blob_order
LISTED = "listed"  # the first frame's tag from a child that listed the tree itself


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


def jobs_digest(jobs: Sequence[Job]) -> str:
    """A digest of a job list (blob ids and their paths, in order)."""
    h = hashlib.sha256()
    for oid, paths in jobs:
        h.update(oid.encode("ascii", "replace"))
        for path in paths:
            h.update(b"\0" + path.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def frame(value: Any) -> bytes:
    body = marshal.dumps(value)
    return _LENGTH.pack(len(body)) + body


def unframe(buffer: bytearray) -> list[Any]:
    """The complete frames at the start of `buffer`, removed from it."""
    out = []
    while len(buffer) >= _LENGTH.size:
        (size,) = _LENGTH.unpack_from(buffer)
        if size > MAX_FRAME:
            raise Misbehaved(f"a frame of {size} bytes")
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
    parent's own work; used at most once. Whoever holds it stops it, and only that one:
    `with worker:` (or stop()) around everything between its start and its results,
    so that no path (an error, invalid manifests, a read that parses too little to use
    it) leaves it running. `listed`: it lists HEAD itself (started by
    reconciler.launch) instead of reading a request."""

    def __init__(self, proc: subprocess.Popen[bytes], *, listed: bool = False) -> None:
        self.proc = proc
        self.listed = listed

    @classmethod
    def start(cls, argv: Sequence[str] | None = None) -> Worker | None:
        """A started child, or None when one cannot be started (logged). `argv` is
        the command (tests start a misbehaving one)."""
        try:
            proc = launch.spawn_worker(argv)
        except OSError as exc:
            log.warning("could not start a parse worker (%s); parsing in one process", exc)
            return None
        return cls(proc)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill the child (it may still be parsing blobs this process has done) and
        reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.proc.wait()

    def parse(self, source: gitsource.Source, blobs: Sequence[tuple[str, str]]) -> list[Result]:
        """parse_file's result for each (path, blob id), in gitsource.Source.read_blobs'
        order (each blob's paths in turn), exactly as parse_file gives them (through
        manifests.parse_paths); the child parses from the back. Raises what that would raise
        (gitsource.GitError), from this process's own reading. The child is left for
        the holder to stop."""
        return self._parse(source, gitsource.blob_order(blobs))

    def _parse(self, source: gitsource.Source, jobs: list[Job]) -> list[Result]:
        results: list[list[Result] | None] = [None] * len(jobs)
        child = _Child(self.proc, jobs, None if self.listed else source.path)
        lowest = len(jobs)  # the child has sent jobs[lowest:]
        own = gitsource.cat_blobs(source.path, [oid for oid, _paths in jobs])
        try:
            index = 0
            while index < lowest:
                oid, raw = next(own)
                if oid != jobs[index][0]:
                    raise gitsource.GitError(f"git cat-file answered out of order for {oid}")
                results[index] = manifests.parse_paths(jobs[index][1], raw)
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
    larger than a pipe holds, and the child reads it only once started), or, from a
    child that listed the tree itself (`checkout` None), the digest of its list to
    check first; then the replies, read without blocking."""

    def __init__(
        self, proc: subprocess.Popen[bytes], jobs: list[Job], checkout: Path | None
    ) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.jobs = jobs
        self.alive = True
        self.buffer = bytearray()
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.digest = None if checkout is not None else jobs_digest(jobs)
        if checkout is None:
            return
        request = frame((os.fspath(checkout), jobs))
        threading.Thread(
            target=_send, args=(proc.stdin, request), name="parse-worker-feed", daemon=True
        ).start()

    def collect(self, results: list[list[Result] | None], lowest: int, *, done: int) -> int:
        """Take in what the child has sent: the new lowest job it has done (the parent
        has done jobs[:done]). A child that exited or misbehaved is marked dead, and
        every result it sent is dropped: the parent does all the rest."""
        try:
            ended = False
            # At most one largest frame more per look (what is left in the buffer is less
            # than a frame): a child that writes on and on, faster than this loop reads,
            # can neither keep the parent here nor fill its memory.
            while not ended and len(self.buffer) <= MAX_FRAME:
                try:
                    chunk = os.read(self.fd, 1 << 20)
                except BlockingIOError:
                    break
                ended = not chunk
                self.buffer += chunk
            for reply in unframe(self.buffer):
                if self.digest is not None:
                    self._check_listing(reply)
                    continue
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

    def _check_listing(self, reply: Any) -> None:
        if reply != (LISTED, self.digest):
            said = "?"
            if isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[1], str):
                said = repr(reply[1][:12])
            raise Misbehaved(f"it listed other files (digest {said}) than this pass reads")
        self.digest = None

    def _take(self, reply: Any, results: list[list[Result] | None], lowest: int) -> int:
        # Each reply must move the child on by a blob at least (it sends none empty),
        # so it can send no more of them than there are blobs.
        if not isinstance(reply, list):
            raise Misbehaved("a reply that is not a list")
        if not reply:
            raise Misbehaved("an empty reply")
        for item in reply:
            if lowest == 0:
                raise Misbehaved("a reply past the first blob")
            # type(...) is int: 3.0 == 3, and a float cannot index the jobs.
            if not isinstance(item, tuple) or len(item) != 2 or type(item[0]) is not int:
                raise Misbehaved(f"a reply for another blob than #{lowest - 1}")
            if item[0] != lowest - 1:
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


# A worker reconciler.launch started before the imports, until a pass takes it. Module
# state because it is started before anything that could hold it exists.
_prestarted: Worker | None = None


@contextlib.contextmanager
def offered(proc: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """Offer the child reconciler.launch started (`proc`, if any) to the passes run in
    the block (take_prestarted); on leaving it, stop it if none took it (an
    incremental pass, a --worktree one, an error before anything was read)."""
    if proc is not None:
        adopt_prestarted(proc)
    try:
        yield
    finally:
        discard_prestarted()


def adopt_prestarted(proc: subprocess.Popen[bytes]) -> None:
    global _prestarted
    discard_prestarted()
    _prestarted = Worker(proc, listed=True)


def take_prestarted() -> Worker | None:
    """The prestarted worker, once: the taker holds it from then on (and stops it)."""
    global _prestarted
    worker, _prestarted = _prestarted, None
    return worker


def discard_prestarted() -> None:
    """Stop the prestarted worker if no pass took it (offered's end, or a pass that
    has no use for a list of HEAD: an incremental one)."""
    worker = take_prestarted()
    if worker is not None:
        worker.stop()


def _send(pipe: IO[bytes], data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (OSError, ValueError):
        pass  # the child exited (or was stopped and its pipe closed); the reader notices


# The child's side --------------------------------------------------------------------


class BadRequest(Exception):
    """The request on stdin is missing or malformed; the text says how."""


class NoRequest(BadRequest):
    """stdin ended before a byte of the request: the parent went away (or never meant
    to send one). Nothing to say about it."""


def _read_request(pipe: IO[bytes]) -> tuple[Path, list[Job]]:
    """The request: (checkout, jobs). A length is read in chunks as the bytes arrive,
    so a wrong one costs no more memory than what was really sent."""
    head = pipe.read(_LENGTH.size)
    if not head:
        raise NoRequest("no request on stdin")
    if len(head) < _LENGTH.size:
        raise BadRequest("the request ends inside its length")
    (size,) = _LENGTH.unpack(head)
    body = bytearray()
    while len(body) < size:
        chunk = pipe.read(min(size - len(body), SEND_BYTES))
        if not chunk:
            raise BadRequest(f"the request ends after {len(body)} of its {size} bytes")
        body += chunk
    try:
        value = marshal.loads(body)
    except (EOFError, ValueError, TypeError) as exc:
        raise BadRequest(f"the request cannot be read ({exc})") from None
    return request_from(value)


def request_from(value: Any) -> tuple[Path, list[Job]]:
    """A decoded request as (checkout, jobs), or BadRequest for any other shape. Pure."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise BadRequest("the request is not a (checkout, jobs) pair")
    where, jobs = value
    if type(where) is not str or not where or "\0" in where:
        raise BadRequest("the request's checkout is not a path")
    if not isinstance(jobs, list):
        raise BadRequest("the request's jobs are not a list")
    for job in jobs:
        if (
            not isinstance(job, tuple)
            or len(job) != 2
            or type(job[0]) is not str
            or not gitsource.OID.fullmatch(job[0])
            or not isinstance(job[1], list)
            or not job[1]
            or any(type(path) is not str for path in job[1])
        ):
            raise BadRequest("a job of the request is not (blob id, [path, ...])")
    return Path(where), jobs


class _Writer:
    """Frames to stdout without blocking: what the pipe cannot take yet is kept and
    sent with the next frame, so that the child parses on while the parent is busy
    elsewhere (a pipe holds 64 KiB, about 150 manifests' results; it is enlarged to
    1 MiB where Linux allows)."""

    def __init__(self, out: IO[bytes]) -> None:
        out.flush()
        self.out = out
        self.pending = bytearray()
        try:
            self.fd: int | None = out.fileno()
        except OSError:  # not a file (tests): plain writes
            self.fd = None
            return
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, SEND_BYTES)
        os.set_blocking(self.fd, False)

    def send(self, value: Any) -> None:
        if self.fd is None:
            self.out.write(frame(value))
            return
        self.pending += frame(value)
        with contextlib.suppress(BlockingIOError):
            while self.pending:
                del self.pending[: os.write(self.fd, self.pending)]

    def close(self) -> None:
        if self.fd is None:
            return
        os.set_blocking(self.fd, True)
        while self.pending:
            del self.pending[: os.write(self.fd, self.pending)]


def serve(stdin: IO[bytes] | None, stdout: IO[bytes], *, listed: Path | None = None) -> None:
    """The child: read the request (or list HEAD of the checkout `listed`, and say what
    it listed), parse from the last blob back, send the results."""
    if listed is not None:
        source = gitsource.Source(listed)
        jobs = gitsource.blob_order(source.list_tree(source.head()).blobs)
        checkout = source.path
    else:
        assert stdin is not None
        checkout, jobs = _read_request(stdin)
    writer = _Writer(stdout)
    if listed is not None:
        writer.send((LISTED, jobs_digest(jobs)))
    order = list(range(len(jobs) - 1, -1, -1))
    pending: list[tuple[int, list[Any]]] = []
    size = 0
    blobs = gitsource.cat_blobs(checkout, [jobs[i][0] for i in order])
    for index, (oid, raw) in zip(order, blobs, strict=True):
        assert oid == jobs[index][0]
        encoded = [encode_result(result) for result in manifests.parse_paths(jobs[index][1], raw)]
        pending.append((index, encoded))
        size += len(raw)
        if len(pending) >= SEND_EVERY or size >= SEND_BYTES:
            writer.send(pending)
            pending, size = [], 0
    if pending:
        writer.send(pending)
    writer.close()


USAGE = (
    "usage: python -m reconciler.parseworker [--list CHECKOUT] (parse HEAD of CHECKOUT, "
    "or without it what the request on stdin names)"
)


def main(argv: Sequence[str] | None = None) -> int:
    """0 once every result is sent (or the parent stopped reading, or git failed: the
    parent reads the same checkout and reports it); 1 with no request, 2 with a bad
    one or bad flags, saying so in one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and (len(args) != 2 or args[0] != "--list" or not args[1]):
        print(f"reconciler.parseworker: {USAGE}", file=sys.stderr)
        return 2
    # A short-lived process that frees everything it builds by reference counting.
    gc.disable()
    try:
        # A broken pipe: the parent has all it needs and stopped reading.
        # A git error while listing: the parent reads the same checkout and reports it.
        with contextlib.suppress(BrokenPipeError, KeyboardInterrupt, gitsource.GitError):
            if args:
                serve(None, sys.stdout.buffer, listed=Path(args[1]))
            else:
                serve(sys.stdin.buffer, sys.stdout.buffer)
    except NoRequest:
        return 1
    except BadRequest as exc:
        print(f"reconciler.parseworker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
