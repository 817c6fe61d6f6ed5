"""The DER reader (agent/extract/fastder.py) against signify (issue 12): extract_stream without
a verifier gives the same facts with the reader as with signify reading the signers, wherever
signify parses the file: on every fixture and on seeded mutations from the fuzz harness.
Wherever signify fails, the reader's path still ends in a status. The reader itself raises
nothing but its ParseError, and deep nesting or huge lengths end it at once."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import random
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509

from agent.extract import authenticode, fastder
from agent.extract.authenticode import ExtractTimeout, FileFacts, extract_stream
from agent.extract.limits import Caps
from agent.schema import FILE_STATUSES
from tests.conftest import FIXTURES, fixture_entry, manifest
from tests.extract.pe_surgery import der_tlv, first_pkcs7, win_certificate, with_table
from tests.fuzz.harness import load_seeds, make_case

BUDGET = 5.0


@contextlib.contextmanager
def signify_reads_the_signers() -> Iterator[None]:
    """extract_stream's path as it was before the DER reader: signify reads every signature.
    (The switch turns the reader off; both paths are the real code.)"""
    original = authenticode._fast_signer_facts
    authenticode._fast_signer_facts = lambda *args: None  # type: ignore[assignment]
    try:
        yield
    finally:
        authenticode._fast_signer_facts = original


def _ours(data: bytes) -> FileFacts:
    return extract_stream(io.BytesIO(data), len(data), verifier=None, time_budget=BUDGET)


def _signify(data: bytes) -> FileFacts:
    with signify_reads_the_signers():
        return extract_stream(io.BytesIO(data), len(data), verifier=None, time_budget=BUDGET)


def _reader_handles(data: bytes) -> bool:
    """True when the DER reader answered for the file (no fall-back to signify)."""
    stream = io.BytesIO(data)
    header = data[:64]
    deadline = authenticode._Deadline(None)
    try:
        kind, signed, _detail = authenticode._open_signed(stream, len(data), header, Caps(), deadline)
    except Exception:
        return False
    return signed is not None and authenticode._fast_signer_facts(signed, kind, len(data), deadline) is not None


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.mark.parametrize("entry", manifest(), ids=lambda e: e["path"])
def test_every_fixture_gives_signifys_facts(entry):
    data = _fixture(entry["path"])
    ours, theirs = _ours(data), _signify(data)
    assert ours.status in FILE_STATUSES
    if theirs.status == "OK":
        assert ours == theirs
        # every signed fixture is read by the DER reader itself, not by falling back
        assert _reader_handles(data), entry["path"]
    else:
        assert ours.status == theirs.status


def test_nested_signatures_timestamps_and_msi_come_from_the_reader():
    dual = _fixture("files/dual_signed.exe")
    assert _reader_handles(dual)
    assert [(s.index, s.signer.display_name) for s in _ours(dual).signatures] == [
        (0, "Contoso Benign Tools Ltd."),
        (1, "MMSoft Design Ltd."),
    ]
    stamped = _fixture("files/timestamped.exe")
    assert _reader_handles(stamped)
    expected = dt.datetime.fromisoformat(fixture_entry("timestamped.exe")["countersignature_time"])
    assert _ours(stamped).signatures[0].countersignature_time == expected
    msi = _fixture("files/signed.msi")
    assert _reader_handles(msi)
    facts = _ours(msi)
    assert facts.kind == "MSI" and [s.signer.display_name for s in facts.signatures] == ["MMSoft Design Ltd."]
    for sig in _ours(dual).signatures:
        assert sig.digest_algorithm in ("sha1", "sha256") and sig.verification_status == "NOT_VERIFIED"


def test_names_equal_only_after_decoding_are_compared_as_signify_does():
    """The CA certificate's subject re-encoded (PrintableString instead of UTF8String, or the
    reverse): byte-different from the leaf's issuer, equal to signify. The issuer hash must
    be the same as signify's, and the reader must not fall back for it."""
    data = _fixture("files/pulseway.exe")
    info = cms.ContentInfo.load(first_pkcs7(data))
    signed = info["content"]
    certs = [c.chosen for c in signed["certificates"]]
    si = signed["signer_infos"][0]
    leaf_index = next(i for i, c in enumerate(certs) if c.serial_number == si["sid"].chosen["serial_number"].native)
    changed = 0
    for i, cert in enumerate(certs):
        if i == leaf_index:
            continue
        subject = cert["tbs_certificate"]["subject"]
        rdns = []
        for rdn in subject.chosen:
            atvs = []
            for atv in rdn:
                value = atv["value"]
                if value.name in ("utf8_string", "printable_string"):
                    text = value.native
                    if all(ch.isalnum() or ch in " '()+,-./:=?" for ch in text):
                        other = "printable_string" if value.name == "utf8_string" else "utf8_string"
                        value = asn1_x509.DirectoryString(name=other, value=text)
                        changed += 1
                atvs.append(asn1_x509.NameTypeAndValue({"type": atv["type"], "value": value}))
            rdns.append(asn1_x509.RelativeDistinguishedName(atvs))
        new_subject = asn1_x509.Name(name="", value=asn1_x509.RDNSequence(rdns))
        tbs = cert["tbs_certificate"].copy()
        tbs["subject"] = new_subject
        certs[i] = asn1_x509.Certificate(
            {
                "tbs_certificate": tbs,
                "signature_algorithm": cert["signature_algorithm"],
                "signature_value": cert["signature_value"],
            }
        )
    assert changed
    cert_set = b"".join(c.dump(force=True) for c in certs)
    parts = [signed[n].dump() for n in ("version", "digest_algorithms", "encap_content_info")]
    parts += [der_tlv(0xA0, cert_set), signed["signer_infos"].dump()]
    pkcs7 = der_tlv(0x30, info["content_type"].dump() + der_tlv(0xA0, der_tlv(0x30, b"".join(parts))))
    mutated = with_table(data, win_certificate(pkcs7))
    theirs = _signify(mutated)
    assert theirs.status == "OK" and theirs.signatures[0].issuer_hash
    assert _reader_handles(mutated)
    assert _ours(mutated) == theirs


MUTATED_CASES = 500  # ~2 s of CPU: each case is read twice (reader, signify)


def test_mutated_files_give_signifys_facts_wherever_signify_parses() -> None:
    seeds = load_seeds()
    outcomes: Counter[str] = Counter()
    for index in range(MUTATED_CASES):
        data, description = make_case(seeds, 20261212, index)
        ours, theirs = _ours(data), _signify(data)
        assert ours.status in FILE_STATUSES, description
        if theirs.status == "OK":
            assert ours == theirs, f"case {index}: {description}"
            outcomes["equal, by the reader" if _reader_handles(data) else "equal, signify fell back"] += 1
        elif ours.status == theirs.status:
            outcomes["same status"] += 1
        else:
            outcomes[f"signify {theirs.status}, reader {ours.status}"] += 1
    # the mutations reach the reader itself, not only the header checks and the fall-back
    assert outcomes["equal, by the reader"] > 100, outcomes
    assert outcomes["same status"] > 100, outcomes


def _tables() -> list[bytes]:
    out = []
    for seed in load_seeds():
        if seed.kind == "PE":
            out.append(seed.data[seed.table_at + 8 : seed.table_at + seed.table_size])
    return out


def test_the_reader_raises_only_parse_error_on_mutated_der():
    rng = random.Random(7)
    blobs = _tables()
    handled = 0
    for _ in range(1500):
        blob = bytearray(rng.choice(blobs))
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        if rng.random() < 0.3:
            blob = blob[: rng.randrange(len(blob))]
        try:
            fastder.read_signers([bytes(blob)])
            handled += 1
        except fastder.ParseError:
            pass
    assert handled > 50  # mutations of unread parts (signature bits, digests) keep the signers


def _length(n: int) -> bytes:
    """DER length octets of ``n``."""
    if n < 0x80:
        return bytes([n])
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(size)]) + size


def test_junk_huge_lengths_and_deep_nesting_end_at_once():
    def nest(depth: int) -> bytes:
        """``depth`` SEQUENCEs, each holding the next (built outside in: no quadratic copying)."""
        headers, size = [], 0
        for _ in range(depth):
            header = b"\x30" + _length(size)
            headers.append(header)
            size += len(header)
        return b"".join(reversed(headers))

    junk = [
        b"",
        b"\x30",
        b"\x30\x80" + b"\x00" * 8,  # indefinite length
        b"\x30\x84\xff\xff\xff\xff" + b"\x00" * 16,  # 4 GiB claimed
        b"\x30\x88" + b"\xff" * 8,  # 8 length octets
        b"\x30\x81\x05\x00",  # non-minimal length
        b"\x3f\x81\x01\x00",  # multi-byte tag
        nest(100_000),  # deep SEQUENCE nesting: the reader follows a fixed shape, never the depth
        b"\x30\x83\x10\x00\x00" + b"\x05\x00" * 0x80000,  # a million tiny elements
    ]
    for blob in junk:
        start = time.perf_counter()
        with pytest.raises(fastder.ParseError):
            fastder.read_signers([blob])
        assert time.perf_counter() - start < 1.0


def test_nested_signatures_deeper_than_the_limit_are_left_to_signify():
    """Each level a signature whose nested signature is the level below: read up to
    MAX_NESTING levels below the top, one level more is a ParseError (signify and the
    signature cap decide then). Built from the raw DER of a signature without unsigned
    attributes (asn1crypto would re-encode every level)."""
    info = cms.ContentInfo.load(first_pkcs7(_fixture("files/pulseway.exe")))
    signed = info["content"]
    assert not signed["signer_infos"][0]["unsigned_attrs"].native
    head = b"".join(signed[n].dump() for n in ("version", "digest_algorithms", "encap_content_info", "certificates"))
    signer_info = signed["signer_infos"][0].contents
    nested_oid = cms.CMSAttributeType("microsoft_nested_signature").dump()
    level = info.dump()
    levels = [level]
    for _ in range(fastder.MAX_NESTING + 1):
        unsigned = der_tlv(0xA1, der_tlv(0x30, nested_oid + der_tlv(0x31, level)))
        signer_infos = der_tlv(0x31, der_tlv(0x30, signer_info + unsigned))
        level = der_tlv(0x30, info["content_type"].dump() + der_tlv(0xA0, der_tlv(0x30, head + signer_infos)))
        levels.append(level)
    deepest_read = levels[fastder.MAX_NESTING]
    assert len(fastder.parse_pkcs7(deepest_read)) == fastder.MAX_NESTING + 1  # pre-order, one per level
    assert len(fastder.read_signers([deepest_read])) == 1  # one row per distinct signer certificate
    with pytest.raises(fastder.ParseError, match="too deep"):
        fastder.read_signers([levels[fastder.MAX_NESTING + 1]])
    # and signify reads as many signatures
    theirs = list(authenticode.AuthenticodeSignature.from_envelope(levels[3]).iter_recursive_nested())
    assert len(theirs) == len(fastder.parse_pkcs7(levels[3])) == 4


def test_the_time_budget_stops_the_reader():
    """The deadline's check is called inside the reader and its exception is not swallowed."""
    table = first_pkcs7(_fixture("files/dual_signed.exe"))
    calls = []

    def tick() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise ExtractTimeout("time budget exceeded while reading the signers")

    with pytest.raises(ExtractTimeout):
        fastder.read_signers([table], tick)
    assert len(calls) == 2
