"""What every step of packing shares: the error it stops with, and one input."""

from __future__ import annotations

from dataclasses import dataclass, field


class PackError(RuntimeError):
    """The packing run cannot start or continue; the message says what to do."""


@dataclass
class Input:
    """One input: a row of the manifest, or an entry of a class folder."""

    source: str  # as the user named it (relative to IN), kept in the record for tracing
    url: str  # where to read it
    label: str
    split: str | None = None
    meta: dict[str, str] = field(default_factory=dict)
    # Set when the input is unusable before any decoding (bad manifest row, hidden file, duplicate).
    problem: str | None = None
    where: str | None = None  # "m.csv line 7": named in the reasons of a manifest row's rejects
    # The path's own bytes (surrogate-escaped) when a name is not UTF-8 and ``source`` shows it
    # escaped: two byte names can print alike, so the sample key hashes this.
    raw: str | None = None
