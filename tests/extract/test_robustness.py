"""Issue 6 items 2, 3, 4 and 11: bounded memory, caps on the certificate table, budgets that
stop work, and certificate well-formedness. Real signify on the signed fixtures, mutated here."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest
from asn1crypto import x509 as asn1_x509

from agent.extract.authenticode import MALFORMED_CERTIFICATE, TrustVerifier, extract_stream, load_roots
from agent.extract.certinfo import parse_certificate
from tests.conftest import FIXTURES, ROOT, TEST_ROOT_CA
from tests.extract.pe_surgery import first_pkcs7, win_certificate, with_extra_certificates, with_table

MiB = 1024 * 1024


def _fixture(name: str) -> bytes:
    return (FIXTURES / "files" / name).read_bytes()


@pytest.fixture(scope="module")
def verifier() -> TrustVerifier:
    return TrustVerifier(load_roots([TEST_ROOT_CA]))


class CountingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, n: int | None = -1) -> bytes:
        chunk = super().read(n)
        self.read_bytes += len(chunk)
        return chunk


# --- 6.2: memory that grows without limit

_RSS_SCRIPT = """
import io, sys, psutil
from agent.extract.authenticode import TrustVerifier, extract_stream
data = open(sys.argv[1], "rb").read()
verifier = TrustVerifier()  # no test root: the chain fails on every file
def once():
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier)
    assert facts.signatures[0].verification_status == "CERTIFICATE_ERROR", facts
for _ in range(100):
    once()
before = psutil.Process().memory_info().rss
for _ in range(int(sys.argv[2])):
    once()
print((psutil.Process().memory_info().rss - before) / 1e6, verifier.cache_hits, verifier.cache_misses)
"""


def test_verifying_one_untrusted_file_thousands_of_times_keeps_memory_flat():
    """Main kept ~75 KB per failing verification (a cached exception re-raised, its traceback
    growing): 3,000 verifications grew RSS by ~230 MB. Now the outcome is cached, not the exception."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(FIXTURES / "files" / "pulseway.exe"), "3000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a guard against a hang, not a speed claim (busy CI machines are slow)
        check=True,
    ).stdout.split()
    growth_mb, hits, misses = float(out[0]), int(out[1]), int(out[2])
    assert hits >= 3000 and misses <= 2
    assert growth_mb < 20, f"RSS grew {growth_mb:.1f} MB over 3,000 verifications"


def test_a_cached_failure_is_reported_the_same_way_on_every_hit():
    verifier = TrustVerifier()
    data = _fixture("pulseway.exe")
    first = extract_stream(io.BytesIO(data), len(data), verifier=verifier).signatures[0]
    again = extract_stream(io.BytesIO(data), len(data), verifier=verifier).signatures[0]
    assert verifier.cache_hits >= 1
    assert (again.verification_status, again.verification_error) == (
        first.verification_status,
        first.verification_error,
    )
    assert first.verification_status == "CERTIFICATE_ERROR" and first.verification_error


def test_the_chain_cache_is_bounded_by_entries():
    verifier = TrustVerifier(load_roots([TEST_ROOT_CA]), cache_entries=3)
    names = ["pulseway.exe", "dwservice.exe", "alpemix.exe", "servereye.exe", "no_cn.exe", "email_only.exe"]
    for name in names:  # six distinct signer certificates
        data = _fixture(name)
        facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier)
        assert facts.signatures[0].is_trusted, name
    assert len(verifier.chain_cache) == 3
    # the most recent outcome is still cached and still yields a trusted chain
    hits = verifier.cache_hits
    data = _fixture("email_only.exe")
    assert extract_stream(io.BytesIO(data), len(data), verifier=verifier).signatures[0].is_trusted
    assert verifier.cache_hits > hits


def test_large_certificates_are_parsed_but_not_memoised():
    der = asn1_x509.Certificate.load(first_cert_der("pulseway.exe"))
    tbs = der["tbs_certificate"]
    subject = tbs["subject"].native
    subject["organizational_unit_name"] = "x" * 20_000  # a 20 KB name: parsed, not held
    tbs["subject"] = asn1_x509.Name.build(subject)
    big = asn1_x509.Certificate(
        {**{k: der[k] for k in ("signature_algorithm", "signature_value")}, "tbs_certificate": tbs}
    )
    from agent.extract import certinfo

    before = certinfo._parse_certificate_memo.cache_info().currsize
    assert parse_certificate(big.dump(force=True)).display_name == der.subject.native["common_name"]
    assert certinfo._parse_certificate_memo.cache_info().currsize == before
    assert certinfo._parse_certificate_memo.cache_info().maxsize == certinfo.MEMO_ENTRIES


def first_cert_der(name: str) -> bytes:
    from asn1crypto import cms

    signed = cms.ContentInfo.load(first_pkcs7(_fixture(name)))["content"]
    leaf_serial = signed["signer_infos"][0]["sid"].chosen["serial_number"].native
    for cert in signed["certificates"]:
        if cert.chosen.serial_number == leaf_serial:
            return cert.chosen.dump()
    raise AssertionError("no leaf")


# --- 6.3: huge but valid certificate tables


def test_a_table_over_the_size_cap_is_a_parse_error_before_it_is_read(verifier):
    pkcs7 = with_extra_certificates(first_pkcs7(_fixture("pulseway.exe")), 5000)  # ~9 MB, valid
    data = with_table(_fixture("pulseway.exe"), win_certificate(pkcs7))
    assert len(pkcs7) > 8 * MiB
    stream = CountingStream(data)
    start = time.monotonic()
    facts = extract_stream(stream, len(data), verifier=verifier)
    assert facts.status == "PARSE_ERROR"
    assert facts.detail == f"certificate table 8.7 MB > cap 8 MB ({len(data) - 1536} > {8 * MiB} bytes)"
    assert stream.read_bytes < 4096  # the headers only: the table was never read
    assert time.monotonic() - start < 1


def test_too_many_certificates_is_a_parse_error_and_the_cap_is_a_keyword(verifier):
    pkcs7 = with_extra_certificates(first_pkcs7(_fixture("pulseway.exe")), 300)  # 602 certificates, ~600 KB
    data = with_table(_fixture("pulseway.exe"), win_certificate(pkcs7))
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier)
    assert facts.status == "PARSE_ERROR"
    assert facts.detail == "certificate table holds more than 500 certificates (cap)"
    # with a higher cap the same valid table is read and verified normally
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier, max_certificates=1000)
    assert facts.status == "OK" and facts.signatures[0].signer.display_name == "MMSoft Design Ltd."
    assert facts.signatures[0].is_trusted


def test_indefinite_length_encoding_does_not_hide_certificates_from_the_count():
    pkcs7 = with_extra_certificates(first_pkcs7(_fixture("pulseway.exe")), 300, indefinite=True)
    data = with_table(_fixture("pulseway.exe"), win_certificate(pkcs7))
    facts = extract_stream(io.BytesIO(data), len(data))
    assert (facts.status, facts.detail) == ("PARSE_ERROR", "certificate table holds more than 500 certificates (cap)")


def test_too_many_signatures_is_a_parse_error(verifier):
    data = _fixture("pulseway.exe")
    entry = win_certificate(first_pkcs7(data))
    many = with_table(data, entry * 40)
    facts = extract_stream(io.BytesIO(many), len(many), verifier=verifier)
    assert (facts.status, facts.detail) == ("PARSE_ERROR", "certificate table holds more than 32 entries (cap)")
    # nested signatures count too
    dual = _fixture("dual_signed.exe")
    assert extract_stream(io.BytesIO(dual), len(dual), max_signatures=2).status == "OK"
    facts = extract_stream(io.BytesIO(dual), len(dual), max_signatures=1)
    assert (facts.status, facts.detail) == ("PARSE_ERROR", "certificate table holds more than 1 signatures (cap)")


def test_msi_signature_stream_has_the_same_caps():
    data = _fixture("signed.msi")
    assert extract_stream(io.BytesIO(data), len(data)).status == "OK"
    facts = extract_stream(io.BytesIO(data), len(data), max_cert_table_size=1024)
    assert facts.status == "PARSE_ERROR" and "DigitalSignature stream" in facts.detail and "> cap 1 KB" in facts.detail
    facts = extract_stream(io.BytesIO(data), len(data), max_certificates=1)
    assert facts.status == "PARSE_ERROR" and "more than 1 certificates" in facts.detail


# --- 6.4: budgets that stop work


def test_hashing_a_huge_sparse_file_stops_at_the_budget_and_keeps_the_signer(tmp_path, verifier):
    path = tmp_path / "sparse_tail.exe"
    path.write_bytes(_fixture("pulseway.exe"))
    os.truncate(path, 20 * 1024**3)  # 20 GB, nearly all of it a sparse hole after the table
    size = path.stat().st_size
    start = time.monotonic()
    with open(path, "rb") as stream:
        facts = extract_stream(stream, size, verifier=verifier, time_budget=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"a 0.5 s budget ran {elapsed:.1f} s"
    assert facts.status == "TIMEOUT" and "hashing" in facts.detail
    (sig,) = facts.signatures
    assert sig.signer.display_name == "MMSoft Design Ltd."
    assert sig.signer.sha1 and sig.program_name
    assert sig.digest_valid is None and sig.is_trusted is None
    assert sig.verification_status == "TIMEOUT" and "time budget" in sig.verification_error
    assert facts.sha256 == ""  # never claims a hash it did not finish


def test_an_ample_budget_changes_nothing(verifier):
    data = _fixture("timestamped.exe")
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier, time_budget=30)
    assert facts.status == "OK" and facts.signatures[0].is_trusted


# --- 6.11: certificate well-formedness


def _mutate_outer_signature_algorithm(data: bytes) -> tuple[bytes, str]:
    """Flip the leaf certificate's outer signatureAlgorithm parameters from NULL (05 00)
    to INTEGER (02 00): outside the TBS, outside the file digest. Returns (file, old thumbprint)."""
    leaf = asn1_x509.Certificate.load(first_cert_der("pulseway.exe"))
    der = leaf.dump()
    at = data.find(der)
    assert at > 0
    tbs_len = len(leaf["tbs_certificate"].dump())
    header_len = len(der) - len(leaf.contents)
    alg_at = at + header_len + tbs_len
    alg = leaf["signature_algorithm"].dump()
    assert data[alg_at : alg_at + len(alg)] == alg and alg.endswith(b"\x05\x00")
    mutated = bytearray(data)
    mutated[alg_at + len(alg) - 2] = 0x02
    return bytes(mutated), leaf.sha1.hex()


def test_a_certificate_whose_outer_algorithm_differs_from_the_tbs_is_not_trusted(verifier):
    data, original_thumbprint = _mutate_outer_signature_algorithm(_fixture("pulseway.exe"))
    facts = extract_stream(io.BytesIO(data), len(data), verifier=verifier)
    (sig,) = facts.signatures
    assert sig.signer.display_name == "MMSoft Design Ltd."
    assert sig.signer.sha1 != original_thumbprint  # the SignerHash an attacker could choose
    assert sig.digest_valid is True  # the file itself is intact
    assert sig.is_trusted is False
    assert sig.verification_status == MALFORMED_CERTIFICATE
    assert "RFC 5280 4.1.1.2" in sig.verification_error and "signatureAlgorithm" in sig.verification_error


def test_an_msi_whose_storage_tree_loops_ends_fast_as_a_parse_error(verifier):
    """Found by make fuzz: directory entries whose child is the root entry. signify's recursive
    hash of the storage tree ran to RecursionError (seconds past the budget) or, with more such
    entries, hung; streams in the mini stream are read from memory, so no read checked the time."""
    import struct

    data = bytearray(_fixture("signed.msi"))
    sector_shift = struct.unpack_from("<H", data, 0x1E)[0]
    directory = (struct.unpack_from("<I", data, 0x30)[0] + 1) << sector_shift
    for sid in (1, 2):  # two stream entries now hold the root storage as their child
        struct.pack_into("<I", data, directory + sid * 128 + 0x4C, 0)
    start = time.monotonic()
    facts = extract_stream(io.BytesIO(bytes(data)), len(data), verifier=verifier, time_budget=2)
    assert time.monotonic() - start < 1.5
    assert (facts.status, facts.detail) == (
        "PARSE_ERROR",
        "SignedMsiParseError: OLE storage tree has a loop at entry 0",
    )
