from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TEST_ROOT_CA = FIXTURES / "pki" / "root-ca.pem"
REFERENCE = ROOT.parent / "shared" / "reference"
# Debian's headless Chromium for every browser test (Playwright with executable_path), with the
# flags that keep it off this machine's closed network.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def manifest() -> list[dict]:
    return json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))


def fixture_entry(name: str) -> dict:
    for entry in manifest():
        if entry["path"] == f"files/{name}":
            return entry
    raise KeyError(name)


@pytest.fixture(autouse=True)
def no_leaked_threads_or_processes():
    """Guard: a test must not leave threads or child processes running behind it."""
    import psutil

    me = psutil.Process()
    children_before = {c.pid for c in me.children(recursive=True)}
    before = set(threading.enumerate())
    yield
    new_children = [c for c in me.children(recursive=True) if c.pid not in children_before]
    _gone, alive = psutil.wait_procs(new_children, timeout=5)
    for proc in alive:
        proc.kill()
    assert not alive, f"test leaked child processes: {[p.pid for p in alive]}"
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked threads: {still}"


@pytest.fixture
def hostile_tree(tmp_path):
    """A generated tree of hostile file names (invalid UTF-8, controls, ESC, 255-byte names, a path
    past PATH_MAX) with signed Pulseway copies under some of them: see tests/hostile_tree.py."""
    from tests.hostile_tree import make_hostile_tree

    return make_hostile_tree(tmp_path)
