"""Wiping variables from the environment block a process started with.

The kernel keeps a process's initial environment (the `NAME=value` strings execve gave
it) in the process's own memory, and /proc/<pid>/environ reads it from there, for any
process of the same user. Removing a variable from os.environ (unsetenv) only drops the
pointer to its string, so the text stays readable; `wipe` overwrites it with zero bytes.
Linux only, and best effort: elsewhere, or where /proc refuses, it does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

# /proc/<pid>/stat: env_start and env_end are fields 50 and 51 (Linux 3.5 and later),
# counted from 1; after the ")" that closes the command name the fields start at 3.
_ENV_START_FIELD = 50


def wipe(names: Iterable[str]) -> int:
    """Overwrite each `NAME=value` entry of the initial environment for `names` with zero
    bytes; returns how many entries were wiped. Call it only after the names have left
    os.environ: nothing may still point at the strings."""
    prefixes = tuple(name.encode() + b"=" for name in names)
    if not prefixes:
        return 0
    try:
        start, end = _block_range()
        with open("/proc/self/environ", "rb") as fh:
            expected = fh.read()
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            block = mem.read(end - start)
            if block != expected:  # not the block /proc shows: touch nothing
                return 0
            wiped = 0
            for offset, entry in _entries(block):
                if entry.startswith(prefixes):
                    mem.seek(start + offset)
                    mem.write(bytes(len(entry)))
                    wiped += 1
            return wiped
    except (OSError, ValueError, IndexError):
        return 0


def _block_range() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    first = _ENV_START_FIELD - 3
    start, end = int(fields[first]), int(fields[first + 1])
    if not 0 < start < end:
        raise ValueError("no environment block")
    return start, end


def _entries(block: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, text) of each NUL-terminated entry in the block."""
    offset = 0
    for entry in block.split(b"\0"):
        if entry:
            yield offset, entry
        offset += len(entry) + 1
