"""Where task keys came from: the reconciler's records under `<prefix>/meta/`, read for
`gleam-client status` (the commit column). Pure: it decodes values already read.

Keys the reconciler did not write (sent by hand with gleam-client) have no record and
show no commit. Records that cannot be decoded are ignored rather than failing status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gleam import keys


@dataclass(frozen=True)
class Provenance:
    """Where a task key's value came from, as the reconciler recorded it."""

    commit: str | None = None  # the git commit the reconciler wrote the value from
    owner: str | None = None  # "reconciler" when it owns the key; None when unknown


@dataclass(frozen=True)
class Origin:
    keys: Mapping[str, Provenance] = field(default_factory=dict)
    applied_commit: str | None = None  # the commit the reconciler last applied


def read(meta: Mapping[str, bytes], layout: keys.Layout) -> Origin:
    """Decode the reconciler's records (raw values by key under `layout.meta_prefix`)."""
    # The reconciler's record layout is being written now (reconciler/state.py); until it
    # lands there is nothing to decode and every commit shows as unknown.
    del meta, layout
    return Origin()
