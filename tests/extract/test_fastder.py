"""The DER reader (agent/extract/fastder.py) against signify: the same facts wherever signify
parses the file, on every fixture and on seeded mutations of the signed ones; and it raises
nothing but its own ParseError."""

from __future__ import annotations

import io
import random
import struct

import pytest

from agent.extract import fastder, sniff
from agent.extract.authenticode import _Deadline, _facts_of_signed, _open_signed, extract_stream
from tests.conftest import FIXTURES

FILES = sorted(p for p in (FIXTURES / "files").iterdir() if p.is_file())
SIGNED_PE = [p for p in FILES if p.suffix == ".exe" and b"MZ" == p.read_bytes()[:2]]


def _signify_facts(data: bytes):
    """What signify alone says (the path extract_stream took before the DER reader), or None
    when signify does not parse the file."""
    stream = io.BytesIO(data)
    header = data[: sniff.HEADER_BYTES]
    try:
        kind, signed, _detail = _open_signed(stream, len(data), header)
        if signed is None:
            return None
        facts = _facts_of_signed(signed, kind, len(data), None, _Deadline(None))
    except Exception:
        return None
    return facts if facts.status == "OK" else None


def _fast_facts(data: bytes):
    return fastder.pe_facts(io.BytesIO(data), len(data), data[: sniff.HEADER_BYTES])


def _table(data: bytes) -> tuple[int, int]:
    pe = sniff.read_pe_header(io.BytesIO(data), len(data), data[:64])
    assert pe is not None
    return pe.cert_table_offset, pe.cert_table_size


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_fixture_facts_equal_signify(path):
    data = path.read_bytes()
    theirs, ours = _signify_facts(data), _fast_facts(data)
    if ours is not None:
        assert theirs is not None, "the DER reader accepted a file signify refuses"
        assert ours == theirs
    else:
        # the reader declines only what it does not handle exactly; every well-formed signed
        # fixture with its CA certificates alongside is handled
        assert theirs is None or path.name in {"signed.msi"}, f"{path.name}: fell back to signify"


def test_the_reader_is_what_extract_stream_uses_without_verification():
    data = (FIXTURES / "files" / "dual_signed.exe").read_bytes()
    facts = extract_stream(io.BytesIO(data), len(data), verifier=None)
    assert facts == _fast_facts(data)
    assert [s.index for s in facts.signatures] == [0, 1]


def _mutations(rng: random.Random, data: bytes) -> bytes:
    offset, size = _table(data)
    buf = bytearray(data)
    how = rng.randrange(4)
    if how == 0:  # flip bytes in the certificate table
        for _ in range(rng.randint(1, 4)):
            buf[offset + rng.randrange(size)] ^= 1 << rng.randrange(8)
    elif how == 1:  # a random byte value
        buf[offset + rng.randrange(size)] = rng.randrange(256)
    elif how == 2:  # a DER length byte nudged
        pos = offset + 8 + rng.randrange(min(size - 8, 400))
        buf[pos] = (buf[pos] + rng.choice((-1, 1, 0x80))) & 0xFF
    else:  # the WIN_CERTIFICATE length or the table truncated
        length = struct.unpack_from("<I", buf, offset)[0]
        struct.pack_into("<I", buf, offset, max(0, length + rng.randint(-64, 64)))
    return bytes(buf)


def test_mutated_files_facts_equal_signify_wherever_it_parses():
    rng = random.Random(12)
    agreed = declined = refused_by_signify = 0
    for round_ in range(40):
        for path in SIGNED_PE:
            data = path.read_bytes()
            if _signify_facts(data) is None:
                continue
            mutated = _mutations(rng, data)
            ours = _fast_facts(mutated)
            theirs = _signify_facts(mutated)
            if theirs is None:
                refused_by_signify += 1
                continue
            if ours is None:
                declined += 1
                continue
            assert ours == theirs, f"{path.name} round {round_}"
            agreed += 1
    assert agreed > 100 and refused_by_signify > 10, (agreed, declined, refused_by_signify)


def test_the_reader_raises_only_parse_error():
    rng = random.Random(7)
    tables = []
    for path in SIGNED_PE:
        data = path.read_bytes()
        if _signify_facts(data) is not None:
            offset, size = _table(data)
            tables.append(data[offset : offset + size])
    for _ in range(3000):
        table = bytearray(rng.choice(tables))
        for _ in range(rng.randint(1, 6)):
            table[rng.randrange(len(table))] = rng.randrange(256)
        if rng.random() < 0.3:
            table = table[: rng.randrange(len(table))]
        try:
            fastder.parse_cert_table(bytes(table))
        except fastder.ParseError:
            pass
    for junk in (b"", b"\x00" * 8, b"\x10\x00\x00\x00\x00\x02\x02\x00" + b"\x30\x84\xff\xff\xff\xff" + b"\x00" * 2):
        with pytest.raises(fastder.ParseError):
            fastder.parse_cert_table(junk)
