"""The one place that works around oscrypto 1.3.0's OpenSSL version detection.

signify imports oscrypto, and oscrypto 1.3.0 parses the libcrypto version string with the
regex ``\\b(\\d\\.\\d\\.\\d[a-z]*)\\b``. A two-digit patch number ("OpenSSL 3.0.19") defeats
it and the import dies with "Error detecting the version of libcrypto" (signify #57,
oscrypto #78). oscrypto's master branch widens the regex to ``\\d+``; that fix was never
released.

What this does, and only this: on platforms where oscrypto uses OpenSSL (not Windows, not
macOS), it installs an import hook for the two oscrypto modules that hold the regex, and
loads their own source with that one regex widened exactly as upstream did. If the
installed oscrypto no longer contains the old regex (fixed upstream), the module loads
unchanged. Nothing else in oscrypto is touched.

``install()`` must run before the first ``import signify``/``import oscrypto``;
``agent.extract`` calls it at import time.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
from types import ModuleType

log = logging.getLogger(__name__)

PATCHED_MODULES = ("oscrypto._openssl._libcrypto_ctypes", "oscrypto._openssl._libcrypto_cffi")
# The literal source text in oscrypto 1.3.0 and the upstream replacement.
OLD_PATTERN = "'\\\\b(\\\\d\\\\.\\\\d\\\\.\\\\d[a-z]*)\\\\b'"
NEW_PATTERN = "'\\\\b(\\\\d+\\\\.\\\\d+\\\\.\\\\d+[a-z]*)\\\\b'"

#: Set to the list of module names actually rewritten, for ``rmmhunt explain``/tests.
patched: list[str] = []


def needs_hook(platform: str = sys.platform) -> bool:
    """oscrypto uses CNG/CryptoAPI on Windows and Security.framework on macOS: no OpenSSL there."""
    return not (platform == "win32" or platform == "darwin")


def patch_source(source: str) -> str | None:
    """Return the source with the version regex widened, or None if it has no old regex."""
    if OLD_PATTERN not in source:
        return None
    return source.replace(OLD_PATTERN, NEW_PATTERN)


# The finder and loader follow the import protocols without the importlib.abc base classes:
# importing importlib.abc pulls in importlib.resources and tempfile, ~5 ms of every start-up.
class _VersionRegexLoader:
    def __init__(self, original: importlib.machinery.SourceFileLoader, fullname: str) -> None:
        self._original = original
        self._fullname = fullname

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        source = self._original.get_source(self._fullname)
        fixed = patch_source(source) if source else None
        if fixed is None:
            self._original.exec_module(module)
            return
        patched.append(self._fullname)
        log.debug("oscrypto: widened the libcrypto version regex in %s", self._fullname)
        code = compile(fixed, self._original.get_filename(self._fullname), "exec")
        exec(code, module.__dict__)


class _Finder:
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in PATCHED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec  # frozen or compiled-only: leave it alone
        spec.loader = _VersionRegexLoader(spec.loader, fullname)
        return spec


def install(platform: str = sys.platform) -> bool:
    """Install the hook once. Returns True when the hook is active."""
    if not needs_hook(platform):
        return False
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return True
    if any(name in sys.modules for name in PATCHED_MODULES):
        return False  # already imported (successfully): nothing to fix
    sys.meta_path.insert(0, _Finder())
    return True
