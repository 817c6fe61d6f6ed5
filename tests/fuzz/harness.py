"""Mutation fuzzing of the extractor: ``make fuzz [N=100000]``.

Every case is one mutated copy of a signed fixture (PE, PE32+, nested, timestamped, MSI),
built deterministically from ``(seed, index)``, so any case can be replayed alone
(``--replay INDEX``). The mutations aim where parsers break: the WIN_CERTIFICATE table
(dwLength, wRevision, wCertificateType, the security data directory), the PKCS#7 DER (tags,
length fields, indefinite lengths, truncation, duplicated elements, huge certificate and
signature counts), the OLE header and DigitalSignature stream of an MSI, plus plain bit
flips and truncation anywhere.

Each case runs in a pool of worker processes with a per-case timeout: a worker that does
not answer in time is killed (a hang) and replaced; an exception escaping
``extract_stream``, a status outside FILE_STATUSES or a dead worker is a crash. Every case is
read twice: without a verifier (the signers by the DER reader, agent/extract/fastder.py) and
fully verified (signify). The run
prints cases, crashes, hangs, the statuses, the slowest case and the peak RSS of a worker.
Exit code 1 when any crash or hang was seen.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import random
import resource
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"
SEED_FILES = (
    "pulseway.exe",  # PE32, one signature
    "pe64.exe",  # PE32+
    "dual_signed.exe",  # a nested signature
    "timestamped.exe",  # an RFC 3161 timestamp token with its own certificates
    "signed.msi",  # OLE compound file with a DigitalSignature stream
)


# --- the seeds and where their interesting bytes are


@dataclass(frozen=True)
class DerField:
    tag_at: int  # absolute file offset of the identifier octet
    len_at: int  # absolute offset of the first length octet
    len_size: int  # number of length octets (1 for short form)
    end: int  # absolute offset just past the element
    constructed: bool


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    kind: str  # PE or MSI
    datadir_at: int = 0  # PE: offset of the security directory entry
    table_at: int = 0  # PE: certificate table offset; MSI: offset of the signature DER in the file
    table_size: int = 0
    der_at: int = 0  # offset of the (first) PKCS#7 DER
    der_fields: tuple[DerField, ...] = field(default=())


def _der_fields(data: bytes, start: int, end: int, depth: int = 0) -> list[DerField]:
    out: list[DerField] = []
    pos = start
    while pos + 2 <= end and depth < 40:
        tag = data[pos]
        len_at = pos + 1
        first = data[len_at]
        if first < 0x80:
            size, len_size = first, 1
        elif first == 0x80:
            return out
        else:
            n = first & 0x7F
            size, len_size = int.from_bytes(data[len_at + 1 : len_at + 1 + n], "big"), 1 + n
        body = len_at + len_size
        if body + size > end:
            return out
        constructed = bool(tag & 0x20)
        out.append(DerField(pos, len_at, len_size, body + size, constructed))
        if constructed:
            out.extend(_der_fields(data, body, body + size, depth + 1))
        pos = body + size
    return out


def load_seeds() -> list[Seed]:
    from tests.extract.pe_surgery import locate_table

    seeds = []
    for name in SEED_FILES:
        data = (FIXTURES / "files" / name).read_bytes()
        if name.endswith(".msi"):
            import olefile

            ole = olefile.OleFileIO(io.BytesIO(data))
            der = ole.openstream("\x05DigitalSignature").read()
            ole.close()
            at = data.find(der[:256])
            fields = _der_fields(data, at, at + len(der)) if at >= 0 else []
            seeds.append(Seed(name, data, "MSI", 0, max(at, 0), len(der), max(at, 0), tuple(fields)))
            continue
        loc = locate_table(data)
        der_at = loc.offset + 8
        (length,) = struct.unpack_from("<I", data, loc.offset)
        fields = _der_fields(data, der_at, loc.offset + length)
        seeds.append(
            Seed(
                name,
                data,
                "PE",
                loc.datadir_at,
                loc.offset,
                loc.size,
                der_at,
                tuple(fields),
            )
        )
    return seeds


# --- mutations: each takes (rng, data, seed) and returns the new bytes and a description

Mutation = Callable[[random.Random, bytearray, Seed], tuple[bytearray, str]]

_LENGTHS = (0, 1, 7, 8, 9, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def m_bitflip(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    n = rng.randint(1, 16)
    for _ in range(n):
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    return data, f"bitflip x{n}"


def m_table_bytes(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    n = rng.randint(1, 12)
    for _ in range(n):
        at = seed.table_at + rng.randrange(max(1, seed.table_size))
        if at < len(data):
            data[at] = rng.randrange(256)
    return data, f"table bytes x{n}"


def m_wincert_header(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    if seed.kind != "PE":
        return m_bitflip(rng, data, seed)
    which = rng.choice(("length", "revision", "type"))
    if which == "length":
        value = rng.choice((*_LENGTHS, seed.table_size, seed.table_size + 1, seed.table_size - 1))
        struct.pack_into("<I", data, seed.table_at, value & 0xFFFFFFFF)
    elif which == "revision":
        value = rng.choice((0, 0x100, 0x1FF, 0x201, 0xFFFF))
        struct.pack_into("<H", data, seed.table_at + 4, value)
    else:
        value = rng.choice((0, 1, 3, 4, 0xFFFF))
        struct.pack_into("<H", data, seed.table_at + 6, value)
    return data, f"WIN_CERTIFICATE {which}={value:#x}"


def m_datadir(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    if seed.kind != "PE":
        return m_bitflip(rng, data, seed)
    offset, size = seed.table_at, seed.table_size
    choice = rng.randrange(6)
    if choice == 0:
        size = rng.choice(_LENGTHS)
    elif choice == 1:
        offset = rng.choice((0, 8, 0x40, 0x100, len(data) - 8, len(data), 0xFFFFFFF0))
    elif choice == 2:
        size = max(0, size - rng.randint(1, size))
    elif choice == 3:
        offset += rng.choice((-8, -1, 1, 8))
    elif choice == 4:
        size += rng.choice((1, 8, 4096))
    else:
        offset, size = rng.randrange(len(data)), rng.randrange(len(data))
    struct.pack_into("<II", data, seed.datadir_at, offset & 0xFFFFFFFF, size & 0xFFFFFFFF)
    return data, f"datadir offset={offset:#x} size={size:#x}"


def m_der_length(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    if not seed.der_fields:
        return m_bitflip(rng, data, seed)
    f = rng.choice(seed.der_fields)
    choice = rng.randrange(5)
    if choice == 0 or f.len_size == 1:
        data[f.len_at] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0x81, 0x84, 0x88, 0x89, 0xFF, data[f.len_at] ^ 1))
        what = f"first length octet={data[f.len_at]:#x}"
    elif choice == 1:
        data[f.len_at + 1 : f.len_at + f.len_size] = b"\xff" * (f.len_size - 1)
        what = "length all ones"
    elif choice == 2:
        current = int.from_bytes(data[f.len_at + 1 : f.len_at + f.len_size], "big")
        new = max(0, current + rng.choice((-2, -1, 1, 2, 100)))
        width = f.len_size - 1
        data[f.len_at + 1 : f.len_at + f.len_size] = min(new, (1 << (8 * width)) - 1).to_bytes(width, "big")
        what = f"length {current}->{new}"
    elif choice == 3:
        data[f.len_at] = 0x80  # indefinite, without end-of-contents octets
        what = "indefinite length"
    else:
        data[f.len_at + 1 : f.len_at + f.len_size] = b"\x00" * (f.len_size - 1)
        what = "length zero (long form)"
    return data, f"DER @{f.tag_at - seed.der_at}: {what}"


def m_der_tag(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    if not seed.der_fields:
        return m_bitflip(rng, data, seed)
    f = rng.choice(seed.der_fields)
    data[f.tag_at] = rng.choice((0x00, 0x02, 0x04, 0x05, 0x06, 0x13, 0x17, 0x30, 0x31, 0xA0, 0xA1, 0xA3, 0x1F, 0xFF))
    return data, f"DER @{f.tag_at - seed.der_at}: tag={data[f.tag_at]:#x}"


def m_der_truncate(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    """Cut an element short (and the file after it), keeping the outer lengths as they were."""
    if not seed.der_fields:
        return m_truncate(rng, data, seed)
    f = rng.choice(seed.der_fields)
    cut = rng.randrange(f.tag_at, f.end)
    return data[:cut], f"truncated inside DER @{f.tag_at - seed.der_at}"


def m_truncate(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    if rng.random() < 0.6 and seed.table_size:
        cut = seed.table_at + rng.randrange(seed.table_size)
    else:
        cut = rng.randrange(1, len(data))
    return data[:cut], f"truncated at {cut}"


def m_duplicate(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    """Insert a copy of a slice (a DER element or random bytes) somewhere in the table."""
    if seed.der_fields and rng.random() < 0.7:
        f = rng.choice(seed.der_fields)
        chunk = bytes(data[f.tag_at : f.end])
    else:
        start = rng.randrange(len(data))
        chunk = bytes(data[start : start + rng.randint(1, 512)])
    at = seed.table_at + rng.randrange(max(1, seed.table_size)) if seed.table_size else rng.randrange(len(data))
    times = rng.choice((1, 2, 3, 50))
    data[at:at] = chunk * times
    return data, f"duplicated {len(chunk)} bytes x{times} at {at}"


def _replace_table(data: bytearray, seed: Seed, table: bytes) -> bytearray:
    """The seed's table (where the seed has it) replaced, the data directory pointed at it."""
    out = bytearray(data[: seed.table_at]) + table + data[seed.table_at + seed.table_size :]
    struct.pack_into("<II", out, seed.datadir_at, seed.table_at, len(table))
    return out


def m_entries(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    """Valid duplication: the WIN_CERTIFICATE entry repeated, the data directory updated."""
    if seed.kind != "PE":
        return m_duplicate(rng, data, seed)
    table = bytes(data[seed.table_at : seed.table_at + seed.table_size])
    times = rng.choice((2, 3, 8, 31, 32, 33, 100, 1000))
    return _replace_table(data, seed, table * times), f"certificate table entry x{times}"


def m_many_certificates(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    """Valid but huge: the signature's certificates repeated (counts around the caps)."""
    if seed.kind != "PE":
        return m_duplicate(rng, data, seed)
    from tests.extract.pe_surgery import first_pkcs7, win_certificate, with_extra_certificates

    copies = rng.choice((1, 10, 100, 240, 249, 250, 260, 1000, 5000))
    pkcs7 = with_extra_certificates(first_pkcs7(seed.data), copies)
    return _replace_table(data, seed, win_certificate(pkcs7)), f"certificates x{copies + 1} per signature"


def m_pe_counts(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    """Huge counts in the PE headers: NumberOfSections, SizeOfOptionalHeader, NumberOfRvaAndSizes."""
    if seed.kind != "PE":
        return m_ole_header(rng, data, seed)
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    which = rng.choice(("sections", "optional_size", "rva_count", "e_lfanew"))
    value = rng.choice((0, 1, 4, 5, 16, 17, 0xFF, 0xFFFF))
    if which == "sections":
        struct.pack_into("<H", data, pe_offset + 6, value)
    elif which == "optional_size":
        struct.pack_into("<H", data, pe_offset + 20, value)
    elif which == "rva_count":
        magic = struct.unpack_from("<H", data, pe_offset + 24)[0]
        struct.pack_into("<I", data, pe_offset + 24 + (108 if magic == 0x20B else 92), value)
    else:
        value = rng.choice((0, 0x3C, 0x40, len(data) - 4, len(data), 0xFFFFFFFF))
        struct.pack_into("<I", data, 0x3C, value)
    return data, f"PE {which}={value:#x}"


def m_ole_header(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    """The compound file header: sector shifts, FAT/DIFAT counts and starts, mini stream cutoff."""
    if seed.kind != "MSI":
        return m_pe_counts(rng, data, seed)
    offsets = {"sector_shift": (0x1E, "<H"), "mini_shift": (0x20, "<H"), "dir_sectors": (0x28, "<I"),
               "fat_sectors": (0x2C, "<I"), "dir_start": (0x30, "<I"), "mini_cutoff": (0x38, "<I"),
               "minifat_start": (0x3C, "<I"), "minifat_count": (0x40, "<I"), "difat_start": (0x44, "<I"),
               "difat_count": (0x48, "<I"), "difat0": (0x4C, "<I")}  # fmt: skip
    name = rng.choice(sorted(offsets))
    at, fmt = offsets[name]
    value = rng.choice((0, 1, 2, 7, 9, 12, 16, 0xFFFF, 0xFFFFFFFE, 0xFFFFFFFF, 0x7FFFFFFF))
    struct.pack_into(fmt, data, at, value & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    return data, f"OLE {name}={value:#x}"


def m_ole_sectors(rng: random.Random, data: bytearray, seed: Seed) -> tuple[bytearray, str]:
    """Random 32-bit values written in the FAT/directory area (sector chains, sizes, loops)."""
    n = rng.randint(1, 6)
    for _ in range(n):
        at = rng.randrange(512, max(513, len(data) - 4)) & ~3
        struct.pack_into("<I", data, at, rng.choice((0, 1, 2, 0xFFFFFFFE, 0xFFFFFFFD, rng.randrange(1 << 32))))
    return data, f"OLE dwords x{n}"


MUTATIONS: tuple[tuple[Mutation, int], ...] = (
    (m_bitflip, 12),
    (m_table_bytes, 10),
    (m_wincert_header, 8),
    (m_datadir, 8),
    (m_der_length, 16),
    (m_der_tag, 8),
    (m_der_truncate, 6),
    (m_truncate, 5),
    (m_duplicate, 8),
    (m_entries, 3),
    (m_many_certificates, 2),
    (m_pe_counts, 5),
    (m_ole_header, 4),
    (m_ole_sectors, 5),
)


def make_case(seeds: list[Seed], seed_value: int, index: int) -> tuple[bytes, str]:
    """Case ``index`` of run ``seed_value``: the same bytes in any process."""
    rng = random.Random(f"{seed_value}:{index}")
    seed = rng.choice(seeds)
    data = bytearray(seed.data)
    funcs = [m for m, _w in MUTATIONS]
    weights = [w for _m, w in MUTATIONS]
    steps = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutate = rng.choices(funcs, weights)[0]
        try:
            data, what = mutate(rng, data, seed)
        except (ValueError, IndexError, struct.error) as exc:  # a mutation that does not fit these bytes
            data, what = m_bitflip(rng, data, seed)
            what = f"{mutate.__name__} did not apply ({exc}); {what}"
        if not data:
            data = bytearray(seed.data[:1])
        steps.append(what)
    return bytes(data), f"{seed.name}: " + "; ".join(steps)


# --- running one case


@dataclass
class Outcome:
    index: int
    status: str  # a FILE_STATUS, or "CRASH"
    seconds: float
    description: str
    error: str = ""


class CaseRunner:
    """What a worker holds: the seeds and one TrustVerifier (the test root trusted, so the
    verification paths run), as a scan would."""

    def __init__(self, seed_value: int, budget: float) -> None:
        from agent.extract.authenticode import TrustVerifier, load_roots

        self.seed_value = seed_value
        self.budget = budget
        self.seeds = load_seeds()
        self.verifier = TrustVerifier(load_roots([FIXTURES / "pki" / "root-ca.pem"]))

    def run(self, index: int) -> Outcome:
        from agent.extract.authenticode import extract_stream
        from agent.schema import FILE_STATUSES

        data, description = make_case(self.seeds, self.seed_value, index)
        start = time.monotonic()
        try:
            # the signers alone (the DER reader, agent/extract/fastder.py), then a full verification
            # (signify); each must end in a status, the second one's is the case's
            fast = extract_stream(io.BytesIO(data), len(data), verifier=None, time_budget=self.budget)
            facts = extract_stream(io.BytesIO(data), len(data), verifier=self.verifier, time_budget=self.budget)
        except BaseException as exc:  # noqa: BLE001 - anything escaping is the finding
            return Outcome(index, "CRASH", time.monotonic() - start, description, _short_traceback(exc))
        elapsed = time.monotonic() - start
        for which, status in (("without a verifier", fast.status), ("verified", facts.status)):
            if status not in FILE_STATUSES:
                return Outcome(index, "CRASH", elapsed, description, f"unknown status {status!r} ({which})")
        return Outcome(index, facts.status, elapsed, description)


def _short_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-6))


def _worker(conn: Connection, seed_value: int, budget: float, runner_class: type[CaseRunner]) -> None:
    runner = runner_class(seed_value, budget)
    conn.send(("ready", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    while True:
        index = conn.recv()
        if index is None:
            return
        outcome = runner.run(index)
        conn.send((outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


# --- the pool


@dataclass
class Report:
    cases: int = 0
    crashes: list[Outcome] = field(default_factory=list)
    hangs: list[Outcome] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    slowest: Outcome | None = None
    peak_rss_kb: int = 0
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.cases += 1
        self.statuses[outcome.status] += 1
        if outcome.status == "CRASH":
            self.crashes.append(outcome)
        if self.slowest is None or outcome.seconds > self.slowest.seconds:
            self.slowest = outcome

    def lines(self) -> list[str]:
        out = [
            f"cases     {self.cases}",
            f"crashes   {len(self.crashes)}",
            f"hangs     {len(self.hangs)}",
            f"statuses  {dict(sorted(self.statuses.items()))}",
        ]
        if self.slowest is not None:
            s = self.slowest
            out.append(f"slowest   {s.seconds:.3f} s (case {s.index}: {s.description}; {s.status})")
        out.append(f"peak RSS  {self.peak_rss_kb / 1024:.1f} MB (largest worker)")
        out.append(f"elapsed   {self.seconds:.1f} s")
        for o in self.crashes[:20]:
            out.append(f"CRASH case {o.index}: {o.description}\n{o.error}")
        for o in self.hangs[:20]:
            out.append(f"HANG case {o.index}: {o.description}")
        return out


class _Slot:
    def __init__(self, ctx: Any, seed_value: int, budget: float, runner_class: type[CaseRunner]) -> None:
        parent, child = ctx.Pipe()
        self.conn: Connection = parent
        self.proc = ctx.Process(target=_worker, args=(child, seed_value, budget, runner_class), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.index: int | None = None
        self.started = 0.0

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                self.proc.kill()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def run_pool(
    cases: int,
    *,
    seed_value: int = 0,
    workers: int | None = None,
    budget: float = 5.0,
    timeout: float = 30.0,
    start_method: str = "fork",
    progress: Callable[[Report], None] | None = None,
    notify: Callable[[str], None] | None = None,
    runner_class: type[CaseRunner] = CaseRunner,
    first_index: int = 0,
) -> Report:
    """Run cases first_index..first_index+cases-1 in ``workers`` subprocesses; kill and replace
    any worker that takes longer than ``timeout`` seconds for one case."""
    ctx = mp.get_context(start_method)
    report = Report()
    started = time.monotonic()
    pending = iter(range(first_index, first_index + cases))
    slots = [_Slot(ctx, seed_value, budget, runner_class) for _ in range(workers or os.cpu_count() or 2)]
    done = False

    def dispatch(slot: _Slot) -> None:
        nonlocal done
        index = next(pending, None)
        slot.index = index
        if index is None:
            done = True
            return
        slot.started = time.monotonic()
        slot.conn.send(index)

    try:
        while True:
            busy = [s for s in slots if s.index is not None or not s.ready]
            if not busy:
                break
            now = time.monotonic()
            waits = [s.started + timeout - now for s in busy if s.ready and s.index is not None]
            ready_conns = wait([s.conn for s in busy], timeout=max(0.0, min(waits)) if waits else timeout)
            for slot in list(busy):
                if slot.conn in ready_conns:
                    try:
                        message, maxrss = slot.conn.recv()
                    except (EOFError, OSError):  # the worker died: a crash of the case it held
                        if slot.index is not None:
                            died = Outcome(slot.index, "CRASH", time.monotonic() - slot.started,
                                           _describe(slot.index, seed_value), "worker died")  # fmt: skip
                            report.add(died)
                            if notify is not None:
                                notify(f"CRASH case {died.index}: {died.description}: worker died")
                        slots[slots.index(slot)] = _replace(slot, ctx, seed_value, budget, runner_class)
                        continue
                    report.peak_rss_kb = max(report.peak_rss_kb, maxrss)
                    if message == "ready":
                        slot.ready = True
                    else:
                        report.add(message)
                        if message.status == "CRASH" and notify is not None:
                            notify(f"CRASH case {message.index}: {message.description}\n{message.error}")
                        if progress is not None and report.cases % 1000 == 0:
                            progress(report)
                    dispatch(slot)
                elif slot.ready and slot.index is not None and time.monotonic() - slot.started > timeout:
                    report.cases += 1
                    report.statuses["HANG"] += 1
                    hang = Outcome(slot.index, "HANG", timeout, _describe(slot.index, seed_value))
                    report.hangs.append(hang)
                    report.peak_rss_kb = max(report.peak_rss_kb, _rss_kb(slot.proc.pid))  # a hang may be a memory hog
                    if notify is not None:
                        notify(f"HANG case {hang.index}: {hang.description}")
                    new = _replace(slot, ctx, seed_value, budget, runner_class)
                    slots[slots.index(slot)] = new
            if done and all(s.index is None and s.ready for s in slots):
                break
    finally:
        for slot in slots:
            slot.stop()
    report.seconds = time.monotonic() - started
    return report


def _rss_kb(pid: int | None) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss // 1024)
    except (psutil.Error, ValueError):
        return 0


def _replace(slot: _Slot, ctx: Any, seed_value: int, budget: float, runner_class: type[CaseRunner]) -> _Slot:
    slot.stop(kill=True)
    return _Slot(ctx, seed_value, budget, runner_class)


_SEEDS_FOR_DESCRIPTIONS: list[Seed] = []


def _describe(index: int, seed_value: int) -> str:
    if not _SEEDS_FOR_DESCRIPTIONS:
        _SEEDS_FOR_DESCRIPTIONS.extend(load_seeds())
    return make_case(_SEEDS_FOR_DESCRIPTIONS, seed_value, index)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", "-n", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0, help="run seed: the same seed gives the same cases")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--budget", type=float, default=5.0, help="extract_stream's time budget per case (s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="a case slower than this is a hang (s)")
    parser.add_argument("--replay", type=int, default=None, help="run one case in this process and show it")
    parser.add_argument("--save", type=Path, default=None, help="write the crashing and hanging inputs here")
    args = parser.parse_args(argv)

    if args.replay is not None:
        runner = CaseRunner(args.seed, args.budget)
        outcome = runner.run(args.replay)
        print(f"case {outcome.index}: {outcome.description}\n{outcome.status} in {outcome.seconds:.3f} s")
        if outcome.error:
            print(outcome.error)
        return 1 if outcome.status == "CRASH" else 0

    def progress(report: Report) -> None:
        print(f"  {report.cases} cases, {len(report.crashes)} crashes, {len(report.hangs)} hangs, "
              f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip

    t0 = time.monotonic()
    report = run_pool(
        args.cases, seed_value=args.seed, workers=args.workers, budget=args.budget, timeout=args.timeout,
        progress=progress, notify=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    print("\n".join(report.lines()))
    if args.save is not None and (report.crashes or report.hangs):
        args.save.mkdir(parents=True, exist_ok=True)
        seeds = load_seeds()
        for o in report.crashes + report.hangs:
            (args.save / f"case-{args.seed}-{o.index}.bin").write_bytes(make_case(seeds, args.seed, o.index)[0])
    return 1 if report.crashes or report.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
