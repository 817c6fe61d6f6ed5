"""`make bench`: every performance goal of SPEC.md section 7 / issue 12, measured in ONE run.

Each row is today's measure next to its goal, as a ratio against a baseline taken in the
same run where the goal is a ratio (the machine is shared and noisy: medians and ratios).
The rows are printed as a table and written to ``bench/results.json``.

  first-scan      first scan of a generated tree (1 % signed PE) vs `find -type f | xargs head -c 64`
  cold-scan       first scan of /usr with the page cache dropped vs the same serial floor, cold
  re-scan         re-scan of the unchanged tree vs `find -type f -printf '%s %T@\\n'`
  extraction      signer facts per signed PE, no verification, vs LIEF's full parse, in memory
  verify-*        full verification: warm chains / amortised over the corpus / first file
  hunt            `hunt` rows/s over stored rows with the whole catalog
  ingest          build + match + store, µs per row, inside a scan transaction
  rss             peak RSS of a first scan + re-scan of a tree of empty files, at two sizes
  startup         `rmmhunt scan EMPTY_DIR`, wall

BENCH_QUICK=1 runs smaller sizes. Other benches (bench/rules_bench.py, ...) run after these.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.extract.authenticode import TrustVerifier, extract_stream, load_roots  # noqa: E402
from agent.resources import shipped_rules_dir  # noqa: E402
from agent.rows import Device, build_rows  # noqa: E402
from agent.rules.loader import load_rules  # noqa: E402
from agent.scanner import Matcher, Scanner, ScanStats  # noqa: E402
from agent.store import Store  # noqa: E402
from bench import rules_bench  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "files"
NOT_SIGNED = {
    "text.exe",
    "empty.exe",
    "unsigned.exe",
    "truncated_certtable.exe",
    "bad_wincert_length.exe",
    "garbage_pkcs7.exe",
}
SIGNED = [p for p in sorted(FIXTURES.iterdir()) if p.suffix == ".exe" and p.name not in NOT_SIGNED]
ROOT_CA = ROOT / "tests" / "fixtures" / "pki" / "root-ca.pem"
RESULTS = Path(__file__).resolve().parent / "results.json"
PY = sys.executable
DEVICE = Device("b" * 40, "bench")


@dataclass
class Row:
    key: str
    measure: str
    today: str  # today's measure, as printed
    goal: str
    value: float | None  # the figure the goal is about (a ratio, ms, rows/s, MB, s)
    unit: str
    met: bool | None  # None: not measured
    detail: str = ""


ROWS: list[Row] = []


def record(row: Row) -> None:
    ROWS.append(row)
    mark = {True: "ok ", False: "NOT", None: "-- "}[row.met]
    print(f"  [{mark}] {row.measure:<58s} {row.today:<26s} goal {row.goal}", flush=True)
    if row.detail:
        print(f"         {row.detail}", flush=True)


# --- helpers
def _sh(cmd: str) -> tuple[float, float]:
    """(wall, CPU of the children) seconds for one shell command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _median(fn: Callable[[], tuple[float, float]], n: int) -> tuple[float, float]:
    runs = [fn() for _ in range(n)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def drop_caches() -> str:
    """'' when the page cache was dropped, else why not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return ""
    except OSError as exc:
        return f"drop_caches not possible: {exc.strerror or exc}"


def catalog_matcher() -> Matcher:
    return Matcher(load_rules([shipped_rules_dir()]).rules)


def make_tree(base: Path, count: int) -> None:
    """count files in 100-file directories; 1 in 100 a signed PE, 1 in 3 an MZ blob without PE header."""
    pe_bytes = [p.read_bytes() for p in SIGNED]
    blob = b"MZ" + os.urandom(200)
    d = base
    for i in range(count):
        if i % 100 == 0:
            d = base / f"d{i // 1000:04d}" / f"s{(i // 100) % 10}"
            d.mkdir(parents=True, exist_ok=True)
        if i % 100 == 50:
            name, data = f"f{i}.exe", pe_bytes[(i // 100) % len(pe_bytes)]
        elif i % 3 == 0:
            name, data = f"f{i}.dll", blob
        else:
            name, data = f"f{i}.txt", b"log line %d\n" % i * 20
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)


def time_scan(roots: list[str], state: Path, matcher: Matcher, verify: bool = True) -> tuple[float, float, ScanStats]:
    """(wall, CPU, stats) of one in-process scan."""
    verifier = TrustVerifier(load_roots([ROOT_CA])) if verify else None
    with Store(state / "rmmhunt.sqlite3") as store:
        scanner = Scanner(
            store,
            DEVICE,
            matcher,
            verifier,
            max_file_size=1 << 28,
            file_time_budget=30,
            reobserve_interval=86400,
        )
        cpu0, start = time.process_time(), time.perf_counter()
        stats = scanner.scan(roots)
        return time.perf_counter() - start, time.process_time() - cpu0, stats


# --- 1 + 3: first scan and re-scan of a warm tree
def bench_tree(count: int, work: Path, matcher: Matcher) -> None:
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    t0 = time.perf_counter()
    make_tree(tree, count)
    print(f"  (generated {count} files in {time.perf_counter() - t0:.1f}s)")
    _sh(f"find {tree} -type f -print0 | xargs -0 head -c 64")  # warm the page cache
    floor_wall, floor_cpu = _median(lambda: _sh(f"find {tree} -type f -print0 | xargs -0 head -c 64"), 3)
    stat_wall, _ = _median(lambda: _sh(f"find {tree} -type f -printf '%s %T@\\n'"), 3)
    firsts, rescans = [], []
    for _ in range(2):
        state = work / "state-tree"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        wall, cpu, stats = time_scan([str(tree)], state, matcher)
        firsts.append((wall, cpu))
        rescans.append(time_scan([str(tree)], state, matcher)[:2])
    first_wall = statistics.median(w for w, _ in firsts)
    first_cpu = statistics.median(c for _, c in firsts)
    rescan_wall = min(w for w, _ in rescans)
    ratio = first_wall / floor_wall
    record(
        Row(
            "first-scan",
            f"first scan vs find|xargs head -c 64 ({count} files)",
            f"{ratio:.1f}x (CPU {first_cpu / max(floor_cpu, 1e-9):.1f}x)",
            "<= 3x",
            round(ratio, 2),
            "x",
            ratio <= 3,
            f"scan {first_wall:.2f}s ({count / first_wall:.0f} files/s), floor {floor_wall:.2f}s; "
            f"signed={stats.signed_files} parsed={stats.parsed}",
        )
    )
    ratio = rescan_wall / stat_wall
    record(
        Row(
            "re-scan",
            "re-scan unchanged tree vs find -printf '%s %T@'",
            f"{ratio:.1f}x",
            "<= 1.5x",
            round(ratio, 2),
            "x",
            ratio <= 1.5,
            f"re-scan {rescan_wall:.2f}s, stat walk {stat_wall:.2f}s",
        )
    )


# --- 2: cold page cache
def bench_cold(root: str, work: Path, matcher: Matcher) -> None:
    why = drop_caches()
    if why:
        record(
            Row(
                "cold-scan",
                f"first scan, cold page cache ({root})",
                "skipped",
                "<= 0.7x serial floor",
                None,
                "x",
                None,
                why,
            )
        )
        return
    floor_wall, _ = _sh(f"find {root} -xdev -type f -print0 | xargs -0 head -c 64")
    state = work / "state-cold"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    drop_caches()
    wall, _cpu, stats = time_scan([root], state, matcher)
    ratio = wall / floor_wall
    record(
        Row(
            "cold-scan",
            f"first scan, cold page cache ({root}) vs serial floor",
            f"{ratio:.2f}x",
            "<= 0.7x",
            round(ratio, 2),
            "x",
            ratio <= 0.7,
            f"scan {wall:.1f}s for {stats.files} files, cold floor {floor_wall:.1f}s",
        )
    )


# --- 4: extraction vs LIEF
def _per_file(fn: Callable[[bytes], object], datas: list[bytes], rounds: int) -> float:
    runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        for data in datas:
            fn(data)
        runs.append((time.perf_counter() - start) / len(datas))
    return statistics.median(runs)


def bench_extraction(rounds: int) -> None:
    datas = [p.read_bytes() for p in SIGNED]
    ours = _per_file(lambda d: extract_stream(io.BytesIO(d), len(d), verifier=None), datas, rounds)
    try:
        import lief
    except ImportError:
        record(
            Row(
                "extraction",
                "signer extraction vs LIEF full parse",
                f"{ours * 1000:.3f} ms",
                "<= 1.0x",
                None,
                "x",
                None,
                "LIEF not installed (pip install '.[bench]')",
            )
        )
        return
    lief.logging.disable()

    def with_lief(data: bytes) -> None:
        binary = lief.PE.parse(list(data))
        for sig in binary.signatures:
            for signer in sig.signers:
                _ = signer.cert.subject if signer.cert else None

    theirs = _per_file(with_lief, datas, rounds)
    ratio = ours / theirs
    record(
        Row(
            "extraction",
            f"signer extraction, no verification, vs LIEF {lief.__version__}",
            f"{ratio:.2f}x",
            "<= 1.0x",
            round(ratio, 2),
            "x",
            ratio <= 1.0,
            f"rmmhunt {ours * 1000:.3f} ms/file, LIEF {theirs * 1000:.3f} ms/file ({len(datas)} fixtures)",
        )
    )


# --- 5: verification
_FIRST_FILE = """
import io, sys, time
from pathlib import Path
from agent.extract.authenticode import TrustVerifier, extract_stream, load_roots
data = Path(sys.argv[1]).read_bytes()
start = time.perf_counter()
v = TrustVerifier(load_roots([Path(sys.argv[2])]))
f = extract_stream(io.BytesIO(data), len(data), verifier=v)
print(time.perf_counter() - start, f.signatures[0].verification_status)
"""


def bench_verification(copies: int) -> None:
    datas = [p.read_bytes() for p in SIGNED]
    roots = load_roots([ROOT_CA])
    # amortised: a fresh verifier over the whole corpus (each distinct chain validated once)
    verifier = TrustVerifier(roots)
    total = [datas[i % len(datas)] for i in range(copies)]
    start = time.perf_counter()
    for d in total:
        extract_stream(io.BytesIO(d), len(d), verifier=verifier)
    amortised = (time.perf_counter() - start) / len(total)
    chains = verifier.cache_misses
    # warm: every chain cached
    start = time.perf_counter()
    for d in total:
        extract_stream(io.BytesIO(d), len(d), verifier=verifier)
    warm = (time.perf_counter() - start) / len(total)
    # first file: a fresh interpreter (imports excluded), verifier built, one file verified
    firsts = []
    for _ in range(3):
        out = subprocess.run(
            [PY, "-c", _FIRST_FILE, str(SIGNED[0]), str(ROOT_CA)], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.split()
        firsts.append(float(out[0]))
    first = statistics.median(firsts)
    record(
        Row(
            "verify-warm",
            "full verification, warm chains",
            f"{warm * 1000:.2f} ms/file",
            "<= 2 ms",
            round(warm * 1000, 3),
            "ms",
            warm <= 0.002,
        )
    )
    record(
        Row(
            "verify-amortised",
            f"full verification, amortised over {len(total)} files",
            f"{amortised * 1000:.2f} ms/file",
            "<= 3 ms",
            round(amortised * 1000, 3),
            "ms",
            amortised <= 0.003,
            f"{chains} chain validations (cache misses) for {len(datas)} fixtures",
        )
    )
    record(
        Row(
            "verify-first",
            "full verification, first file (fresh verifier)",
            f"{first * 1000:.0f} ms",
            "<= 100 ms",
            round(first * 1000, 1),
            "ms",
            first <= 0.1,
        )
    )


# --- 6 + 7: hunt and ingest
def _fixture_facts() -> list[Any]:
    verifier = TrustVerifier(load_roots([ROOT_CA]))
    return [extract_stream(io.BytesIO(d), len(d), verifier=verifier) for d in (p.read_bytes() for p in SIGNED)]


def bench_ingest_and_hunt(rows_wanted: int, work: Path, matcher: Matcher) -> None:
    from agent.hunt import run_hunt

    facts = [f for f in _fixture_facts() if f.signatures]
    state = work / "state-hunt"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    now = dt.datetime.now(dt.UTC)
    with Store(state / "rmmhunt.sqlite3") as store:
        scanner = Scanner(
            store, DEVICE, matcher, None, max_file_size=1 << 28, file_time_budget=30, reobserve_interval=86400
        )
        stats = ScanStats()
        store.begin()
        i = 0
        start = time.perf_counter()
        while stats.rows < rows_wanted:
            f = facts[i % len(facts)]
            scanner._emit(f, f"/bench/d{i // 100}/f{i}.exe", now, stats, None)
            i += 1
            if i % 500 == 0:
                store.commit()
                store.begin()
        store.commit()
        ingest = (time.perf_counter() - start) / stats.rows
        # the match part alone, for the profile
        sample = [r for f in facts for r in build_rows(f, "/bench/x.exe", DEVICE, now, "scan")]
        start = time.perf_counter()
        for _ in range(max(1, 2000 // len(sample))):
            for r in sample:
                matcher.match(r, now)
        match = (time.perf_counter() - start) / (max(1, 2000 // len(sample)) * len(sample))
        record(
            Row(
                "ingest",
                "ingest per row in a scan (build, match, store)",
                f"{ingest * 1e6:.0f} µs/row",
                "<= 50 µs",
                round(ingest * 1e6, 1),
                "µs",
                ingest <= 50e-6,
                f"matching alone {match * 1e6:.0f} µs/row; {stats.rows} rows, {stats.findings} hits",
            )
        )
        rules = matcher.rules
        runs = []
        for _ in range(2):
            start = time.perf_counter()
            results = run_hunt(store.iter_rows(), rules, now=now, excluded_for=store.excluded_hits())
            runs.append(time.perf_counter() - start)
        rate = stats.rows / min(runs)
        record(
            Row(
                "hunt",
                f"hunt over {stats.rows} stored rows, {len(rules)} rules",
                f"{rate:,.0f} rows/s",
                ">= 50,000 rows/s",
                round(rate),
                "rows/s",
                rate >= 50_000,
                f"{len(results)} results",
            )
        )


# --- 8: peak RSS
_RSS = """
import sys
from agent.cli import main
rc = main(sys.argv[1:])
# VmHWM: this program's own peak (ru_maxrss would include the forking parent's size, kept across exec)
print(rc, next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _empty_tree(base: Path, count: int) -> None:
    d = base
    for i in range(count):
        if i % 1000 == 0:
            d = base / f"d{i // 1000:05d}"
            d.mkdir(parents=True)
        os.close(os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644))


def _peak_rss_mb(tree: Path, state: Path) -> float:
    peaks = []
    for _ in range(2):  # first scan, then the re-scan that reads the whole cache
        out = subprocess.run(
            [
                PY,
                "-c",
                _RSS,
                "--state-dir",
                str(state),
                "scan",
                "--no-verify",
                "--format",
                "json",
                "--out",
                os.devnull,
                str(tree),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        rc, kb = out.stdout.split()[-2:]
        if rc not in ("0", "1"):
            raise RuntimeError(f"scan failed ({rc}): {out.stderr.strip()[-300:]}")
        peaks.append(int(kb) / 1024)
    return max(peaks)


def bench_rss(sizes: tuple[int, int], work: Path) -> None:
    shm = Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else work
    base = Path(tempfile.mkdtemp(prefix="rmmhunt-rss-", dir=shm))
    try:
        mbs = []
        for n in sizes:
            tree = base / f"t{n}"
            _empty_tree(tree, n)
            state = base / f"state{n}"
            mbs.append(_peak_rss_mb(tree, state))
            shutil.rmtree(tree)
            shutil.rmtree(state)
        small, large = mbs
        per_file = (large - small) * 1024 * 1024 / (sizes[1] - sizes[0])
        at_million = large + per_file * (1_000_000 - sizes[1]) / (1024 * 1024)
        flat = large <= small * 1.15
        record(
            Row(
                "rss",
                f"peak RSS, full scan + re-scan, {sizes[0]} / {sizes[1]} files",
                f"{small:.0f} / {large:.0f} MB",
                "<= 150 MB, flat",
                round(large, 1),
                "MB",
                large <= 150 and at_million <= 150 and flat,
                f"{per_file:.0f} B per extra file; at 1,000,000 files about {at_million:.0f} MB",
            )
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- 9: start-up
def bench_startup(work: Path) -> None:
    """Median of 5 runs of the console script, warm: the rules cache written and the bytecode cached
    (an installed agent has its .pyc files; PYTHONDONTWRITEBYTECODE in a developer's shell would make
    every run compile every module again, measured too and shown in the details)."""
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    state = work / "state-startup"
    exe = str(Path(PY).parent / "rmmhunt")
    cmd = [exe, "--state-dir", str(state), "scan", str(empty)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")  # bytecode outside the source tree

    def median_of_5(env: dict[str, str]) -> tuple[float, list[float]]:
        subprocess.run(cmd, capture_output=True, env=env)  # creates the store, the rules cache, the .pyc
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=False, env=env)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs), runs

    t, runs = median_of_5(env)
    no_bytecode, _ = median_of_5({**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    record(
        Row(
            "startup",
            "start-up: `rmmhunt scan` of an empty directory",
            f"{t:.2f} s",
            "<= 0.3 s",
            round(t, 3),
            "s",
            t <= 0.3,
            f"median of 5, runs {', '.join(f'{r:.2f}' for r in runs)}; "
            f"{no_bytecode:.2f} s when no bytecode is cached (PYTHONDONTWRITEBYTECODE)",
        )
    )


def main() -> int:
    quick = bool(os.environ.get("BENCH_QUICK"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000 if quick else 100_000)
    parser.add_argument("--rounds", type=int, default=5 if quick else 20)
    parser.add_argument("--copies", type=int, default=100 if quick else 300)
    parser.add_argument("--hunt-rows", type=int, default=5_000 if quick else 50_000)
    parser.add_argument("--rss-files", type=int, nargs=2, default=(20_000, 40_000) if quick else (200_000, 400_000))
    parser.add_argument("--cold-root", default=os.environ.get("BENCH_COLD_ROOT", "/usr/share/doc" if quick else "/usr"))
    parser.add_argument("--only", default="", help="comma-separated row keys (first-scan,cold-scan,...)")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--no-extra", action="store_true", help="skip the other benches (rules_bench, ...)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rmmhunt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    print(f"rmmhunt bench: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, quick={quick}, work dir {work}")
    matcher = catalog_matcher()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("startup", lambda: bench_startup(work)),
        ("first-scan", lambda: bench_tree(args.files, work, matcher)),
        ("cold-scan", lambda: bench_cold(args.cold_root, work, matcher)),
        ("extraction", lambda: bench_extraction(args.rounds)),
        ("verify", lambda: bench_verification(args.copies)),
        ("ingest", lambda: bench_ingest_and_hunt(args.hunt_rows, work, matcher)),
        ("rss", lambda: bench_rss(tuple(args.rss_files), work)),  # type: ignore[arg-type]
    ]
    started = time.perf_counter()
    try:
        for key, step in steps:
            if only and key not in only:
                continue
            try:
                step()
            except Exception as exc:  # one broken measure must not hide the others
                record(Row(key, key, "failed", "", None, "", None, f"{type(exc).__name__}: {exc}"))
        RESULTS.write_text(
            json.dumps(
                {
                    "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "quick": quick,
                    "cpus": os.cpu_count(),
                    "python": sys.version.split()[0],
                    "seconds": round(time.perf_counter() - started, 1),
                    "rows": [asdict(r) for r in ROWS],
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        )
        print(f"\nwritten {RESULTS.relative_to(ROOT)}: {sum(r.met is True for r in ROWS)}/{len(ROWS)} goals met")
        if not args.no_extra and not only:
            rules_bench.main()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
