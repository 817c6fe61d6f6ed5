"""Paths and untrusted text, kept exactly and shown safely.

In memory a path is a ``str`` decoded with PEP 383 ``surrogateescape`` (what ``os.scandir``
and ``os.fsdecode`` give on POSIX): a byte that is not valid UTF-8 becomes one lone surrogate
U+DC80..U+DCFF, and ``os.fsencode`` gives the original bytes back. Such a string cannot be
written as UTF-8, so every output uses one documented, reversible escape instead:

**The path escape (percent escape).** In JSON, JSON Lines, CSV and the tables, a path-valued
field (FolderPath, FileName, process executables) is written with these characters
percent-escaped as ``%XX`` (upper-case hex of each UTF-8 byte, or of the raw byte):

- ``%`` itself (``%25``), so the escape is unambiguous;
- every byte that was not valid UTF-8 (``b"\\xff"`` -> ``%FF``);
- C0 controls, DEL and C1 controls (newline -> ``%0A``, tab -> ``%09``, ESC -> ``%1B``);
- Unicode bidirectional overrides and isolates (U+202A..U+202E, U+2066..U+2069), which can
  make a terminal show a name in a different order than it has.

Everything else is written as it is. Any percent-decoder gives the original bytes back:
``urllib.parse.unquote_to_bytes(s)`` in Python, ``decodeURIComponent``-style byte decoding
elsewhere. ``unescape_path`` does it here and returns the surrogateescape ``str`` that reopens
the file.

Other untrusted text (a signer name from a hostile certificate, a rule's evidence) gets the
same escape in the terminal views through ``display``; JSON carries it as JSON strings, which
escape control characters by themselves.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

# Characters that the path escape rewrites: '%', C0, DEL, C1, bidi controls, lone surrogates.
_ESCAPED = re.compile("[%\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _percent(match: re.Match[str]) -> str:
    char = match.group(0)
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a raw byte kept by surrogateescape
        return f"%{code - 0xDC00:02X}"
    # Other lone surrogates only come from Windows UTF-16 names: written as their WTF-8 bytes.
    data = char.encode("utf-8", "surrogatepass")
    return "".join(f"%{b:02X}" for b in data)


def escape_path(path: str) -> str:
    """The reversible percent escape of a surrogateescape path (see the module docstring)."""
    return _ESCAPED.sub(_percent, path) if _ESCAPED.search(path) else path


def unescape_path(text: str) -> str:
    """Inverse of ``escape_path``: the surrogateescape ``str`` of the original bytes."""
    if "%" not in text:
        return text
    return unquote_to_bytes(text).decode("utf-8", "surrogateescape")


def display(text: str) -> str:
    """Any untrusted text made safe for a terminal: the same escape as paths, so a newline, an
    escape sequence or a bidi override in a file or signer name is shown, never obeyed."""
    return escape_path(text)


def encodable(text: str) -> bool:
    """True when ``text`` can be written as strict UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_db(text: str) -> str | bytes:
    """A value SQLite can store exactly: the str itself, or its raw bytes when it holds
    surrogateescape bytes (SQLite columns are dynamically typed; ``from_db`` reverses it)."""
    return text if encodable(text) else text.encode("utf-8", "surrogateescape")


def from_db(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
