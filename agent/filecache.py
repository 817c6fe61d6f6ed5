"""The file cache, looked up a batch of paths at a time instead of loaded whole.

A scan of a million files must not hold a million cache entries (about 490 bytes each): the
scanner asks for the entries of the paths it is about to examine (one indexed SELECT per
walked batch, on the (device_id, path) primary key of ``file_cache``, with the store's own
connection), and for the signed entries only when it needs to know what may be gone.
Reads only; writes stay ``Store.put_cache``/``drop_cache``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence

from agent.store import CacheEntry
from agent.textenc import from_db, to_db

_COLUMNS = "path, st_dev, st_ino, size, mtime_ns, status, kind, facts, last_emitted"
CHUNK = 500  # bound parameters per SELECT (SQLite's old default limit is 999)


def lookup(db: sqlite3.Connection, device_id: str, paths: Sequence[str]) -> dict[str, CacheEntry]:
    """path -> cache entry for those of ``paths`` that have one."""
    out: dict[str, CacheEntry] = {}
    for i in range(0, len(paths), CHUNK):
        chunk = paths[i : i + CHUNK]
        marks = ",".join("?" * len(chunk))
        cur = db.execute(
            f"SELECT {_COLUMNS} FROM file_cache WHERE device_id=? AND path IN ({marks})",
            (device_id, *(to_db(p) for p in chunk)),
        )
        for row in cur:
            out[from_db(row[0])] = CacheEntry._make(row[1:])
    return out


def iter_signed(db: sqlite3.Connection, device_id: str) -> Iterator[tuple[str, CacheEntry]]:
    """(path, entry) of every cached file with signer facts (a few thousand, never every path)."""
    cur = db.execute(f"SELECT {_COLUMNS} FROM file_cache WHERE device_id=? AND facts IS NOT NULL", (device_id,))
    for row in cur:
        yield from_db(row[0]), CacheEntry._make(row[1:])
