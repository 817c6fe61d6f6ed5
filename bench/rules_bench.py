"""Rules figures for `make bench` (also runnable alone: python bench/rules_bench.py).

1. Rule loading against query size: 5,000 and 40,000 `or` terms and a 50,000-item `has_any`
   (issue 6 item 6: linear, so 8x the terms costs about 8x);
2. row filtering with the whole shipped catalog: every rule per row against RuleIndex candidates.

Figures only; no pass/fail.
"""

from __future__ import annotations

import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.resources import shipped_rules_dir  # noqa: E402
from agent.rules.index import RuleIndex  # noqa: E402
from agent.rules.kql import parse_query  # noqa: E402
from agent.rules.loader import load_rules  # noqa: E402

T = "DeviceFileCertificateInfo"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _seconds(action: object, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def bench_rule_loading() -> None:
    def or_query(n: int) -> str:
        return f"{T}\n| where " + "\n    or ".join(f"Signer has 'Vendor {i}'" for i in range(n))

    small, large = or_query(5_000), or_query(40_000)
    has_any = f"{T}\n| where Signer has_any (" + ",\n".join(f"'Vendor {i} Ltd'" for i in range(50_000)) + ")"
    t_small = _seconds(lambda: parse_query(small), 3)
    t_large = _seconds(lambda: parse_query(large))
    t_any = _seconds(lambda: parse_query(has_any))
    print("\n[rules 1] rule loading against query size")
    print(f"  5,000 or terms   ({len(small) / 1000:6.0f} KB) : {t_small:7.3f}s")
    print(f"  40,000 or terms  ({len(large) / 1000:6.0f} KB) : {t_large:7.3f}s")
    print(f"  ratio 8x terms                  : {t_large / t_small:7.2f}x   (linear: about 8x; quadratic: 64x)")
    print(f"  has_any of 50,000 ({len(has_any) / 1000:5.0f} KB) : {t_any:7.3f}s")


def bench_row_filtering(count: int) -> None:
    rules = load_rules([shipped_rules_dir()]).rules
    index = RuleIndex(rules)
    rng = random.Random(1)
    signers = [str(p) for r in rules for _, _, p in r.query.string_patterns] + ["Microsoft Corporation"] * 50
    rows = [
        {"Signer": rng.choice(signers), "Issuer": "DigiCert", "Timestamp": NOW, "IsTrusted": True, "FileName": "a.exe"}
        for _ in range(count)
    ]

    def every_rule() -> int:
        return sum(1 for row in rows for rule in rules if rule.query.filter_row(row, now=NOW) is not None)

    def indexed() -> int:
        return sum(
            1 for row in rows for rule in index.candidates(row) if rule.query.filter_row(row, now=NOW) is not None
        )

    assert every_rule() == indexed()
    t_all = _seconds(every_rule)
    t_index = _seconds(indexed)
    evaluations = sum(len(index.candidates(row)) for row in rows)
    print(f"\n[rules 2] row filters, {len(rules)} rules ({index.indexed} indexed), {count} rows")
    print(f"  every rule per row              : {count / t_all:9.0f} rows/s")
    print(f"  RuleIndex candidates            : {count / t_index:9.0f} rows/s  ({evaluations / count:.1f} rules/row)")
    print(f"  ratio                           : {t_all / t_index:7.2f}x")


def main() -> int:
    bench_rule_loading()
    bench_row_filtering(5_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
