"""A compiled-rules cache: the parsed rule set pickled under the user's cache directory, keyed by
a hash of everything the result depends on (the rule files' paths and bytes, the attribution
file, the rule code's own source and the Python version), so any change rebuilds it.

Start-up is dominated by parsing 140 queries; unpickling their parse and compiling it again
takes about a third of that. A cache file that is missing, corrupt, from another version, not
owned by this user or writable by others is ignored and rebuilt; failing to write one is not an
error. ``RMMHUNT_CACHE_DIR`` chooses the directory; an empty value turns the cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import stat
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = b"rmmhunt-rules-cache-1"
MAX_FILES = 8
_RULE_CODE = Path(__file__).resolve().parent


def default_cache_dir() -> Path | None:
    """``$RMMHUNT_CACHE_DIR`` ("" = no cache), else ``$XDG_CACHE_HOME/rmmhunt``, else ``~/.cache/rmmhunt``
    (``%LOCALAPPDATA%\\rmmhunt\\cache`` on Windows)."""
    env = os.environ.get("RMMHUNT_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "rmmhunt" / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rmmhunt"


def cache_key(parts: list[bytes]) -> str:
    """The hash of the inputs (and of the rule code itself)."""
    h = hashlib.sha256(FORMAT)
    h.update(sys.version.encode())
    for source in sorted(_RULE_CODE.glob("*.py")) + [_RULE_CODE.parent / "schema.py"]:
        try:
            h.update(source.read_bytes())
        except OSError:
            h.update(b"?")
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _trusted(path: Path) -> bool:
    """Ours and not writable by anyone else: never unpickle what another user could have written."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
        return False
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def load_cached(directory: Path | None, key: str) -> Any | None:
    if directory is None:
        return None
    path = directory / f"rules-{key}.pickle"
    if not _trusted(path):
        return None
    try:
        with open(path, "rb") as f:
            value = pickle.load(f)
    except Exception as exc:  # corrupt, truncated, from other code: rebuilt
        log.debug("rules cache %s ignored: %s", path, exc)
        return None
    if not isinstance(value, tuple) or len(value) != 2 or value[0] != key:
        return None
    return value[1]


def store_cached(directory: Path | None, key: str, value: Any) -> None:
    if directory is None:
        return
    import tempfile  # only when the cache is written

    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = pickle.dumps((key, value), protocol=pickle.HIGHEST_PROTOCOL)
        fd, tmp = tempfile.mkstemp(prefix=".rules-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, directory / f"rules-{key}.pickle")
        except BaseException:
            os.unlink(tmp)
            raise
        kept = sorted(directory.glob("rules-*.pickle"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[MAX_FILES:]:  # a few rule sets in use at once; the oldest go
            old.unlink(missing_ok=True)
    except Exception as exc:  # a read-only home, a full disk, an unpicklable rule: no cache
        log.debug("rules cache not written: %s", exc)
