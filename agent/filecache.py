"""The file cache, looked up a batch of paths at a time instead of loaded whole.

A scan of a million files must not hold a million cache entries (about 490 bytes each): the
scanner asks for the entries of the paths it is about to examine (one indexed SELECT per
walked batch, on the (device_id, path) primary key of ``file_cache``, with the store's own
connection), and for the signed entries only when it needs to know what may be gone.
Reads only; writes stay ``Store.put_cache``/``drop_cache``/``put_dirs``.

A re-scan of an unchanged directory of files that are not signed costs one stat per file and
one comparison per batch: ``batch_digest`` covers every walked item's path, walk status, device,
inode, size and mtime, so any change there (a file added, removed, renamed, replaced, resized or
touched) misses and the batch takes the per-file path, where a changed file is examined again.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

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


def batch_key(directory: str, ordinal: int) -> str:
    """The key of a directory's ``ordinal``-th walked batch."""
    return f"{directory}\0{ordinal}"


def batch_digest(batch: Sequence[Any]) -> bytes:
    """Digest of walked items (agent.sources.walk.WalkItem): path, status, detail, st_dev, st_ino,
    size, mtime_ns and whether a symlink was followed, in walk order."""
    text = repr([(item[:7], item[9]) for item in batch])
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def lookup_dir(db: sqlite3.Connection, device_id: str, key: str) -> tuple[bytes, str] | None:
    """(digest, summary) recorded for a batch key, or None."""
    row = db.execute("SELECT digest, summary FROM dir_cache WHERE device_id=? AND batch=?", (device_id, to_db(key)))
    found = row.fetchone()
    return (bytes(found[0]), str(found[1])) if found is not None else None
