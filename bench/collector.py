"""Collector figures (issue 9): ingest rows/s on SQLite and PostgreSQL, and fleet-hunt latency
over a large store (default 1,000,000 rows), for the whole shipped catalog.

Rows are synthetic DeviceFileCertificateInfo rows (tests/collector/fleetdata.py): a share of
them (--hit-fraction) signed by RMM vendors the rules name, the rest by generic signers, spread
over devices and the last 8 days. Ingest goes through Collector.ingest, the path the API and
`collector import` use (idempotency check, rule filters through the term index, hits).

    python bench/collector.py [--rows 1000000] [--ingest-rows 20000] [--backends sqlite,postgresql]

Figures only; no pass/fail. Writes bench/results-collector.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.resources import shipped_rules_dir  # noqa: E402
from agent.rules.loader import load_rules  # noqa: E402
from collector.storage import Collector  # noqa: E402
from tests.collector.fleetdata import make_row, signers_of  # noqa: E402
from tests.collector.pgserver import start_pg  # noqa: E402

GENERIC = [
    "Microsoft Corporation",
    "Google LLC",
    "Mozilla Corporation",
    "Simon Tatham",
    "win.rar GmbH",
    "Oracle America, Inc.",
    "Adobe Inc.",
    "Intel Corporation",
    "NVIDIA Corporation",
    "Dell Inc",
]
BATCH = 1000  # the agent's batch size


def iter_rows(
    rules,
    n: int,
    hit_fraction: float,
    now: dt.datetime,
    devices: int,
    seed: int = 1,
    first_device: int = 0,
    tools_per_device: int = 0,
):
    """Rows over ``devices``; a ``hit_fraction`` share signed by RMM vendors, drawn from
    ``tools_per_device`` vendors per device (0: from all of them, the worst case)."""
    rnd = random.Random(seed)
    rmm = signers_of(rules)
    per_device = [rnd.sample(rmm, tools_per_device) if tools_per_device else rmm for _ in range(devices)]
    counters = [0] * devices
    for _ in range(n):
        d = rnd.randrange(devices)
        counters[d] += 1
        signer = rnd.choice(per_device[d]) if rnd.random() < hit_fraction else rnd.choice(GENERIC)
        ts = now - dt.timedelta(seconds=rnd.uniform(0, 8 * 86400))
        yield make_row(first_device + d, counters[d], signer, ts)


def ingest(collector: Collector, rows, batch: int = BATCH) -> tuple[int, float, float]:
    """(rows, wall seconds, CPU seconds of this process). Rows are made before the clock starts,
    one batch at a time; only ingest is timed. On a shared machine the CPU figure is the steadier
    one (for SQLite it is all the work; for PostgreSQL the server's CPU is not in it)."""
    count = 0
    elapsed = cpu = 0.0
    rows = iter(rows)
    while True:
        chunk = list(itertools.islice(rows, batch))
        if not chunk:
            return count, elapsed, cpu
        started, cpu_started = time.perf_counter(), time.process_time()
        collector.ingest(chunk)
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        count += len(chunk)


def fast_load(collector: Collector, rules, args, now: dt.datetime, n: int) -> int:
    """Fill the store for the hunt-latency figure without paying the ingest path per row.

    The hits of every distinct Signer are computed once, by the collector's real filters
    (``plan.ingest.filter_row`` on a row with that Signer). Each generated row then copies the
    hits of its Signer; the rules read only Signer and FileName, and the generated FileNames
    (agentN.exe) match no rule. Rows and hits are written with executemany (SQLite) or COPY
    (PostgreSQL)."""
    from collector.storage import _bulk_insert_ignore, cert_rows, hits

    signer_hits: dict[str, list[str]] = {}
    for signer in signers_of(rules) + GENERIC:
        probe = make_row(0, 1, signer, now)
        signer_hits[signer] = [p.rule.id for p in collector.plans if p.ingest.filter_row(probe, now=now) is not None]
    done = 0
    chunk = 50_000
    rows = iter_rows(
        rules, n, args.hit_fraction, now, 5000, seed=3, first_device=10_000, tools_per_device=args.tools_per_device
    )
    pg = collector.engine.dialect.name == "postgresql"
    while done < n:
        batch = list(itertools.islice(rows, chunk))
        if not batch:
            break
        hit_records = [
            {
                "ruleset": collector.ruleset,
                "rule_id": rule_id,
                "device_id": r["DeviceId"],
                "report_id": r["ReportId"],
                "evidence": "[]",
            }
            for r in batch
            for rule_id in signer_hits[r["Signer"]]
        ]
        with collector.engine.begin() as conn:
            if pg:
                _copy(conn, cert_rows, batch)
                _copy(conn, hits, hit_records)
            else:
                _bulk_insert_ignore(conn, cert_rows, batch)
                _bulk_insert_ignore(conn, hits, hit_records)
        done += len(batch)
    return done


def _copy(conn, table, records) -> None:
    names = [c.name for c in table.columns]
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        cols = ", ".join(f'"{c}"' for c in names)
        with cur.copy(f'COPY "{table.name}" ({cols}) FROM STDIN') as copy:
            for rec in records:
                values = []
                for name in names:
                    value = rec.get(name)
                    if isinstance(value, dt.datetime):
                        value = value.astimezone(dt.UTC).replace(tzinfo=None)
                    values.append(value)
                copy.write_row(values)


def bench_backend(name: str, url: str, rules, args, now: dt.datetime) -> dict:
    out: dict = {"backend": name}
    collector = Collector(url, rules)
    try:
        collector.start(background=False)
        for k, (mix, fraction) in enumerate((("hits", 1.0), ("all", 0.1))):
            rows = iter_rows(rules, args.ingest_rows, fraction, now, 500, seed=k, first_device=k * 1000)
            n, secs, cpu = ingest(collector, rows)
            out[f"ingest_rows_per_s_{mix}"] = round(n / secs)
            out[f"ingest_rows_per_cpu_s_{mix}"] = round(n / cpu)
            print(
                f"{name}: ingest ({mix}: {fraction:.0%} RMM rows) {n / secs:,.0f} rows/s wall, "
                f"{n / cpu:,.0f} rows per CPU-second of the collector (goal >= 10,000)"
            )
        have = collector.count_rows()
        if args.rows > have and args.load == "fast":
            started = time.perf_counter()
            n = fast_load(collector, rules, args, now, args.rows - have)
            secs = time.perf_counter() - started
            out["load_rows_per_s"] = round(n / secs)
            print(
                f"{name}: bulk-loaded {n:,} more rows ({args.tools_per_device or 'all'} RMM vendors per device) "
                f"in {secs:.0f}s"
            )
        elif args.rows > have:
            started = time.perf_counter()
            n, secs, _cpu = ingest(
                collector,
                iter_rows(
                    rules,
                    args.rows - have,
                    args.hit_fraction,
                    now,
                    5000,
                    seed=3,
                    first_device=10_000,
                    tools_per_device=args.tools_per_device,
                ),
                batch=10000,
            )
            out["load_rows_per_s"] = round(n / secs)
            print(
                f"{name}: loaded {n:,} more rows ({args.tools_per_device or 'all'} RMM vendors per device) "
                f"in {time.perf_counter() - started:.0f}s ({n / secs:,.0f} rows/s)"
            )
        out["stored_rows"] = collector.count_rows()
        timings = []
        cpu_timings = []  # this process only: all of the work on SQLite, the client's share on PostgreSQL
        for _ in range(args.repeat):
            started, cpu_started = time.perf_counter(), time.process_time()
            results = collector.hunt(now=now)
            timings.append(time.perf_counter() - started)
            cpu_timings.append(time.process_time() - cpu_started)
        out["fleet_hunt_seconds_median"] = round(statistics.median(timings), 3)
        out["fleet_hunt_cpu_seconds_median"] = round(statistics.median(cpu_timings), 3)
        out["fleet_hunt_results"] = len(results)
        print(
            f"{name}: fleet hunt over {out['stored_rows']:,} rows, {len(rules)} rules: "
            f"{statistics.median(timings):.2f}s median of {args.repeat}, {statistics.median(cpu_timings):.2f}s CPU "
            f"of this process ({len(results)} results; goal: a few seconds)"
        )
    finally:
        collector.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows stored for the hunt latency")
    parser.add_argument("--ingest-rows", type=int, default=20_000, help="rows per ingest measurement")
    parser.add_argument("--hit-fraction", type=float, default=0.5, help="share of RMM rows in the large store")
    parser.add_argument(
        "--tools-per-device", type=int, default=3, help="RMM vendors per device in the large store (0: all of them)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--load",
        choices=("fast", "ingest"),
        default="fast",
        help="how the large store is filled: bulk with per-signer hits (fast) or through Collector.ingest",
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-collector.json"))
    args = parser.parse_args()
    rules = list(load_rules([shipped_rules_dir()]).rules)
    now = dt.datetime.now(dt.UTC)
    results = []
    with tempfile.TemporaryDirectory(prefix="rmmhunt-bench-") as tmp:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                results.append(bench_backend("sqlite", f"sqlite:///{tmp}/collector.sqlite3", rules, args, now))
            elif backend == "postgresql":
                server = start_pg()
                try:
                    results.append(bench_backend("postgresql", server.url, rules, args, now))
                finally:
                    server.stop()
            else:
                parser.error(f"unknown backend {backend}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
