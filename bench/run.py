"""`make bench`: rmmhunt's speed as ratios against baselines measured in the same run.

1. walk + classify a generated tree of mostly non-PE files, against the floor
   `find DIR -type f -print0 | xargs -0 head -c 64 >/dev/null`; and the re-scan of the
   unchanged tree against the first scan;
2. signer extraction per signed PE (no verification), against LIEF on the same files;
3. full verification with the chain cache, against signify's own explain_verify().

Figures only; no pass/fail. Run with --files N to change the tree size.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.extract.authenticode import TrustVerifier, extract_stream, load_roots  # noqa: E402
from agent.rows import Device  # noqa: E402
from agent.scanner import Matcher, Scanner  # noqa: E402
from agent.store import Store  # noqa: E402
from bench import rules_bench  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "files"
SIGNED = [
    p
    for p in sorted(FIXTURES.iterdir())
    if p.suffix == ".exe"
    and p.name
    not in (
        "text.exe",
        "empty.exe",
        "unsigned.exe",
        "truncated_certtable.exe",
        "bad_wincert_length.exe",
        "garbage_pkcs7.exe",
    )
]
ROOT_CA = ROOT / "tests" / "fixtures" / "pki" / "root-ca.pem"


def make_tree(base: Path, count: int) -> None:
    """count files in 100-file directories; 1 in 200 is a signed PE, the rest text/binary blobs."""
    pe_bytes = [p.read_bytes() for p in SIGNED]
    for i in range(count):
        d = base / f"d{i // 1000:03d}" / f"s{(i // 100) % 10}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        if i % 200 == 0:
            (d / f"f{i}.exe").write_bytes(pe_bytes[(i // 200) % len(pe_bytes)])
        elif i % 3 == 0:
            (d / f"f{i}.dll").write_bytes(b"MZ" + os.urandom(200))  # MZ without a PE header
        else:
            (d / f"f{i}.txt").write_bytes(b"log line %d\n" % i * 20)


def time_floor(tree: Path) -> float:
    start = time.perf_counter()
    subprocess.run(f"find {tree} -type f -print0 | xargs -0 head -c 64 >/dev/null", shell=True, check=True)
    return time.perf_counter() - start


def time_scan(tree: Path, state: Path, verify: bool) -> tuple[float, object]:
    verifier = TrustVerifier(load_roots([ROOT_CA])) if verify else None
    with Store(state / "rmmhunt.sqlite3") as store:
        scanner = Scanner(
            store,
            Device("b" * 40, "bench"),
            Matcher([]),
            verifier,
            max_file_size=1 << 28,
            file_time_budget=30,
            reobserve_interval=86400,
        )
        start = time.perf_counter()
        stats = scanner.scan([str(tree)])
        return time.perf_counter() - start, stats


def bench_walk(count: int, work: Path) -> None:
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    t0 = time.perf_counter()
    make_tree(tree, count)
    print(f"generated {count} files in {time.perf_counter() - t0:.1f}s")
    floor = min(time_floor(tree) for _ in range(3))
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    first, stats = time_scan(tree, state, verify=True)
    second, stats2 = time_scan(tree, state, verify=True)
    print("\n[1] walk and classify (mostly non-PE), page cache warm")
    print(f"  floor  find | xargs head -c 64 : {floor:7.3f}s  ({count / floor:8.0f} files/s)")
    print(
        f"  rmmhunt first scan            : {first:7.3f}s  ({count / first:8.0f} files/s)"
        f"  parsed={stats.parsed} signed={stats.signed_files}"
    )
    print(f"  ratio first scan / floor      : {first / floor:7.2f}x   (target <= 1.5x)")
    print(f"  rmmhunt re-scan (unchanged)   : {second:7.3f}s  parsed={stats2.parsed} unchanged={stats2.unchanged}")
    print(f"  ratio first scan / re-scan    : {first / second:7.2f}x   (target >= 20x)")


def _per_file(fn, datas: list[bytes], rounds: int) -> float:
    best = []
    for _ in range(rounds):
        start = time.perf_counter()
        for data in datas:
            fn(data)
        best.append((time.perf_counter() - start) / len(datas))
    return statistics.median(best)


def bench_extraction(rounds: int) -> None:
    datas = [p.read_bytes() for p in SIGNED]
    ours = _per_file(lambda d: extract_stream(io.BytesIO(d), len(d), verifier=None), datas, rounds)
    print(f"\n[2] signer extraction per signed PE, no verification ({len(datas)} fixtures x {rounds} rounds, median)")
    print(f"  rmmhunt extract_stream        : {ours * 1000:7.3f} ms/file")
    try:
        import lief
    except ImportError:
        print("  LIEF not installed (pip install '.[bench]'): no comparison")
        return
    lief.logging.disable()

    def with_lief(data: bytes) -> None:
        binary = lief.PE.parse(list(data))
        for sig in binary.signatures:
            for signer in sig.signers:
                _ = signer.cert.subject if signer.cert else None

    theirs = _per_file(with_lief, datas, rounds)
    print(f"  LIEF {lief.__version__:<24s} : {theirs * 1000:7.3f} ms/file")
    print(f"  ratio rmmhunt / LIEF          : {ours / theirs:7.2f}x   (target <= 1.0x)")


def bench_verification(copies: int) -> None:
    from signify.authenticode import TRUSTED_CERTIFICATE_STORE, AuthenticodeFile
    from signify.x509 import CertificateStore

    datas = [p.read_bytes() for p in SIGNED]
    roots = load_roots([ROOT_CA])
    verifier = TrustVerifier(roots)
    total = [datas[i % len(datas)] for i in range(copies)]
    start = time.perf_counter()
    for d in total:
        extract_stream(io.BytesIO(d), len(d), verifier=verifier)
    ours = (time.perf_counter() - start) / len(total)
    store = TRUSTED_CERTIFICATE_STORE | CertificateStore(roots, trusted=True)
    sample = total[: max(10, copies // 10)]
    start = time.perf_counter()
    for d in sample:
        AuthenticodeFile.from_stream(io.BytesIO(d)).explain_verify(trusted_certificate_store=store)
    theirs = (time.perf_counter() - start) / len(sample)
    print(f"\n[3] full verification, {len(total)} files over {len(datas)} signer chains")
    print(
        f"  rmmhunt (chain cache)         : {ours * 1000:7.2f} ms/file  "
        f"cache hits={verifier.cache_hits} misses={verifier.cache_misses}"
    )
    print(f"  signify explain_verify alone  : {theirs * 1000:7.2f} ms/file")
    print(f"  ratio signify / rmmhunt       : {theirs / ours:7.2f}x   (target: rmmhunt <= 5 ms/file)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rmmhunt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"rmmhunt bench: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, work dir {work}")
    try:
        bench_walk(args.files, work)
        bench_extraction(args.rounds)
        bench_verification(args.copies)
        rules_bench.main()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
