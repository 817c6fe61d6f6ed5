"""The compiled-rules cache: a hit gives the same rules as a fresh load; any change to a rule
file rebuilds it; a corrupt or foreign cache file is ignored."""

from __future__ import annotations

import datetime as dt
import os
import shutil

from agent.resources import shipped_rules_dir
from agent.rules.loader import load_rules

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
ROW = {"Signer": "MMSoft Design Ltd.", "Issuer": "x", "IsTrusted": True, "Timestamp": NOW, "FileName": "a.exe"}


def _hits(ruleset):
    return sorted(r.id for r in ruleset.rules if r.query.filter_row(ROW, now=NOW) is not None)


def test_cache_hit_equals_a_fresh_load_and_a_changed_file_rebuilds(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(shipped_rules_dir(), rules)
    cache = tmp_path / "cache"
    fresh = load_rules([rules], cache_dir=None)
    first = load_rules([rules], cache_dir=cache)
    assert len(list(cache.glob("rules-*.pickle"))) == 1
    hit = load_rules([rules], cache_dir=cache)
    assert hit.rules == fresh.rules and hit.problems == fresh.problems
    assert _hits(hit) == _hits(fresh) == _hits(first) != []
    # a rule edited: the cache is not used for it
    victim = sorted(rules.glob("*.yaml"))[0]
    victim.write_text(victim.read_text().replace("id:", "id: ", 1) + "\n# edited\n")
    edited = load_rules([rules], cache_dir=cache)
    assert edited.rules == load_rules([rules], cache_dir=None).rules
    broken = victim.read_text().replace("query:", "quer:", 1)
    victim.write_text(broken)
    assert load_rules([rules], cache_dir=cache).problems  # the problem is reported, not a stale rule set


def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    expected = load_rules([shipped_rules_dir()], cache_dir=None)
    load_rules([shipped_rules_dir()], cache_dir=cache)
    (path,) = cache.glob("rules-*.pickle")
    path.write_bytes(b"\x80\x05garbage")
    assert load_rules([shipped_rules_dir()], cache_dir=cache).rules == expected.rules
    assert path.read_bytes()[:2] == b"\x80\x05" and len(path.read_bytes()) > 100  # rebuilt
    # writable by others: never unpickled (a planted file could run code)
    os.chmod(path, 0o666)
    path.write_bytes(b"not a pickle")
    assert load_rules([shipped_rules_dir()], cache_dir=cache).rules == expected.rules
